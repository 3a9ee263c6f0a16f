"""Pictures for the book: the transformer block, the whole model, a training step and the KV cache,
drawn with matplotlib from boxes, circles and arrows (no image files).

    from lm.diagrams import draw_block, draw_model, draw_training_step, draw_kv_cache
    draw_block(lm.ModelConfig(norm="rmsnorm", ffn="swiglu", pos="rope"))    # a matplotlib Figure
    draw_model(lm.preset("gpt2-124m"))
    draw_training_step(grad_accum=4)
    draw_kv_cache(prompt_len=5, step=3)

Every label comes from the arguments: the block of an RMSNorm/SwiGLU/RoPE config says so, a
grouped-query config shows its key/value heads, a post-norm block puts its norms after the adds.
Each function returns a Figure made with pyplot (a notebook shows it with `plt.show()`) and raises
ValueError, naming the value, for an argument it cannot draw.

How the drawing works: the axes fill the figure and one data unit is one inch in both directions,
so box sizes, gaps and font sizes are all measured on the printed page. Boxes are as wide as their
text (measured with matplotlib's text-to-path engine, no renderer needed), and the figure is sized
to what was drawn. For tests and readers of the figure: every box is a patch with gid
"box:<name>" and its text has gid "text:<name>"; the cells of the KV cache are "cell:<group>".

Needs matplotlib, which comes with the `book` extra; `import lm` does not import this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle
from matplotlib.textpath import text_to_path

from .config import ModelConfig

__all__ = ["PALETTE", "draw_block", "draw_kv_cache", "draw_model", "draw_training_step"]

# ---- style ---------------------------------------------------------------------------------------
# (fill, edge) per kind of box. The edges are the colours of the parameter groups in chapter 5's
# bar chart (embeddings orange, attention light blue, feed-forward dark blue, norms purple, head red).
PALETTE: dict[str, tuple[str, str]] = {
    "tensor": ("#ffffff", "#7f8c8d"),     # data: token ids, logits, the block's input and output
    "embedding": ("#fdebd0", "#d68910"),
    "attention": ("#d6eaf8", "#2e86c1"),
    "ffn": ("#dde6f2", "#1f4e79"),
    "norm": ("#ede0f3", "#8e44ad"),
    "head": ("#fadbd8", "#c0392b"),
    "block": ("#f4f6f7", "#34495e"),
    "optimizer": ("#d5f5e3", "#1e8449"),
    "schedule": ("#fef9e7", "#b7950b"),
    "add": ("#ffffff", "#2c3e50"),
}
INK = "#1b2631"        # titles and labels
MUTED = "#566573"      # shapes, notes
STREAM = "#2c3e50"     # the residual stream and the main arrows
CACHE = {              # the KV cache's cells: (fill, edge)
    "prompt": ("#aed6f1", "#2e86c1"),
    "generated": ("#a9dfbf", "#1e8449"),
    "new": ("#f8c471", "#c0392b"),
}

TITLE_PT, TEXT_PT, SMALL_PT = 11, 10, 9  # figure title, box title, box details and notes (points)
_PAD_X, _PAD_Y = 0.13, 0.09              # inside a box, inches
_TITLE_H, _LINE_H = 0.21, 0.175          # height of a box's title line and of each detail line
_ADD_R = 0.13                            # radius of the circles that add two tensors
_SIZE_STEP = 0.25                        # figure sizes are whole multiples of this (inches)

NORM_NAMES = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm", "scalenorm": "ScaleNorm"}
ATTENTION_NAMES = {
    "sdpa": "causal self-attention",
    "manual": "causal self-attention",
    "sliding_window": "sliding-window attention",
    "linear": "causal linear attention",
    "block_sparse": "block-sparse attention",
}
FFN_NAMES = {"gelu": "MLP with GELU", "gelu_tanh": "MLP with GELU (tanh)", "swiglu": "SwiGLU",
             "moe": "mixture of experts (MoE)"}
EXPERT_NAMES = {"gelu": "GELU", "gelu_tanh": "GELU (tanh)", "swiglu": "SwiGLU"}
MAX_CACHE_POSITIONS = 24  # draw_kv_cache: more columns than this would not be readable
MAX_CACHE_LAYERS = 4


# ---- checks --------------------------------------------------------------------------------------
def _check_config(config) -> ModelConfig:
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be an lm.ModelConfig, got {type(config).__name__} ({config!r:.80}); "
                         f"build one with lm.ModelConfig(...) or lm.preset(name).")
    config.validate()  # a config changed after it was made: ConfigError, a ValueError naming the field
    return config


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name}={value!r} must be an integer, got {type(value).__name__}.")
    if value < low or (high is not None and value > high):
        limits = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name}={value!r} must be {limits}.")
    return int(value)


# ---- the drawing surface -------------------------------------------------------------------------
def _measure(text: str, size: float, weight: str = "normal", style: str = "normal") -> tuple[float, float]:
    """Width and height of `text` in inches (one line per newline)."""
    prop = FontProperties(size=size, weight=weight, style=style)
    lines = text.split("\n")
    width = max(text_to_path.get_text_width_height_descent(line, prop, ismath=False)[0] for line in lines)
    return width * 1.06 / 72, len(lines) * size * 1.25 / 72


@dataclass
class _Box:
    cx: float
    cy: float
    w: float
    h: float

    @property
    def left(self) -> float:
        return self.cx - self.w / 2

    @property
    def right(self) -> float:
        return self.cx + self.w / 2

    @property
    def top(self) -> float:
        return self.cy + self.h / 2

    @property
    def bottom(self) -> float:
        return self.cy - self.h / 2


def _box_size(title: str, lines=(), min_width: float = 0.0, bold: bool = True) -> tuple[float, float]:
    """The size a box needs for its title and detail lines, in inches."""
    widths = [_measure(title, TEXT_PT, "bold" if bold else "normal")[0]]
    widths += [_measure(line, SMALL_PT)[0] for line in lines]
    return max(min_width, max(widths) + 2 * _PAD_X), 2 * _PAD_Y + _TITLE_H + _LINE_H * len(lines)


class _Sketch:
    """A figure whose one axes is measured in inches; `finish` sizes the figure to what was drawn."""

    def __init__(self):
        self.fig = plt.figure(figsize=(7, 5))
        self.ax = self.fig.add_axes((0, 0, 1, 1))
        self.ax.set_axis_off()
        self.boxes: dict[str, _Box] = {}
        self.xmin = self.ymin = float("inf")
        self.xmax = self.ymax = float("-inf")

    def _extend(self, x0: float, y0: float, x1: float, y1: float) -> None:
        self.xmin, self.xmax = min(self.xmin, x0, x1), max(self.xmax, x0, x1)
        self.ymin, self.ymax = min(self.ymin, y0, y1), max(self.ymax, y0, y1)

    def text(self, x: float, y: float, s: str, size: float = SMALL_PT, weight: str = "normal",
             color: str = INK, ha: str = "center", va: str = "center", style: str = "normal",
             rotation: float = 0, gid: str | None = None, zorder: float = 4):
        self.ax.text(x, y, s, fontsize=size, fontweight=weight, fontstyle=style, color=color, ha=ha, va=va,
                     rotation=rotation, gid=gid, zorder=zorder, linespacing=1.25)
        w, h = _measure(s, size, weight, style)
        if rotation % 180 == 90:
            w, h = h, w
        x0 = {"left": x, "center": x - w / 2, "right": x - w}[ha]
        y0 = {"bottom": y, "baseline": y, "center": y - h / 2, "top": y - h}[va]
        self._extend(x0, y0, x0 + w, y0 + h)

    def box(self, name: str, cx: float, cy: float, title: str, lines=(), kind: str = "block",
            size: tuple[float, float] | None = None, bold: bool = True, lw: float = 1.3) -> _Box:
        w, h = size if size is not None else _box_size(title, lines, bold=bold)
        fill, edge = PALETTE[kind]
        box = _Box(cx, cy, w, h)
        self.ax.add_patch(FancyBboxPatch((box.left, box.bottom), w, h, boxstyle="round,pad=0,rounding_size=0.07",
                                         facecolor=fill, edgecolor=edge, lw=lw, zorder=2, gid=f"box:{name}"))
        # the title line, then the details, stacked from the top of the text block, which is centred
        block_h = _TITLE_H + _LINE_H * len(lines)
        y = cy + block_h / 2 - _TITLE_H / 2
        self.text(cx, y, title, size=TEXT_PT, weight="bold" if bold else "normal", gid=f"text:{name}")
        y -= _TITLE_H / 2 + _LINE_H / 2
        for line in lines:
            self.text(cx, y, line, size=SMALL_PT, color="#2e4053", gid=f"text:{name}")
            y -= _LINE_H
        self.boxes[name] = box
        self._extend(box.left, box.bottom, box.right, box.top)
        return box

    def add(self, name: str, x: float, y: float) -> _Box:
        """A circle with a plus: two tensors of the same shape are added."""
        fill, edge = PALETTE["add"]
        self.ax.add_patch(Circle((x, y), _ADD_R, facecolor=fill, edgecolor=edge, lw=1.4, zorder=2,
                                 gid=f"box:{name}"))
        arm = _ADD_R * 0.55
        self.ax.plot([x - arm, x + arm], [y, y], color=edge, lw=1.4, zorder=3, solid_capstyle="butt")
        self.ax.plot([x, x], [y - arm, y + arm], color=edge, lw=1.4, zorder=3, solid_capstyle="butt")
        box = _Box(x, y, 2 * _ADD_R, 2 * _ADD_R)
        self.boxes[name] = box
        self._extend(box.left, box.bottom, box.right, box.top)
        return box

    def arrow(self, start, end, color: str = STREAM, lw: float = 1.3, ls: str = "-",
              connection: str = "arc3", style: str = "-|>", zorder: float = 1.8, gid: str = "arrow") -> None:
        self.ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=11, color=color, lw=lw,
                                          linestyle=ls, connectionstyle=connection, shrinkA=0, shrinkB=0,
                                          zorder=zorder, gid=gid))
        self._extend(*start, *end)

    def path(self, points, color: str = STREAM, lw: float = 1.3, ls: str = "-", arrow: bool = True,
             zorder: float = 1.8) -> None:
        """Straight segments through `points`, with an arrowhead at the last one."""
        xs, ys = zip(*points)
        last = len(points) - 1 if arrow else len(points)
        if last >= 2:
            self.ax.plot(xs[:last], ys[:last], color=color, lw=lw, ls=ls, zorder=zorder, solid_joinstyle="round")
        if arrow:
            self.arrow(points[-2], points[-1], color=color, lw=lw, ls=ls, zorder=zorder)
        for x, y in points:
            self._extend(x, y, x, y)

    def dot(self, x: float, y: float, color: str = STREAM) -> None:
        self.ax.plot([x], [y], "o", ms=4.5, color=color, zorder=3)

    def finish(self, title: str | None = None, margin: float = 0.14) -> Figure:
        if title:
            self.text((self.xmin + self.xmax) / 2, self.ymax + 0.14, title, size=TITLE_PT, weight="bold",
                      va="bottom", gid="title")
        # Whole quarter inches: the size (which a notebook prints as "<Figure size 675x450 ...>") stays
        # the same when another FreeType measures the text a little differently.
        width = math.ceil((self.xmax - self.xmin + 2 * margin) / _SIZE_STEP) * _SIZE_STEP
        height = math.ceil((self.ymax - self.ymin + 2 * margin) / _SIZE_STEP) * _SIZE_STEP
        x_pad = (width - (self.xmax - self.xmin)) / 2
        y_pad = (height - (self.ymax - self.ymin)) / 2
        self.fig.set_size_inches(width, height)
        self.ax.set_xlim(self.xmin - x_pad, self.xmax + x_pad)
        self.ax.set_ylim(self.ymin - y_pad, self.ymax + y_pad)
        return self.fig


# ---- what the config says, in words --------------------------------------------------------------
def _norm_name(config: ModelConfig) -> str:
    return NORM_NAMES.get(config.norm, config.norm)


def _heads(config: ModelConfig) -> str:
    H, kv = config.n_head, config.kv_heads
    if kv == H:
        return f"{H} head{'s' if H > 1 else ''} of D = {config.head_dim}"
    kind = "multi-query" if kv == 1 else "grouped-query"
    return f"{kind}, {H} query / {kv} kv head{'s' if kv > 1 else ''}"


def _attention_lines(config: ModelConfig) -> tuple[str, list[str]]:
    """The attention box's title and detail lines."""
    title = ATTENTION_NAMES.get(config.attention, f"{config.attention} attention")
    lines = [_heads(config)]
    if config.attention == "sliding_window":
        lines.append(f"each query sees the last {config.window} keys")
    elif config.attention == "block_sparse":
        if config.sparse_pattern == "full":
            lines.append(f"blocks of {config.sparse_block} tokens, full causal layout")
        else:
            stride = f", every {config.sparse_stride}th before" if config.sparse_stride else ""
            lines.append(f"blocks of {config.sparse_block}: {config.sparse_local} local{stride}")
    if config.pos == "rope":
        lines.append("RoPE rotates q and k")
    return title, lines


def _ffn_lines(config: ModelConfig) -> tuple[str, list[str]]:
    """The feed-forward box's title and detail lines."""
    C, F = config.d_model, config.ffn_width
    title = FFN_NAMES.get(config.ffn, config.ffn)
    widths = f"C → F → C: {C} → {F} → {C}"
    if config.ffn == "swiglu":
        return title, ["SiLU(x W₁) ⊙ (x W₂), then W₃", widths]
    if config.ffn == "moe":
        expert = EXPERT_NAMES.get(config.moe_expert, config.moe_expert)
        return title, [f"{config.n_experts} {expert} experts, top-{config.moe_top_k} per token",
                       f"each expert {C} → {F} → {C}"]
    return title, [widths]


def _short_ffn(config: ModelConfig) -> str:
    if config.ffn == "moe":
        expert = EXPERT_NAMES.get(config.moe_expert, config.moe_expert)
        return f"MoE, {config.n_experts} {expert} experts, top-{config.moe_top_k}, F = {config.ffn_width}"
    return f"{FFN_NAMES.get(config.ffn, config.ffn)}, F = {config.ffn_width}"


# ---- the block -----------------------------------------------------------------------------------
def draw_block(config: ModelConfig) -> Figure:
    """One transformer block of `config`, top to bottom: the residual stream as a vertical line,
    and beside it norm1 -> attention -> add, norm2 -> feed-forward -> add.

    Pre-norm (`config.norm_position == "pre"`) puts each norm on the branch, before its sublayer;
    post-norm puts it on the stream itself, after the add. The labels name the norm, the attention
    (heads, key/value heads, window, RoPE) and the feed-forward network (kind and widths) of the
    config, and the stream is annotated with its shape (B, T, C) and C's value.
    """
    config = _check_config(config)
    pre = config.norm_position == "pre"
    norm = _norm_name(config)
    C = config.d_model
    sketch = _Sketch()

    attn_title, attn_lines = _attention_lines(config)
    ffn_title, ffn_lines = _ffn_lines(config)
    sub_w = max(2.6, _box_size(attn_title, attn_lines)[0], _box_size(ffn_title, ffn_lines)[0])
    norm_size = (max(1.2, _box_size(norm, ["norm1"])[0]), _box_size(norm, ["norm1"])[1])
    x_stream = 0.0
    x_norm = x_stream + 0.5 + norm_size[0] / 2
    sub_left = x_norm + norm_size[0] / 2 + 0.45  # the same place in both placements, for comparison
    x_sub = sub_left + sub_w / 2

    # the input at the top, then each sublayer's branch and add, then the output
    inp = sketch.box("input", x_stream, 0.0, f"x: (B, T, C), C = {C}", kind="tensor", bold=False)
    stream_from = (x_stream, inp.bottom)
    y = inp.bottom - 0.32
    sublayers = [("attn", attn_title, attn_lines, "attention"), ("ffn", ffn_title, ffn_lines, "ffn")]
    for i, (name, title, lines, kind) in enumerate(sublayers, start=1):
        sub_h = _box_size(title, lines)[1]
        row = y - max(sub_h, norm_size[1] if pre else 0) / 2
        sketch.dot(x_stream, row)
        sub = sketch.box(name, x_sub, row, title, lines, kind=kind, size=(sub_w, sub_h))
        if pre:
            n = sketch.box(f"norm{i}", x_norm, row, norm, [f"norm{i}"], kind="norm", size=norm_size)
            sketch.arrow((x_stream, row), (n.left, row))
            sketch.arrow((n.right, row), (sub.left, row))
        else:
            sketch.arrow((x_stream, row), (sub.left, row))
        y_add = sub.bottom - 0.34
        add = sketch.add(f"add{i}", x_stream, y_add)
        sketch.path([(x_sub, sub.bottom), (x_sub, y_add), (add.right, y_add)])
        sketch.text((add.right + x_sub) / 2, y_add + 0.05, "(B, T, C)", color=MUTED, style="italic", va="bottom")
        sketch.arrow(stream_from, (x_stream, add.top))
        stream_from = (x_stream, add.bottom)
        y = add.bottom - 0.3
        if not pre:  # post-norm: the norm sits on the stream, after the add
            n = sketch.box(f"norm{i}", x_stream, y - norm_size[1] / 2, norm, [f"norm{i}"], kind="norm",
                           size=norm_size)
            sketch.arrow(stream_from, (x_stream, n.top))
            stream_from = (x_stream, n.bottom)
            y = n.bottom - 0.3
    out = sketch.box("output", x_stream, y - 0.19, "output: (B, T, C)", kind="tensor", bold=False)
    sketch.arrow(stream_from, (x_stream, out.top))

    # the stream's name, along it on the left (left of the norms that sit on it in a post-norm block)
    x_label = x_stream - 0.16 if pre else x_stream - norm_size[0] / 2 - 0.1
    sketch.text(x_label, (inp.bottom + sketch.boxes["add2"].top) / 2, "residual stream", color=MUTED,
                style="italic", rotation=90, ha="right")
    placement = ("pre-norm: each sublayer reads a normalised copy\nof the stream and adds its result to it" if pre
                 else "post-norm: the stream itself is normalised\nafter every add")
    sketch.text(sub_left, out.cy, placement, color=MUTED, style="italic", ha="left")
    return sketch.finish(f"One transformer block, {config.norm_position}-norm, C = {C}")


# ---- the whole model -----------------------------------------------------------------------------
def draw_model(config: ModelConfig) -> Figure:
    """The whole GPT of `config`, top to bottom: token ids (B, T) -> token embedding (V x C), plus a
    position table for learned or sinusoidal positions -> one box for the n_layer blocks -> the final
    norm (pre-norm only) -> lm_head (tied to the token embedding or not) -> logits (B, T, V), which
    softmax turns into next-token probabilities and cross-entropy into the training loss."""
    config = _check_config(config)
    V, C, L, T = config.vocab_size, config.d_model, config.n_layer, config.block_size
    pre = config.norm_position == "pre"
    norm = _norm_name(config)
    sketch = _Sketch()

    attn_title, _ = _attention_lines(config)
    block_lines = [f"{attn_title}: {_heads(config)}", _short_ffn(config), f"{norm}, {config.norm_position}-norm"]
    if config.attention == "sliding_window":
        block_lines[0] = f"sliding-window attention ({config.window}): {_heads(config)}"
    if config.pos == "rope":
        block_lines.append("positions: RoPE rotates q and k in every block")
    head_lines = [f"Linear C → V: {C:,} → {V:,}",
                  "tied: the token embedding's table, transposed" if config.tie_weights
                  else f"its own V × C = {V} × {C} weights (untied)"]
    main = {
        "ids": ("token ids: (B, T)", []),
        "tok_emb": ("token embedding  tok_emb", [f"table V × C = {V:,} × {C}: row i for id i"]),
        "blocks": (f"transformer block × {L}", block_lines),
        "norm_f": ("final norm  norm_f", [norm]),
        "lm_head": ("output head  lm_head", head_lines),
    }
    width = max(3.2, *(_box_size(title, lines)[0] for title, lines in main.values()))
    gap = 0.36

    def stacked(name, top, kind, bold=True):
        title, lines = main[name]
        h = _box_size(title, lines)[1]
        return sketch.box(name, 0.0, top - h / 2, title, lines, kind=kind, size=(width, h), bold=bold)

    def shape(y_from, y_to, label):
        sketch.text(0.1, (y_from + y_to) / 2, label, color=MUTED, style="italic", ha="left")

    ids = stacked("ids", 0.0, "tensor", bold=False)
    tok = stacked("tok_emb", ids.bottom - gap, "embedding")
    sketch.arrow((0, ids.bottom), (0, tok.top))
    shape(ids.bottom, tok.top, "(B, T)")
    above = tok.bottom
    if config.pos in ("learned", "sinusoidal"):
        learned = config.pos == "learned"
        title = "position embedding" if learned else "sinusoidal positions"
        lines = [f"pos_emb: {T:,} × {C} table" if learned else f"a fixed {T:,} × {C} table",
                 "learned, one row per position" if learned else "sines and cosines, no weights"]
        w, h = _box_size(title, lines)
        pos = sketch.box("pos_emb", width / 2 + 0.4 + w / 2, tok.cy, title, lines, kind="embedding", size=(w, h))
        add = sketch.add("add_pos", 0.0, tok.bottom - 0.3 - _ADD_R)
        sketch.arrow((0, tok.bottom), (0, add.top))
        sketch.path([(pos.cx, pos.bottom), (pos.cx, add.cy), (add.right, add.cy)])
        sketch.text((add.right + pos.cx) / 2, add.cy + 0.05, "rows 0 .. T-1", color=MUTED, style="italic",
                    va="bottom")
        above = add.bottom
    blocks_h = _box_size(*main["blocks"])[1]
    blocks_top = above - gap - 0.14
    for k, offset in enumerate((0.14, 0.07) if L > 1 else ()):  # the stack: more blocks behind the first
        fill, edge = PALETTE["block"]
        sketch.ax.add_patch(FancyBboxPatch((-width / 2 + offset, blocks_top - blocks_h + offset), width, blocks_h,
                                           boxstyle="round,pad=0,rounding_size=0.07", facecolor=fill,
                                           edgecolor=edge, lw=1.0, zorder=1.5 + 0.1 * k, gid="stack"))
    blocks = stacked("blocks", blocks_top, "block")
    sketch._extend(blocks.left, blocks.bottom, blocks.right + 0.14, blocks.top + 0.14)
    sketch.arrow((0, above), (0, blocks.top))
    shape(above, blocks.top + 0.14, "(B, T, C)")
    above = blocks.bottom
    if pre:
        norm_f = stacked("norm_f", above - gap, "norm")
        sketch.arrow((0, above), (0, norm_f.top))
        shape(above, norm_f.top, "(B, T, C)")
        above = norm_f.bottom
    head = stacked("lm_head", above - gap, "head")
    sketch.arrow((0, above), (0, head.top))
    shape(above, head.top, "(B, T, C)" if pre else "(B, T, C), normalised by the last block: no final norm")
    if config.tie_weights:  # a dashed bracket on the left joins the two users of the one table
        x_tie = -width / 2 - 0.32
        sketch.path([(head.left, head.cy), (x_tie, head.cy), (x_tie, tok.cy), (tok.left, tok.cy)],
                    color=PALETTE["head"][1], ls="--", lw=1.2, arrow=False)
        sketch.arrow((x_tie, head.cy), (head.left, head.cy), color=PALETTE["head"][1], lw=1.2)
        sketch.arrow((x_tie, tok.cy), (tok.left, tok.cy), color=PALETTE["head"][1], lw=1.2)
        sketch.text(x_tie - 0.08, (head.cy + tok.cy) / 2, "tied: one V × C table", color=PALETTE["head"][1],
                    rotation=90, ha="right")

    # the logits, and what is done with them
    title = f"logits: (B, T, V), V = {V:,}"
    w, h = _box_size(title, bold=False)
    logits = sketch.box("logits", 0.0, head.bottom - gap - h / 2, title, kind="tensor", size=(w, h), bold=False)
    sketch.arrow((0, head.bottom), (0, logits.top))
    sketch.text(0.1, (head.bottom + logits.top) / 2, "(B, T, V)", color=MUTED, style="italic", ha="left")
    uses = [("softmax", "softmax", ["next-token probabilities", "when generating"], -1),
            ("loss", "cross-entropy loss", ["targets y: (B, T)", "when training"], 1)]
    for name, title, lines, side in uses:
        w, h = _box_size(title, lines)
        edge = logits.right if side > 0 else logits.left
        box = sketch.box(name, edge + side * (0.4 + w / 2), logits.cy, title, lines, kind="head", size=(w, h))
        sketch.arrow((edge, logits.cy), (box.left if side > 0 else box.right, logits.cy))
    parts = [f"{L} block{'s' if L > 1 else ''}", f"C = {C}", f"V = {V:,}", f"{config.norm_position}-norm"]
    return sketch.finish("A GPT: " + ", ".join(parts))


# ---- a training step -----------------------------------------------------------------------------
def draw_training_step(grad_accum: int = 1, grad_clip: float = 1.0) -> Figure:
    """One training step as a cycle: a batch (x, y) from the token stream -> forward -> logits ->
    cross-entropy loss -> backward (gradients) -> clip their norm to `grad_clip` -> AdamW step with
    the learning rate of the schedule -> zero the gradients -> the next step's batch.

    With `grad_accum` k > 1 the forward and backward passes repeat for k micro-batches inside a
    dashed frame: each loss is divided by k and the gradients add up before the one optimizer step.
    """
    k = _check_int("grad_accum", grad_accum, 1)
    if isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float)) or not grad_clip >= 0 \
            or grad_clip == float("inf"):
        raise ValueError(f"grad_clip={grad_clip!r} must be a finite number >= 0 (0: no clipping).")
    accumulate = k > 1
    sketch = _Sketch()
    clip_lines = ["scale g so that", f"‖g‖ ≤ {grad_clip:g}"] if grad_clip > 0 else ["grad_clip = 0:",
                                                                                    "no clipping"]
    top = [
        ("batch", "micro-batch i", ["(x, y): B × T tokens", f"i = 1, ..., {k}"], "embedding") if accumulate
        else ("batch", "batch (x, y)", ["B windows of T", "from the stream"], "embedding"),
        ("forward", "forward", ["logits = model(x)", "(B, T, V)"], "attention"),
        ("loss", f"loss / {k}" if accumulate else "loss", ["cross-entropy of", "logits against y"], "head"),
        ("backward", "backward", ["loss.backward()", "g += its gradient" if accumulate else "gradients g"], "norm"),
    ]
    bottom = [  # drawn right to left
        ("clip", "clip", clip_lines, "norm"),
        ("adamw", "AdamW step", ["moves each weight", "by m, v and lr"], "optimizer"),
        ("zero", "zero grads", ["g ← None, or the", "next backward adds"], "optimizer"),
        ("next", "next step", ["step ← step + 1", f"{k} micro-batches" if accumulate else "a new batch"],
         "embedding"),
    ]
    w = max(_box_size(title, lines)[0] for _, title, lines, _ in top + bottom)
    h = max(_box_size(title, lines)[1] for _, title, lines, _ in top + bottom)
    pitch = w + 0.34
    ring = 1.25 if accumulate else 0.95  # vertical gap between the two rows
    y_top, y_bottom = 0.0, -(h + ring)
    for i, (name, title, lines, kind) in enumerate(top):
        sketch.box(name, i * pitch, y_top, title, lines, kind=kind, size=(w, h))
    for i, (name, title, lines, kind) in enumerate(bottom):
        sketch.box(name, (3 - i) * pitch, y_bottom, title, lines, kind=kind, size=(w, h))
    b = sketch.boxes

    def label(x, y, s, **kw):
        sketch.text(x, y, s, color=MUTED, style="italic", **kw)

    for (a, _, _, _), (c, _, _, _) in zip(top, top[1:]):
        sketch.arrow((b[a].right, y_top), (b[c].left, y_top))
    label((b["batch"].right + b["forward"].left) / 2, y_top + 0.05, "x", va="bottom")
    for (a, _, _, _), (c, _, _, _) in zip(bottom, bottom[1:]):
        sketch.arrow((b[a].left, y_bottom), (b[c].right, y_bottom))
    x_right = b["backward"].cx
    frame_bottom = b["batch"].bottom - 0.72  # the frame of the accumulation loop, if there is one
    upper = frame_bottom if accumulate else b["batch"].bottom
    sketch.arrow((x_right, b["backward"].bottom), (x_right, b["clip"].top))
    label(x_right + 0.08, (upper + b["clip"].top) / 2, "g", ha="left")
    sketch.arrow((0.0, b["next"].top), (0.0, b["batch"].bottom))
    label(-0.08, (b["next"].top + upper) / 2, "next\nstep" if accumulate else "next\nbatch", ha="right")
    # the targets go from the batch straight to the loss, over the top
    sketch.arrow((b["batch"].cx + 0.25, b["batch"].top), (b["loss"].cx - 0.25, b["loss"].top),
                 connection="arc3,rad=-0.18", color=PALETTE["embedding"][1])
    apex = b["batch"].top + 0.18 * (b["loss"].cx - b["batch"].cx - 0.5) / 2 + 0.04  # half way to the control point
    sketch.text(pitch, apex, "targets y", color=PALETTE["embedding"][1], style="italic", va="bottom")
    # the learning rate comes from the schedule, below the optimizer
    sched = sketch.box("schedule", b["adamw"].cx, y_bottom - h / 2 - 0.4 - 0.28, "learning-rate schedule",
                       ["lr = lr_at(step): warmup, cosine"], kind="schedule")
    sketch.arrow((sched.cx, sched.top), (b["adamw"].cx, b["adamw"].bottom), ls="--", color=PALETTE["schedule"][1])
    label(sched.cx + 0.08, (sched.top + b["adamw"].bottom) / 2, "lr", ha="left")

    if accumulate:  # the inner loop: a frame around the top row, and the arrow back to the next micro-batch
        x0, x1 = b["batch"].left - 0.1, b["backward"].right + 0.1
        y1 = apex + 0.3
        y0 = frame_bottom
        sketch.ax.add_patch(FancyBboxPatch((x0, y0), x1 - x0, y1 - y0, boxstyle="round,pad=0,rounding_size=0.12",
                                           facecolor="none", edgecolor=MUTED, lw=1.1, ls="--", zorder=1,
                                           gid="frame:accumulation"))
        sketch._extend(x0, y0, x1, y1)
        sketch.arrow((b["backward"].cx - 0.25, b["backward"].bottom), (b["batch"].cx + 0.25, b["batch"].bottom),
                     connection="arc3,rad=-0.07", color=MUTED)
        sketch.text(x_right / 2, y0 + 0.08, f"repeated {k} times: the gradients add up to those of one batch "
                    f"of {k} × B windows", color=MUTED, style="italic", va="bottom")
        title = f"One training step with gradient accumulation over {k} micro-batches"
    else:
        title = "One training step"
    return sketch.finish(title)


# ---- the KV cache --------------------------------------------------------------------------------
def draw_kv_cache(prompt_len: int = 5, step: int = 3, n_layer: int = 2) -> Figure:
    """The KV cache at decoding step `step` (1 = the first token after the prompt).

    Columns are positions, rows the keys K and values V of each of `n_layer` layers. The prompt's
    `prompt_len` positions were cached at prefill, the `step - 1` tokens generated before are
    cached too, and the new token at position `prompt_len + step - 1` appends its k and v
    (highlighted) while its query attends to every cached key of its layer, its own included.
    """
    P = _check_int("prompt_len", prompt_len, 1)
    s = _check_int("step", step, 1)
    layers = _check_int("n_layer", n_layer, 1, MAX_CACHE_LAYERS)
    n = P + s
    if n > MAX_CACHE_POSITIONS:
        raise ValueError(f"prompt_len + step = {P} + {s} = {n} positions do not fit in a readable picture; "
                         f"keep prompt_len + step <= {MAX_CACHE_POSITIONS}.")
    new = n - 1
    sketch = _Sketch()
    cw = min(0.5, 4.8 / n)          # cell pitch
    cell_w, cell_h, row_pitch, layer_gap = cw - 0.06, 0.3, 0.37, 0.22
    x_of = [j * cw + cw / 2 for j in range(n)]
    group = ["prompt"] * P + ["generated"] * (s - 1) + ["new"]

    rows = []  # (layer, "K" | "V", y)
    y = 0.0
    for layer in range(1, layers + 1):
        for kind in ("K", "V"):
            rows.append((layer, kind, y))
            y -= row_pitch
        y -= layer_gap
    for layer, kind, y in rows:
        for j in range(n):
            fill, edge = CACHE[group[j]]
            is_new = group[j] == "new"
            sketch.ax.add_patch(Rectangle((x_of[j] - cell_w / 2, y - cell_h / 2), cell_w, cell_h, facecolor=fill,
                                          edgecolor=edge, lw=2.0 if is_new else 1.0, zorder=2,
                                          gid=f"cell:{group[j]}"))
            if cw >= 0.4:
                sketch.text(x_of[j], y, f"{kind.lower()}{j}", size=SMALL_PT, color=INK)
        name = "keys K" if kind == "K" else "values V"
        sketch.text(-0.12, y, f"layer {layer}  {name}" if kind == "K" else name, ha="right",
                    weight="bold" if kind == "K" else "normal")
    grid_top = rows[0][2] + cell_h / 2
    grid_bottom = rows[-1][2] - cell_h / 2
    sketch._extend(0, grid_bottom, n * cw, grid_top)

    # the new token's query, above its column, attends to every key of layer 1 (its own included)
    q_title, q_lines = "q of the new token", [f"position {new}"]
    qw, qh = _box_size(q_title, q_lines)
    q_cx = min(x_of[new], n * cw - qw / 2)
    q = sketch.box("query", q_cx, grid_top + 1.05 + qh / 2, q_title, q_lines, kind="attention", size=(qw, qh))
    x_from = min(max(x_of[new], q.left + 0.1), q.right - 0.1)
    for j in range(n):
        sketch.arrow((x_from, q.bottom), (x_of[j], grid_top + 0.02),
                     color=PALETTE["attention"][1], lw=0.9, gid="attend")
    sketch.text(q.left - 0.15, q.cy, f"attends to all {n} keys\nof its layer", color=MUTED, style="italic",
                ha="right")

    # the new k, v are appended: an arrow into the new column from the right
    y_first = (rows[0][2] + rows[1][2]) / 2
    x_new_right = x_of[new] + cell_w / 2
    sketch.arrow((x_new_right + 0.55, y_first), (x_new_right + 0.04, y_first), color=CACHE["new"][1])
    sketch.text(x_new_right + 0.62, y_first, "the new k, v,\nappended", color=CACHE["new"][1],
                ha="left")

    # positions, and brackets that say which are which
    y_pos = grid_bottom - 0.16
    for j in range(n):
        sketch.text(x_of[j], y_pos, str(j), color=MUTED, va="top")
    y_br = y_pos - 0.3
    spans = [("prompt", 0, P - 1, ["prompt, cached at prefill", "prompt"])]
    if s > 1:
        spans.append(("generated", P, new - 1, [f"generated: {s - 1}", "generated"]))
    spans.append(("new", new, new, ["new"]))
    ends = []  # right end of the last label on each line below the brackets
    for key, a, b, texts in spans:
        x0, x1 = x_of[a] - cell_w / 2, x_of[b] + cell_w / 2
        edge = CACHE[key][1]
        sketch.path([(x0, y_br + 0.08), (x0, y_br), (x1, y_br), (x1, y_br + 0.08)], color=edge, arrow=False)
        fits = [t for t in texts if _measure(t, SMALL_PT, style="italic")[0] <= x1 - x0 + 0.1]
        text = fits[0] if fits else texts[-1]  # the long label where it fits under its bracket
        w = _measure(text, SMALL_PT, style="italic")[0]
        left = (x0 + x1) / 2 - w / 2
        line = next((i for i, end in enumerate(ends) if left > end + 0.12), len(ends))
        if line == len(ends):
            ends.append(left + w)
        ends[line] = left + w
        sketch.text((x0 + x1) / 2, y_br - 0.07 - 0.2 * line, text, color=edge, va="top", style="italic")
    sketch.text(-0.12, y_pos, "position", color=MUTED, ha="right", va="top")
    done = f"{P} prompt + {s - 1} generated" if s > 1 else f"the {P} prompt positions"
    title = (f"KV cache at decoding step {s}: {done} positions are cached;\n"
             f"the new token (position {new}) appends its k, v; its query attends to all {n} keys")
    return sketch.finish(title)
