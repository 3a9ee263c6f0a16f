"""Helpers the book's notebooks use: show library source, draw plots that update while training.

Nothing here is needed to use `lm`; it keeps the chapters short. matplotlib and IPython come with
the `book` extra (`pip install "lm[book]"`), so they are imported inside the helpers that draw.
"""

from __future__ import annotations

import csv
import html
import inspect
import io
import textwrap
from pathlib import Path

import numpy as np

# Chapter 5 draws the parameter breakdown; the one computation of it lives beside count_params.
from .presets import PARAM_GROUPS, param_breakdown  # noqa: F401
# The chapters' name for lm.assets.path: asset("gpu_decode.json") is a file of the installed package.
from .assets import path as asset  # noqa: F401
from .optim import lr_at
from .trainer import TrainHistory


def show_source(obj):
    """The source code of a function or class of `lm`, syntax-highlighted for a notebook."""
    from IPython.display import HTML
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer

    source = textwrap.dedent(inspect.getsource(obj))
    module = inspect.getmodule(obj).__name__
    formatter = HtmlFormatter(nowrap=False, cssclass="lm-source", style="friendly")
    css = formatter.get_style_defs(".lm-source")
    title = f"<div style='font-size:0.85em;color:#666'>source of <code>{module}.{obj.__qualname__}</code></div>"
    return HTML(f"<style>{css}</style>{title}{highlight(source, PythonLexer(), formatter)}")


def plot_history(history: TrainHistory, ax=None, smooth: int = 10):
    """Training loss per step (raw and smoothed) and the evaluation losses, on one axis."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(history.step, history.loss, color="#b0c4de", lw=0.8, label="batch loss")
    if len(history.loss) >= smooth:
        smoothed = np.convolve(history.loss, np.full(smooth, 1.0 / smooth), mode="valid")
        ax.plot(history.step[smooth - 1 :], smoothed, color="#1f4e79", lw=1.5, label=f"mean of {smooth}")
    if history.eval_step:
        ax.plot(history.eval_step, history.train_loss, "o-", color="#2e8b57", ms=4, label="train (eval)")
        ax.plot(history.eval_step, history.val_loss, "s-", color="#c0392b", ms=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return ax


class LivePlot:
    """A loss plot that redraws in place each time it is called with a `TrainHistory`.

    Pass it as `callback=` to `lm.train`; in a notebook the figure updates after every
    evaluation, and the last drawing stays in the saved output.
    """

    def __init__(self, title: str = "training", figsize=(7, 3.5)):
        from IPython.display import display

        self.title = title
        self.figsize = figsize
        self.handle = display(self._placeholder(), display_id=True)

    def _placeholder(self):
        from IPython.display import Markdown

        return Markdown(f"*{self.title}: waiting for the first evaluation...*")

    def __call__(self, history: TrainHistory) -> None:
        from IPython.display import Image
        from matplotlib.figure import Figure

        fig = Figure(figsize=self.figsize, dpi=100)
        ax = fig.add_subplot()
        plot_history(history, ax=ax)
        ax.set_title(self.title)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        self.handle.update(Image(buffer.getvalue()))



# ---- tokens ----------------------------------------------------------------------------------
TOKEN_COLOURS = ("#fde2e4", "#e2ece9", "#dfe7fd", "#fff1c1", "#e8dff5", "#d7f0f7", "#fbe7c6", "#e4f1d0")


def token_pieces(tokenizer, ids) -> list[str]:
    """Each id's own piece of text, for display. A byte-level token that holds only part of a
    UTF-8 character is shown as its bytes in hex (e.g. `<F0 9F>`); SentencePiece shows its pieces."""
    if hasattr(tokenizer, "id_to_piece"):  # SentencePiece names its pieces: "▁the", "<0xF0>"
        return [tokenizer.id_to_piece(i) for i in ids]
    pieces = []
    for i in ids:
        raw = tokenizer.token_bytes(i) if hasattr(tokenizer, "token_bytes") else None
        if raw is None:
            pieces.append(tokenizer.decode([i]))
            continue
        try:
            pieces.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            pieces.append("<" + " ".join(f"{b:02X}" for b in raw) + ">")
    return pieces


def tokens_html(text: str, tokenizers: dict) -> str:
    """HTML that shows `text` split by each named tokenizer, one coloured box per token."""
    rows = []
    for name, tokenizer in tokenizers.items():
        ids = tokenizer.encode(text)
        spans = []
        for k, piece in enumerate(token_pieces(tokenizer, ids)):
            shown = html.escape(piece).replace(" ", "&nbsp;").replace("\n", "\u21b5")
            colour = TOKEN_COLOURS[k % len(TOKEN_COLOURS)]
            spans.append(f"<span title='id {ids[k]}' style='background:{colour};padding:1px 0;"
                         f"margin-right:1px;border-radius:3px;font-family:monospace'>{shown}</span>")
        ratio = len(text) / max(1, len(ids))
        rows.append(f"<tr><td style='text-align:left;padding-right:1em;white-space:nowrap'><b>{html.escape(name)}</b>"
                    f"<br><small>{len(ids)} tokens, {ratio:.2f} chars/token</small></td>"
                    f"<td style='text-align:left;line-height:1.9'>{''.join(spans)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def show_tokens(text: str, tokenizers: dict):
    """Display `tokens_html` in a notebook."""
    from IPython.display import HTML

    return HTML(tokens_html(text, tokenizers))


# ---- attention -------------------------------------------------------------------------------
def _position_label(piece: str) -> str:
    """A token's text as an axis label: whitespace made visible, long pieces shortened."""
    shown = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}.get(piece, piece)
    shown = shown.replace("\n", "\u21b5")
    return shown if len(shown) <= 8 else shown[:7] + "\u2026"


def plot_attention(weights, tokens, ax=None, title: str | None = None, labels: bool = True, cmap: str = "Blues"):
    """Heatmap of one head's attention: row t is query position t, and shows how much of each
    earlier (key) position it takes in. The upper triangle, which a causal head never reads, is
    left blank.

    weights: one (T, T) matrix (a tensor or array: pick a batch element and a head, `w[0, h]`).
    tokens: T strings, one per position, for the axes. Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if hasattr(weights, "detach"):
        weights = weights.detach().float().cpu().numpy()
    w = np.asarray(weights, dtype=float)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"weights must be one (T, T) matrix, got shape {w.shape}; "
                         f"from a (B, H, T, T) tensor pick a batch element and a head, e.g. weights[0, h].")
    T = w.shape[0]
    if len(tokens) != T:
        raise ValueError(f"got {len(tokens)} tokens for a {T} x {T} weight matrix; pass one label per position.")
    if ax is None:
        side = min(9.0, 2.5 + 0.12 * T)
        _, ax = plt.subplots(figsize=(side, side))
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    ax.imshow(np.ma.masked_where(future, w), cmap=cmap, vmin=0.0, interpolation="nearest")
    if labels:
        names = [_position_label(t) for t in tokens]
        size = 8 if T <= 40 else 6
        ax.set_xticks(range(T), names, fontsize=size)
        ax.set_yticks(range(T), names, fontsize=size)
        ax.set_xlabel("key position (read from)")
        ax.set_ylabel("query position (reading)")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9 if not labels else None)
    return ax


def plot_attention_grid(weights, tokens, batch_index: int = 0, size: float = 2.0):
    """Every head of every layer in one figure: `weights` is the list that `GPT.attention_weights`
    returns, one (B, H, T, T) tensor per layer. Rows are layers, columns heads. Returns the Figure."""
    import matplotlib.pyplot as plt

    if len(weights) == 0 or any(w.dim() != 4 for w in weights):
        raise ValueError("weights must be a non-empty list of (B, H, T, T) tensors, one per layer, "
                         "as GPT.attention_weights(idx) returns.")
    n_layer, n_head = len(weights), weights[0].size(1)
    fig, axes = plt.subplots(n_layer, n_head, figsize=(size * n_head, size * n_layer), squeeze=False)
    for layer, w in enumerate(weights):
        for head in range(w.size(1)):
            plot_attention(w[batch_index, head], tokens, ax=axes[layer, head], labels=False,
                           title=f"layer {layer}, head {head}")
    fig.tight_layout()
    return fig


# ---- training --------------------------------------------------------------------------------
def plot_lr_schedule(lr: float, min_lr: float, warmup_steps: int, max_steps: int, ax=None, label: str | None = None):
    """The learning rate `lm.optim.lr_at` gives at every step from 0 to `max_steps`, with its
    landmarks: the end of warmup (where the peak `lr` is reached), the middle of the cosine (half-way
    between `lr` and `min_lr`) and the floor `min_lr`. The schedule is the Axes' first line.
    Returns the matplotlib Axes."""
    import matplotlib.pyplot as plt

    if not (isinstance(max_steps, int) and max_steps >= 1 and isinstance(warmup_steps, int)
            and 0 <= warmup_steps <= max_steps):
        raise ValueError(f"need integers 0 <= warmup_steps <= max_steps and max_steps >= 1, got "
                         f"warmup_steps={warmup_steps!r}, max_steps={max_steps!r}.")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    steps = np.arange(max_steps + 1)
    ax.plot(steps, [lr_at(int(s), lr, min_lr, warmup_steps, max_steps) for s in steps], color="#1f4e79",
            lw=1.8, label=label or "learning rate")
    if warmup_steps:
        ax.axvline(warmup_steps - 1, color="#c0392b", ls="--", lw=1, label=f"end of warmup: step {warmup_steps - 1}")
    middle = warmup_steps + (max_steps - warmup_steps) / 2
    ax.plot([middle], [(lr + min_lr) / 2], "o", color="#2e8b57", ms=5, label="half-way down the cosine")
    ax.axhline(min_lr, color="#999999", ls=":", label=f"min_lr = {min_lr:.1e}")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return ax


METRIC_INT_COLUMNS = ("step", "tokens")


def read_metrics(path) -> dict[str, list]:
    """The columns of a `metrics.csv` that `lm.train` writes to its out_dir, as lists:
    `{"step": [0, 1, ...], "loss": [...], "val_loss": [None, ..., 2.51], ...}`.

    One row per optimizer step. Steps and token counts are ints, the other values floats; a blank
    cell is None (train_loss and val_loss are only filled at the steps that were evaluated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; lm.train writes metrics.csv into "
                                f"TrainConfig(out_dir=...), so train with an out_dir first.")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns: dict[str, list] = {name: [] for name in reader.fieldnames or ()}
        for row in reader:
            for name, text in row.items():
                if text in ("", None):
                    value = None
                else:
                    value = int(text) if name in METRIC_INT_COLUMNS else float(text)
                columns[name].append(value)
    return columns


# ---- sampling --------------------------------------------------------------------------------
def plot_next_token(probs, labels, ax=None, top: int = 20, title: str | None = None, color: str = "#1f4e79",
                    order=None):
    """Bar chart of a next-token distribution: the `top` most likely tokens, most likely first.

    probs: V probabilities (a tensor or array; one row of a softmax). labels: a tokenizer (each id is
    decoded to its text) or V strings. `order`: token ids to show instead of this distribution's own
    top ones, so that several panels (e.g. before and after a filter) show the same tokens in the same
    place. Whitespace is made visible (␣, ↵). Returns the matplotlib Axes."""
    import matplotlib.pyplot as plt

    if hasattr(probs, "detach"):
        probs = probs.detach().float().cpu().numpy()
    p = np.asarray(probs, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"probs must be one distribution of shape (V,), got shape {p.shape}; "
                         f"from a (B, V) tensor pick a row, e.g. probs[0].")
    if order is None:
        order = np.argsort(-p, kind="stable")[:top]
    order = [int(i) for i in order]
    if hasattr(labels, "decode"):
        names = [labels.decode([i]) for i in order]
    else:
        if len(labels) != len(p):
            raise ValueError(f"got {len(labels)} labels for {len(p)} probabilities; pass one label per token "
                             f"or a tokenizer.")
        names = [labels[i] for i in order]
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 2.8))
    ax.bar(range(len(order)), p[order], color=color)
    ax.set_xticks(range(len(order)), [_position_label(n) for n in names], fontsize=8)
    ax.set_ylabel("probability")
    ax.set_ylim(0, max(1e-9, float(p[order].max())) * 1.15)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return ax
