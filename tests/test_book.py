"""The book helpers that draw attention (shapes checked at the boundary, causal triangle left blank),
the learning-rate schedule, and read back the metrics of a training run."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display in tests

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from lm.attention import manual_causal_attention
from lm.book import plot_attention, plot_attention_grid


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def causal_weights(B=1, H=2, T=5, D=4) -> torch.Tensor:
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    return manual_causal_attention(q, k, v)[1]


def test_plot_attention_draws_the_lower_triangle_with_token_labels():
    weights = causal_weights(T=5)[0, 1]
    ax = plot_attention(weights, list("ab cd"))
    image = ax.get_images()[0].get_array()
    assert image.shape == (5, 5)
    assert image.mask[0, 1] and not image.mask[1, 0]  # the future is blank, the past is drawn
    np.testing.assert_allclose(image.data[~image.mask], weights.numpy()[np.tril(np.ones((5, 5), bool))])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "\u2423", "c", "d"]


def test_plot_attention_accepts_arrays_and_an_existing_axis_without_labels():
    _, ax = plt.subplots()
    out = plot_attention(np.eye(3), ["x", "\n", "a long token"], ax=ax, labels=False, title="head 0")
    assert out is ax and ax.get_title() == "head 0" and len(ax.get_xticks()) == 0


@pytest.mark.parametrize("weights", [torch.ones(2, 3, 3), torch.ones(3, 4)])
def test_plot_attention_rejects_a_weight_tensor_that_is_not_one_square_matrix(weights):
    with pytest.raises(ValueError, match="one \\(T, T\\) matrix"):
        plot_attention(weights, ["a", "b", "c"])


def test_plot_attention_needs_one_label_per_position():
    with pytest.raises(ValueError, match="one label per position"):
        plot_attention(torch.eye(3), ["a", "b"])


def test_plot_attention_grid_has_one_panel_per_layer_and_head(tiny_model):
    idx = torch.randint(0, tiny_model.config.vocab_size, (2, 6))
    weights = tiny_model.attention_weights(idx)
    fig = plot_attention_grid(weights, [str(i) for i in range(6)], batch_index=1)
    titles = [ax.get_title() for ax in fig.axes]
    n_layer, n_head = tiny_model.config.n_layer, tiny_model.config.n_head
    assert len(titles) == n_layer * n_head
    assert titles[0] == "layer 0, head 0" and titles[-1] == f"layer {n_layer - 1}, head {n_head - 1}"
    drawn = fig.axes[n_head].get_images()[0].get_array()  # layer 1, head 0, second sequence
    expected = weights[1][1, 0].detach().numpy()
    np.testing.assert_allclose(drawn.data[~drawn.mask], expected[np.tril(np.ones((6, 6), bool))], rtol=1e-6)


def test_plot_attention_grid_rejects_anything_but_a_list_of_4d_tensors():
    with pytest.raises(ValueError, match="attention_weights"):
        plot_attention_grid([torch.ones(3, 3)], ["a", "b", "c"])
    with pytest.raises(ValueError, match="attention_weights"):
        plot_attention_grid([], [])


# ---- training helpers: the learning-rate plot and metrics.csv ------------------------------------
def test_plot_lr_schedule_draws_lr_at_at_every_step_with_its_landmarks():
    from lm.book import plot_lr_schedule
    from lm.optim import lr_at

    ax = plot_lr_schedule(1e-3, 1e-4, warmup_steps=10, max_steps=100)
    steps, rates = ax.get_lines()[0].get_data()
    assert list(steps) == list(range(101))
    np.testing.assert_allclose(rates, [lr_at(s, 1e-3, 1e-4, 10, 100) for s in range(101)])
    lines = ax.get_lines()
    assert any(list(line.get_xdata()) == [9, 9] for line in lines)  # warmup ends at step 9, at the peak
    assert any(list(line.get_ydata()) == [1e-4, 1e-4] for line in lines)  # the floor
    middle = [line for line in lines if list(line.get_xdata()) == [55.0]]
    assert middle and middle[0].get_ydata()[0] == pytest.approx(5.5e-4)


def test_plot_lr_schedule_without_warmup_and_on_a_given_axis():
    from lm.book import plot_lr_schedule

    _, ax = plt.subplots()
    assert plot_lr_schedule(1.0, 0.0, warmup_steps=0, max_steps=4, ax=ax, label="cosine") is ax
    assert ax.get_lines()[0].get_label() == "cosine"
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [1.0, 0.5 + 0.5 * np.cos(np.pi / 4), 0.5,
                                                               0.5 - 0.5 * np.cos(np.pi / 4), 0.0], atol=1e-12)


@pytest.mark.parametrize("warmup_steps, max_steps", [(11, 10), (-1, 10), (0, 0)])
def test_plot_lr_schedule_rejects_a_warmup_outside_the_run(warmup_steps, max_steps):
    from lm.book import plot_lr_schedule

    with pytest.raises(ValueError, match="warmup_steps"):
        plot_lr_schedule(1e-3, 1e-4, warmup_steps, max_steps)


def test_read_metrics_gives_back_what_lm_train_logged(tmp_path, tiny_model):
    import lm
    from lm.book import read_metrics

    ids = torch.randint(0, tiny_model.config.vocab_size, (400,))
    config = lm.TrainConfig(max_steps=6, batch_size=2, warmup_steps=2, eval_interval=3, eval_iters=1,
                            progress=False, out_dir=str(tmp_path))
    history = lm.train(tiny_model.train(), ids, ids[:100], config)
    metrics = read_metrics(tmp_path / "metrics.csv")
    assert metrics["step"] == history.step == list(range(6))
    assert metrics["loss"] == history.loss and metrics["lr"] == history.lr  # floats survive the text exactly
    assert all(isinstance(n, int) for n in metrics["tokens"]) and metrics["tokens"][-1] == history.tokens
    evaluated = [s for s, v in zip(metrics["step"], metrics["val_loss"]) if v is not None]
    assert evaluated == history.eval_step == [2, 5]
    assert [v for v in metrics["val_loss"] if v is not None] == history.val_loss
    assert metrics["ema_val_loss"] == [None] * 6  # no EMA in this run


def test_read_metrics_says_how_to_get_the_file(tmp_path):
    from lm.book import read_metrics

    with pytest.raises(FileNotFoundError, match="out_dir"):
        read_metrics(tmp_path / "metrics.csv")


def test_plot_next_token_shows_the_most_likely_tokens_first_with_visible_whitespace():
    from lm.book import plot_next_token

    probs = torch.tensor([0.1, 0.5, 0.0, 0.4])
    ax = plot_next_token(probs, ["a", " ", "c", "\n"], top=3, title="next")
    heights = [bar.get_height() for bar in ax.patches]
    np.testing.assert_allclose(heights, [0.5, 0.4, 0.1])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["\u2423", "\u21b5", "a"]
    assert ax.get_title() == "next"


def test_plot_next_token_keeps_a_given_order_and_decodes_with_a_tokenizer():
    from lm.book import plot_next_token
    from lm.tokenizers import CharTokenizer

    tok = CharTokenizer.train("abc")
    ax = plot_next_token(np.array([0.2, 0.3, 0.5]), tok, order=[0, 2])
    assert [t.get_text() for t in ax.get_xticklabels()] == [tok.decode([0]), tok.decode([2])]
    np.testing.assert_allclose([bar.get_height() for bar in ax.patches], [0.2, 0.5])


@pytest.mark.parametrize("probs, labels, match", [(np.ones((2, 3)), ["a", "b", "c"], "shape \\(V,\\)"),
                                                  (np.ones(3), ["a", "b"], "one label per token")])
def test_plot_next_token_rejects_bad_input(probs, labels, match):
    from lm.book import plot_next_token

    with pytest.raises(ValueError, match=match):
        plot_next_token(probs, labels)
