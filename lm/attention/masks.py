"""Which keys each query may see, as boolean masks (True = may attend).

Two forms of the same rules:

- patterns on positions, `allowed(query_pos, key_pos)` for broadcastable tensors of absolute
  positions: `causal`, `sliding_window`, `block_sparse`. A KV cache calls them with the positions
  its keys really hold (a rolling buffer holds them out of order);
- (T, T) matrices over a whole sequence, built from the patterns: `causal_mask`,
  `sliding_window_mask`, `block_sparse_mask` (and the block-level `block_sparse_layout`).

`with_padding` adds a padding mask (B, T) to a (T, T) matrix.
"""

from __future__ import annotations

import torch


# ---- patterns on positions -----------------------------------------------------------------------
def causal(query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """A query sees the keys at its own position and before."""
    return key_pos <= query_pos


def sliding_window(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """A query at t sees the keys t-window+1 .. t: `window` keys, itself included."""
    distance = query_pos - key_pos
    return (distance >= 0) & (distance < window)


def block_sparse(query_pos: torch.Tensor, key_pos: torch.Tensor, block: int, local: int, stride: int,
                 pattern: str = "local_strided") -> torch.Tensor:
    """Causal, and on top of that by blocks of `block` positions: query block i sees key block j
    when j is one of the `local` blocks before i (or i itself), or a "summary" block
    (j % stride == stride - 1; none when stride == 0). pattern "full": every earlier block."""
    allowed = causal(query_pos, key_pos)
    if pattern == "full":
        return allowed
    query_block, key_block = query_pos // block, key_pos // block
    near = query_block - key_block <= local
    if stride > 0:
        near = near | (key_block % stride == stride - 1)
    return allowed & near


# ---- (T, T) matrices -----------------------------------------------------------------------------
def grid(T: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions (T, 1) and key positions (1, T), to evaluate a pattern on every pair."""
    t = torch.arange(T, device=device)
    return t[:, None], t[None, :]


def causal_mask(T: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) boolean mask, True where a query may look at a key (key position <= query position)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def sliding_window_mask(T: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) boolean mask: query t sees keys t-window+1 .. t (window keys, itself included)."""
    return sliding_window(*grid(T, device), window)


def block_sparse_layout(n_blocks: int, local: int, stride: int, pattern: str = "local_strided",
                        device: torch.device | None = None) -> torch.Tensor:
    """(n_blocks, n_blocks) boolean block layout, True where query block i may look at key block j:
    `block_sparse` with blocks of one position."""
    return block_sparse(*grid(n_blocks, device), 1, local, stride, pattern)


def block_sparse_mask(T: int, block: int, local: int, stride: int, pattern: str = "local_strided",
                      device: torch.device | None = None) -> torch.Tensor:
    """(T, T) token mask of `block_sparse`: blocks of `block` positions, causal inside."""
    return block_sparse(*grid(T, device), block, local, stride, pattern)


def with_padding(mask: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Combine a (T, T) layout with a padding mask into (B, 1, T, T).

    attention_mask (B, T), True = real token: padded keys are hidden. Or (B, T, T), True where
    query i may see key j: a document mask for packed sequences (several examples in one row, each
    seeing only its own tokens), applied on top of the layout.

    Every query keeps its own position, so a padded query whose keys are all padding still has
    one key and its softmax row stays finite instead of NaN; for a real query its own position is
    already allowed, so nothing changes there.
    """
    if attention_mask is None:
        return mask
    T = mask.size(-1)
    if attention_mask.dim() == 3:
        may_see = attention_mask[:, None, :, :].bool()  # (B, 1, T, T)
    else:
        may_see = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
    itself = torch.eye(T, dtype=torch.bool, device=mask.device)
    return mask & (may_see | itself)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids of the document each position belongs to -> (B, T, T), True where query i and
    key j are in the same document: with the causal mask, each packed example sees only itself."""
    return document_ids[:, :, None] == document_ids[:, None, :]


__all__ = [
    "block_sparse", "block_sparse_layout", "block_sparse_mask", "causal", "causal_mask", "document_mask", "grid",
    "sliding_window", "sliding_window_mask", "with_padding",
]
