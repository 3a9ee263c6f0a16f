"""The book's diagrams (lm.diagrams): what they say follows the config, nothing overlaps or leaves
the figure, every label fits its box, and arguments they cannot draw are refused by name."""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import matplotlib

matplotlib.use("Agg")  # no display in tests

import matplotlib.pyplot as plt
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

import lm
from lm.diagrams import draw_block, draw_kv_cache, draw_model, draw_training_step


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


GPT2_STYLE = lm.ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, d_model=128)
LLAMA_STYLE = lm.ModelConfig(vocab_size=32000, block_size=2048, n_layer=8, n_head=8, n_kv_heads=2, d_model=512,
                             pos="rope", norm="rmsnorm", ffn="swiglu", bias=False, tie_weights=False)
CONFIGS = {
    "gpt2": GPT2_STYLE,
    "llama": LLAMA_STYLE,
    "post": dataclasses.replace(GPT2_STYLE, norm_position="post", pos="sinusoidal"),
    "window_moe": dataclasses.replace(GPT2_STYLE, attention="sliding_window", window=32, ffn="moe",
                                      moe_expert="swiglu", norm="scalenorm"),
    "mqa_sparse": dataclasses.replace(GPT2_STYLE, n_kv_heads=1, attention="block_sparse", pos="none"),
    "linear_one_layer": dataclasses.replace(GPT2_STYLE, attention="linear", n_layer=1, ffn="gelu_tanh"),
    "gpt2_124m": lm.preset("gpt2-124m"),
}


def every_figure():
    """(name, figure) for every drawing function on a range of arguments."""
    for name, config in CONFIGS.items():
        yield f"block-{name}", draw_block(config)
        yield f"model-{name}", draw_model(config)
    yield "training", draw_training_step()
    yield "training-accum", draw_training_step(grad_accum=8)
    yield "training-noclip", draw_training_step(grad_clip=0)
    for prompt_len, step, n_layer in [(5, 3, 2), (1, 1, 1), (1, 2, 4), (12, 12, 3)]:
        yield f"kv-{prompt_len}-{step}-{n_layer}", draw_kv_cache(prompt_len, step, n_layer)


# ---- helpers ---------------------------------------------------------------------------------------
def texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def text_of(fig: Figure) -> str:
    return "\n".join(texts(fig))


def boxes(fig: Figure) -> dict:
    """name -> the patch of every box (gid "box:<name>")."""
    return {p.get_gid()[4:]: p for p in fig.axes[0].patches if (p.get_gid() or "").startswith("box:")}


def extents(fig: Figure, artists) -> list:
    """Window extents (pixels) of `artists`, after drawing `fig` with Agg (also once pyplot closed it)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in artists]


def centre_y(fig: Figure, name: str) -> float:
    (bbox,) = extents(fig, [boxes(fig)[name]])
    return (bbox.y0 + bbox.y1) / 2


# ---- the block -------------------------------------------------------------------------------------
def test_block_names_the_parts_of_a_gpt2_config():
    fig = draw_block(GPT2_STYLE)
    assert isinstance(fig, Figure)
    words = text_of(fig)
    assert "LayerNorm" in words and "causal self-attention" in words and "4 heads of D = 32" in words
    assert "MLP with GELU" in words and "128 → 512 → 128" in words  # C -> F -> C
    assert "C = 128" in words and "(B, T, C)" in words
    assert "RoPE" not in words and "RMSNorm" not in words and "SwiGLU" not in words
    assert {"norm1", "attn", "add1", "norm2", "ffn", "add2", "input", "output"} <= set(boxes(fig))


def test_block_of_a_llama_config_shows_rmsnorm_swiglu_rope_and_the_kv_heads():
    words = text_of(draw_block(LLAMA_STYLE))
    assert "RMSNorm" in words and "LayerNorm" not in words
    assert "SwiGLU" in words and "512 → 2048 → 512" in words
    assert "grouped-query, 8 query / 2 kv heads" in words
    assert "RoPE rotates q and k" in words
    assert "C = 512" in words


@pytest.mark.parametrize("config, expected", [
    (dataclasses.replace(GPT2_STYLE, n_kv_heads=1), "multi-query, 4 query / 1 kv head"),
    (dataclasses.replace(GPT2_STYLE, attention="sliding_window", window=16), "the last 16 keys"),
    (dataclasses.replace(GPT2_STYLE, attention="block_sparse", sparse_block=8), "blocks of 8"),
    (dataclasses.replace(GPT2_STYLE, attention="linear"), "linear attention"),
    (dataclasses.replace(GPT2_STYLE, norm="scalenorm"), "ScaleNorm"),
    (dataclasses.replace(GPT2_STYLE, ffn="moe", n_experts=4, moe_top_k=1), "4 GELU experts, top-1 per token"),
    (dataclasses.replace(GPT2_STYLE, ffn="gelu_tanh"), "GELU (tanh)"),
    (dataclasses.replace(GPT2_STYLE, d_ff=200), "128 → 200 → 128"),
])
def test_block_labels_follow_the_config(config, expected):
    assert expected in text_of(draw_block(config))


def test_pre_norm_puts_the_norm_before_the_add_and_post_norm_after_it():
    # the block runs from top to bottom: earlier is higher up
    pre = draw_block(GPT2_STYLE)
    for i in (1, 2):
        assert centre_y(pre, f"norm{i}") > centre_y(pre, f"add{i}")
    assert centre_y(pre, "add1") > centre_y(pre, "norm2")
    post = draw_block(dataclasses.replace(GPT2_STYLE, norm_position="post"))
    for i in (1, 2):
        assert centre_y(post, f"norm{i}") < centre_y(post, f"add{i}")
    assert centre_y(post, "norm1") > centre_y(post, "ffn") > centre_y(post, "add2") > centre_y(post, "norm2")
    assert "post-norm" in text_of(post) and "pre-norm" in text_of(pre)


def test_post_norm_norms_sit_on_the_stream_and_pre_norm_norms_beside_it():
    def centre_x(fig, name):
        (bbox,) = extents(fig, [boxes(fig)[name]])
        return (bbox.x0 + bbox.x1) / 2

    for position, on_stream in (("pre", False), ("post", True)):
        fig = draw_block(dataclasses.replace(GPT2_STYLE, norm_position=position))
        stream_x = centre_x(fig, "add1")
        assert (abs(centre_x(fig, "norm1") - stream_x) < 1) == on_stream


# ---- the model -------------------------------------------------------------------------------------
def test_model_shows_the_layers_the_embedding_sizes_and_the_tied_head():
    words = text_of(draw_model(GPT2_STYLE))
    assert "transformer block × 4" in words and "4 blocks" in words
    assert "V × C = 65 × 128" in words
    assert "position embedding" in words and "64 × 128" in words  # learned: block_size x C
    assert "final norm" in words and "norm_f" in words
    assert "lm_head" in words and "tied" in words
    assert "token ids: (B, T)" in words and "(B, T, V)" in words
    assert "softmax" in words and "cross-entropy" in words


def test_model_with_rope_untied_and_post_norm():
    words = text_of(draw_model(LLAMA_STYLE))
    assert "RoPE" in words and "position embedding" not in words and "sinusoidal" not in words
    assert "untied" in words and "tied:" not in words
    assert "V × C = 32,000 × 512" in words and "transformer block × 8" in words
    assert "RMSNorm" in words and "SwiGLU" in words and "8 query / 2 kv heads" in words

    post = draw_model(dataclasses.replace(GPT2_STYLE, norm_position="post", pos="sinusoidal"))
    assert "norm_f" not in boxes(post) and "norm_f" not in text_of(post)
    assert "sinusoidal positions" in text_of(post)
    assert "norm_f" in boxes(draw_model(GPT2_STYLE))


def test_model_runs_from_ids_down_to_the_logits():
    fig = draw_model(GPT2_STYLE)
    ys = [centre_y(fig, name) for name in ("ids", "tok_emb", "add_pos", "blocks", "norm_f", "lm_head", "logits")]
    assert ys == sorted(ys, reverse=True)
    assert centre_y(fig, "pos_emb") == pytest.approx(centre_y(fig, "tok_emb"))
    assert centre_y(fig, "softmax") == pytest.approx(centre_y(fig, "logits"))


def test_the_tie_is_drawn_only_for_tied_weights():
    tie_colour = matplotlib.colors.to_rgba(lm.diagrams.PALETTE["head"][1])

    def dashed_lines(fig):
        return [line for line in fig.axes[0].lines
                if line.get_linestyle() == "--" and matplotlib.colors.to_rgba(line.get_color()) == tie_colour]

    assert dashed_lines(draw_model(GPT2_STYLE))
    assert not dashed_lines(draw_model(dataclasses.replace(GPT2_STYLE, tie_weights=False)))


# ---- a training step -------------------------------------------------------------------------------
def test_training_step_is_the_cycle_of_the_chapter():
    fig = draw_training_step()
    words = text_of(fig)
    for part in ("batch (x, y)", "forward", "logits", "cross-entropy", "backward", "clip", "‖g‖ ≤ 1",
                 "AdamW", "zero grads", "next", "lr_at(step)", "targets y"):
        assert part in words, part
    assert "micro-batch" not in words
    order = ["batch", "forward", "loss", "backward"]
    x = {name: extents(fig, [boxes(fig)[name]])[0].x0 for name in order}
    assert [x[name] for name in order] == sorted(x.values())
    assert centre_y(fig, "clip") < centre_y(fig, "backward")  # the cycle turns down after backward


def test_training_step_with_accumulation_shows_the_inner_loop():
    fig = draw_training_step(grad_accum=4)
    words = text_of(fig)
    assert "micro-batch" in words and "loss / 4" in words and "g += its gradient" in words
    assert "repeated 4 times" in words and "4 × B" in words
    assert any(p.get_gid() == "frame:accumulation" for p in fig.axes[0].patches)
    assert "‖g‖ ≤ 0.5" in text_of(draw_training_step(grad_clip=0.5))
    assert "no clipping" in text_of(draw_training_step(grad_clip=0))


# ---- the KV cache ----------------------------------------------------------------------------------
def cells(fig: Figure, group: str) -> list:
    return [p for p in fig.axes[0].patches if p.get_gid() == f"cell:{group}"]


@pytest.mark.parametrize("prompt_len, step, n_layer", [(5, 3, 2), (1, 1, 1), (3, 1, 3), (10, 14, 2)])
def test_kv_cache_fills_prompt_and_generated_and_highlights_the_new_token(prompt_len, step, n_layer):
    fig = draw_kv_cache(prompt_len, step, n_layer)
    rows = 2 * n_layer  # keys and values of every layer
    assert len(cells(fig, "prompt")) == rows * prompt_len
    assert len(cells(fig, "generated")) == rows * (step - 1)
    assert len(cells(fig, "new")) == rows
    positions = prompt_len + step
    assert len([p for p in fig.axes[0].patches if p.get_gid() == "attend"]) == positions  # q sees every key
    words = text_of(fig)
    assert f"decoding step {step}" in words and f"all {positions} keys" in words
    assert f"position {positions - 1}" in words
    assert words.count("keys K") == n_layer and words.count("values V") == n_layer
    new_x = min(extents(fig, cells(fig, "new"))[0].x0, 1e9)
    assert all(bbox.x1 < new_x for bbox in extents(fig, cells(fig, "prompt") + cells(fig, "generated")))


# ---- every figure: sizes, overlaps, labels, glyphs -------------------------------------------------
@pytest.fixture(scope="module")
def figures():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "More than 20 figures")  # closed after each test (_close_figures)
        drawn = list(every_figure())
    yield drawn
    plt.close("all")


def test_every_character_is_in_the_font(figures):
    for name, fig in figures:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "Glyph")  # "Glyph 8214 (...) missing from font(s)": a box instead
            extents(fig, [])


def test_figures_are_page_sized(figures):
    for name, fig in figures:
        width, height = fig.get_size_inches()
        assert 6 <= width <= 8 and 2.5 <= height <= 8, (name, width, height)


def test_no_two_boxes_overlap(figures):
    for name, fig in figures:
        cells_ = [p for p in fig.axes[0].patches if (p.get_gid() or "").startswith("cell:")]
        patches = list(boxes(fig).values()) + cells_
        assert len(patches) >= 5, name
        for (a, box_a), (b, box_b) in itertools.combinations(zip(patches, extents(fig, patches)), 2):
            overlap_w = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
            overlap_h = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
            assert overlap_w <= 1 or overlap_h <= 1, (name, a.get_gid(), b.get_gid())


def test_all_text_is_inside_the_figure_and_readable(figures):
    for name, fig in figures:
        labels = [t for t in fig.findobj(Text) if t.get_text() and t.get_visible()]
        assert labels, name
        fig_box = fig.bbox
        for text, bbox in zip(labels, extents(fig, labels)):
            assert text.get_fontsize() >= 9, (name, text.get_text())
            assert (bbox.x0 >= fig_box.x0 - 1 and bbox.x1 <= fig_box.x1 + 1 and bbox.y0 >= fig_box.y0 - 1
                    and bbox.y1 <= fig_box.y1 + 1), (name, text.get_text(), bbox, fig_box)


def test_every_label_fits_inside_its_box(figures):
    for name, fig in figures:
        by_name = boxes(fig)
        for text in fig.findobj(Text):
            gid = text.get_gid() or ""
            if not gid.startswith("text:"):
                continue
            box_bbox, text_bbox = extents(fig, [by_name[gid[5:]], text])
            assert (text_bbox.x0 >= box_bbox.x0 and text_bbox.x1 <= box_bbox.x1 and text_bbox.y0 >= box_bbox.y0
                    and text_bbox.y1 <= box_bbox.y1), (name, text.get_text())


def test_labels_do_not_overlap_each_other(figures):
    for name, fig in figures:
        labels = [t for t in fig.findobj(Text) if t.get_text() and not (t.get_gid() or "").startswith("text:")]
        for (a, box_a), (b, box_b) in itertools.combinations(zip(labels, extents(fig, labels)), 2):
            overlap_w = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
            overlap_h = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
            assert overlap_w <= 1 or overlap_h <= 1, (name, a.get_text(), b.get_text())


# ---- arguments they cannot draw --------------------------------------------------------------------
@pytest.mark.parametrize("draw", [draw_block, draw_model])
@pytest.mark.parametrize("config, match", [
    ({"n_layer": 2}, "must be an lm.ModelConfig, got dict"),
    (None, "must be an lm.ModelConfig, got NoneType"),
    ("gpt2-124m", "must be an lm.ModelConfig, got str"),
])
def test_a_config_must_be_a_model_config(draw, config, match):
    with pytest.raises(ValueError, match=match):
        draw(config)


@pytest.mark.parametrize("draw", [draw_block, draw_model])
def test_a_config_changed_into_an_invalid_one_is_refused_by_field(draw):
    config = dataclasses.replace(GPT2_STYLE)
    config.norm = "batchnorm"
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        draw(config)


@pytest.mark.parametrize("kwargs, match", [
    ({"grad_accum": 0}, "grad_accum=0 must be >= 1"),
    ({"grad_accum": 2.5}, "grad_accum=2.5 must be an integer"),
    ({"grad_accum": True}, "grad_accum=True must be an integer"),
    ({"grad_clip": -1.0}, "grad_clip=-1.0"),
    ({"grad_clip": float("nan")}, "grad_clip=nan"),
    ({"grad_clip": "1"}, "grad_clip='1'"),
])
def test_training_step_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        draw_training_step(**kwargs)


@pytest.mark.parametrize("args, match", [
    ((0, 3), "prompt_len=0 must be >= 1"),
    ((-2, 3), "prompt_len=-2 must be >= 1"),
    ((5, 0), "step=0 must be >= 1"),
    ((5, 1.0), "step=1.0 must be an integer"),
    (("5", 1), "prompt_len='5' must be an integer"),
    ((5, 3, 0), "n_layer=0 must be between 1 and 4"),
    ((5, 3, 9), "n_layer=9 must be between 1 and 4"),
    ((20, 10), "20 \\+ 10 = 30 positions"),
])
def test_kv_cache_refuses_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        draw_kv_cache(*args)
