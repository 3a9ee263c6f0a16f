"""The book helpers that draw attention: shapes checked at the boundary, causal triangle left blank."""

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
