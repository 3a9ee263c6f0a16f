"""Position encodings: how a model knows where each token is.

Attention by itself is blind to order: permute the tokens and every output is permuted the same
way. Four ways to tell the model about positions, chosen by `ModelConfig.pos`:

- "learned": a trainable (block_size, C) table added to the token embeddings (GPT-2);
- "sinusoidal": the fixed sine/cosine table of "Attention Is All You Need", added the same way;
- "rope": rotary position embedding (RoFormer, LLaMA). Nothing is added; instead every attention
  layer rotates each query and key by an angle proportional to its position, so that the score
  q_t . k_s depends on t - s only;
- "none": no position information at all (a causal model can still infer some from the mask).

    additive, rope = build_positions(config)
    x = tok_emb(idx) + additive(T)        # when additive is not None
    y = attn(x, rope=rope)                # when rope is not None: one RotaryEmbedding, every layer

RoPE here follows the Hugging Face Llama convention exactly: the head dimension D is split into a
first and a second half (`rotate_half`), not into interleaved (even, odd) pairs, so a LLaMA export
is a plain weight copy with no permutation of the q/k projection rows.
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_kernels
from .config import ModelConfig
from .registry import POSITIONS


# ---- sinusoidal --------------------------------------------------------------------------------
def sinusoidal_table(T: int, C: int, offset: int = 0, base: float = 10000.0) -> torch.Tensor:
    """(T, C) float32 table for positions offset .. offset+T-1:

        PE[p, 2i]   = sin(p / base^(2i / C))
        PE[p, 2i+1] = cos(p / base^(2i / C))

    Sines and cosines are interleaved, as in Vaswani et al. (2017). For odd C the last column
    is a sine.
    """
    position = torch.arange(offset, offset + T, dtype=torch.float32)[:, None]  # (T, 1)
    inv_freq = base ** (-torch.arange(0, C, 2, dtype=torch.float32) / C)  # (ceil(C/2),)
    angles = position * inv_freq  # (T, ceil(C/2))
    table = torch.zeros(T, C)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : C // 2])
    return table


def table_rows(table: torch.Tensor, T: int, offset) -> torch.Tensor:
    """Rows offset .. offset+T-1 of a (positions, ...) table.

    `offset` is an int, or a 0-d long tensor on the table's device: then the rows are gathered on
    the device and no shape depends on the position, so one decoding step can be captured as a
    CUDA graph and replayed at every position (`lm.cuda_graph`). A (B,) tensor gives each row of a
    batch its own offset (`lm.serving`, where requests sit at different positions): (B, T, ...)."""
    if isinstance(offset, torch.Tensor):
        steps = torch.arange(T, device=table.device)
        if offset.dim() == 1:
            return table[offset[:, None] + steps]
        return table.index_select(0, offset + steps)
    return table[offset : offset + T]


@POSITIONS.register("learned")
class LearnedPositionEmbedding(nn.Embedding):
    """A trainable table of block_size position vectors (GPT-2). It *is* an `nn.Embedding`, so its
    parameter is `<name>.weight` and the model's embedding initialisation applies to it."""

    def __init__(self, config: ModelConfig):
        super().__init__(config.block_size, config.d_model)

    @staticmethod
    def param_count(config: ModelConfig) -> int:
        return config.block_size * config.d_model

    def forward(self, T: int, offset=0) -> torch.Tensor:
        """Embeddings of positions offset .. offset+T-1: (T, C). offset: int or 0-d tensor."""
        if not isinstance(offset, torch.Tensor) and offset + T > self.num_embeddings:
            raise ValueError(
                f"positions up to {offset + T - 1} requested but the learned table has {self.num_embeddings} "
                f"(block_size); crop the input to block_size tokens or use pos='rope'/'sinusoidal'."
            )
        return table_rows(self.weight, T, offset)


@POSITIONS.register("sinusoidal")
class SinusoidalPositionEmbedding(nn.Module):
    """The fixed sine/cosine table, kept as a non-persistent buffer (it is not learned, so it is not
    saved in checkpoints) and grown on demand past block_size."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.d_model = config.d_model
        self.register_buffer("table", sinusoidal_table(config.block_size, config.d_model), persistent=False)

    @staticmethod
    def param_count(config: ModelConfig) -> int:
        return 0

    def forward(self, T: int, offset=0) -> torch.Tensor:
        """Encodings of positions offset .. offset+T-1: (T, C). offset: int or 0-d tensor (within
        the table: a tensor offset never grows it)."""
        if not isinstance(offset, torch.Tensor) and offset + T > self.table.size(0):
            self.table = sinusoidal_table(offset + T, self.d_model).to(self.table.device)
        return table_rows(self.table, T, offset)


@POSITIONS.register("none")
class NoPositionEmbedding(nn.Module):
    """No position information. `forward` returns None so the caller adds nothing; `build_positions`
    returns (None, None) for this choice."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()

    @staticmethod
    def param_count(config: ModelConfig) -> int:
        return 0

    def forward(self, T: int, offset: int = 0) -> None:
        return None


# ---- rotary ------------------------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): [x1, x2] -> [-x2, x1], with x1, x2 the first and second halves of D.

    Together with `apply_rotary` this rotates each pair (x[i], x[i + D/2]) by an angle, the pairing
    Hugging Face Llama uses (not the (x[2i], x[2i+1]) pairs of the RoFormer paper)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, D) by the angles whose cos and sin are given as (T, D) tables."""
    return x * cos + rotate_half(x) * sin


def rope_tables(
    T: int, head_dim: int, base: float = 10000.0, offset: int = 0, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, D), float32, for positions offset .. offset+T-1.

    Pair i (of D/2) turns by angle p * base^(-2i/D) at position p: fast near i = 0, slow at the end.
    Both halves of D repeat the same D/2 angles, to match `rotate_half`."""
    # written as Hugging Face writes it, so the float32 tables match theirs bit for bit
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))  # (D/2,)
    position = torch.arange(offset, offset + T, dtype=torch.float32, device=device)
    angles = torch.outer(position, inv_freq)  # (T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


@POSITIONS.register("rope")
class RotaryEmbedding(nn.Module):
    """Rotary position embedding for one head size, shared by every attention layer of a model.

        rope = RotaryEmbedding(head_dim, max_seq_len=block_size, base=rope_base)
        q, k = rope(q, k)                 # q: (B, H, T, D), k: (B, H_kv, T, D), positions 0 .. T-1
        q, k = rope(q, k, offset=n)       # positions n .. n+T-1 (new tokens after a KV cache of n)

    cos/sin are cached as non-persistent float32 buffers (derived, so not in checkpoints), grown
    when offset + T exceeds the cache, rebuilt in float32 if the module was cast to a lower
    precision, and cast to q's dtype on use.
    """

    def __init__(self, head_dim: int, max_seq_len: int = 2048, base: float = 10000.0):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"RoPE rotates pairs of channels, so head_dim={head_dim} must be even; "
                             f"change d_model or n_head so that d_model // n_head is even.")
        if base <= 1.0:
            raise ValueError(f"rope_base={base} must be > 1 (10000.0 is the usual value).")
        self.head_dim = head_dim
        self.base = float(base)
        cos, sin = rope_tables(max_seq_len, head_dim, self.base)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    @staticmethod
    def param_count(config: ModelConfig) -> int:
        return 0

    @classmethod
    def from_config(cls, config: ModelConfig) -> "RotaryEmbedding":
        return cls(config.head_dim, max_seq_len=config.block_size, base=config.rope_base)

    def tables(self, T: int, offset=0, dtype: torch.dtype = torch.float32):
        """cos, sin (T, D) for positions offset .. offset+T-1, in `dtype`. offset: int, or a 0-d
        tensor (positions within the cached tables; nothing is rebuilt then)."""
        length = self.cos_cached.size(0)
        grow = not isinstance(offset, torch.Tensor) and offset + T > length
        if grow or self.cos_cached.dtype != torch.float32:
            length = offset + T if grow else length
            self.cos_cached, self.sin_cached = rope_tables(length, self.head_dim, self.base,
                                                           device=self.cos_cached.device)
        return (table_rows(self.cos_cached, T, offset).to(dtype), table_rows(self.sin_cached, T, offset).to(dtype))

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset=0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q (B, H, T, D) and k (B, H_kv, T, D) for positions offset .. offset+T-1: offset an
        int, a 0-d tensor, or a (B,) tensor (each row at its own position, `lm.serving`)."""
        cos, sin = self.tables(q.size(-2), offset, q.dtype)
        if cos.dim() == 2 and self._in_c(q, k):  # float32 training on a CPU: the same numbers, in C (chapter 6)
            return cpu_kernels.rope(q, cos, sin), cpu_kernels.rope(k, cos, sin)
        if cos.dim() == 3:  # (B, T, D): one table per row, the same for every head
            cos, sin = cos[:, None], sin[:, None]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    @staticmethod
    def _in_c(q: torch.Tensor, k: torch.Tensor) -> bool:
        """Whether q and k are rotated by lm's C kernel (`lm.cpu_kernels.rope`): float32 training on a CPU, no
        autocast and no torch.compile (`float32_training`), heads the kernel takes."""
        return (q.dim() == k.dim() == 4 and q.numel() > 0 and k.numel() > 0 and k.dtype == torch.float32
                and cpu_kernels.float32_training(q) and cpu_kernels.float32_training(k)
                and cpu_kernels.rope_unavailable(q.size(-1)) is None)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}, cached={self.cos_cached.size(0)}"


# ---- building from a config --------------------------------------------------------------------
def build_positions(config: ModelConfig) -> tuple[nn.Module | None, RotaryEmbedding | None]:
    """(additive, rope) for `config.pos`.

    additive: a module with forward(T, offset=0) -> (T, C) that the model adds to the token
    embeddings ("learned", "sinusoidal"), else None. rope: the one RotaryEmbedding the model passes
    to every attention layer ("rope"), else None. "none" gives (None, None).
    """
    cls = POSITIONS.get(config.pos)
    if cls is RotaryEmbedding:
        return None, RotaryEmbedding.from_config(config)
    if cls is NoPositionEmbedding:
        return None, None
    return cls(config), None


__all__ = [
    "LearnedPositionEmbedding", "NoPositionEmbedding", "RotaryEmbedding", "SinusoidalPositionEmbedding",
    "apply_rotary", "build_positions", "rope_tables", "rotate_half", "sinusoidal_table", "table_rows",
]
