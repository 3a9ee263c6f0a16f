"""Causal self-attention and its variants, chosen by name with `ModelConfig(attention=...)`.

    name             each query at position t sees                     cost per layer (time, memory)
    sdpa / manual    every key s <= t                                  O(T^2 D), O(T^2) (sdpa: less)
    sliding_window   keys t-window+1 .. t                              O(T window D)
    block_sparse     its own block, `sparse_local` earlier blocks and  O(T (T/stride + local block) D)
                     every "summary" block (index % stride == stride-1)
    linear           all keys s <= t, through a kernel feature map     O(T D^2), no T x T matrix

Three files:
- `masks`: which keys a query may see, as patterns on positions and as (T, T) matrices;
- `kernels`: the arithmetic (softmax attention written out and fused, block-local and linear
  attention), functions of q, k, v with no parameters;
- `modules`: the layers (`CausalSelfAttention` and its variants), which hold the projections and
  choose a kernel.

Padding. `attention_mask` (B, T) marks real tokens True and padding False. Padded keys get zero
weight. The rows of padded queries are finite but meaningless (each padded query sees at least
itself). Pad on the LEFT for batched generation: causal attention then needs the mask, and with
RoPE (relative) the real tokens' outputs equal an unpadded run exactly. Right padding needs no mask
at all in a causal model (padding comes after every real token). Absolute positions (learned,
sinusoidal) shift under left padding; `block_sparse` blocks are laid out on absolute positions
too, so it is exact under left padding only for pads that are a multiple of
sparse_block * sparse_stride.

Packing. A (B, T, T) `attention_mask` (True where query i may see key j; `document_mask` builds
it from document ids) keeps several examples packed into one row apart. Softmax variants apply
it through the masked path; linear attention has no T x T matrix to mask and refuses it. With RoPE
a packed example's outputs equal those of the example alone; with absolute positions it sees
the positions where it sits in the row.
"""

from .kernels import (
    attend_over, causal_linear_attention, elu_feature_map, linear_attention_weights, local_block_attention,
    manual_causal_attention, masked_attention, repeat_kv, sdpa,
)
from .masks import (
    block_sparse, block_sparse_layout, block_sparse_mask, causal, causal_mask, document_mask, sliding_window,
    sliding_window_mask, with_padding,
)
from .modules import BlockSparseAttention, CausalSelfAttention, LinearAttention, SlidingWindowAttention

__all__ = [
    "BlockSparseAttention", "CausalSelfAttention", "LinearAttention", "SlidingWindowAttention", "attend_over",
    "block_sparse", "block_sparse_layout", "block_sparse_mask", "causal", "causal_linear_attention", "causal_mask", "document_mask",
    "elu_feature_map", "linear_attention_weights", "local_block_attention", "manual_causal_attention",
    "masked_attention", "repeat_kv", "sdpa", "sliding_window", "sliding_window_mask", "with_padding",
]
