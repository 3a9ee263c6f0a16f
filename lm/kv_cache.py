"""The KV cache: keys and values of tokens already seen, so each new token costs one position.

Without a cache, generating token t runs the model over all t tokens again. Yet the keys and values
of tokens 0 .. t-1 do not change (a causal model never lets a token see the future), so they can
be kept: each step then computes q, k, v for the one new token, appends k and v, and attends over
the stored ones. Per token the work drops from O(t) positions to one.

    cache = KVCache(model, batch_size=1, max_len=512)
    logits, _ = model(prompt_ids, cache=cache)          # prefill: the whole prompt at once
    logits, _ = model(next_id, cache=cache)             # decode: one token, attends over the cache

Buffers are preallocated for `max_len` positions (no reallocation while decoding). Each attention
variant chooses what it keeps (`new_layer_cache`):
- softmax attention (sdpa, manual, block_sparse; with GQA/MQA only the H_kv key/value heads are
  stored, H/H_kv times less memory): all keys and values;
- sliding_window: a rolling buffer of the last `window` positions, so memory stays O(window);
- linear: the running state S = sum phi(k) v^T and z = sum phi(k): O(1) in the length.
RoPE rotates new keys at their absolute positions (offset = tokens already cached) before storing.

Static shapes (`KVCache(..., static=True)`, for CUDA graphs). Slicing the buffers to the cached
length gives every decoding step new shapes, and a CUDA graph replays fixed ones. A static cache
also keeps the length on the device, `position` (a 0-d tensor), and its padding mask always
exists, so that a one-token step (`GPT.decode_step`) can write its key and value into slot
`position` and attend over *all* slots, masked to the filled ones: the same arithmetic at every
position, captured once and replayed (`lm.cuda_graph`). Prefill stays the ordinary path.
"""

from __future__ import annotations

import torch


class LayerCache:
    """One layer's stored keys and values: k, v (B, H_kv, S, D) with S = max_len (or the window)."""

    def __init__(self, owner: "KVCache", batch_size: int, n_kv_heads: int, slots: int, head_dim: int,
                 device, dtype):
        self.owner, self.slots = owner, slots
        shape = (batch_size, n_kv_heads, slots, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def offset(self) -> int:
        """Positions already cached (all layers advance together)."""
        return self.owner.length

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values of the new positions; returns all keys/values to attend over (views)."""
        n, T = self.offset, k.size(-2)
        if n + T > self.slots:
            raise RuntimeError(f"the KV cache holds {self.slots} positions and is full; start a new cache "
                               f"(generate does this for you) or build it with a larger max_len.")
        self.k[:, :, n : n + T] = k
        self.v[:, :, n : n + T] = v
        return self.k[:, :, : n + T], self.v[:, :, : n + T]

    def write(self, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor) -> None:
        """Store one new position's key and value (B, H_kv, 1, D) in `slot`, a 0-d device tensor."""
        self.k.index_copy_(2, slot.view(1), k)
        self.v.index_copy_(2, slot.view(1), v)

    def window(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rolling buffer: the kept earlier keys (in order) plus the new ones, and their positions.

        Position p lives in slot p % slots. Returns keys, values and their absolute positions, then
        stores the new positions (only the last `slots` of them survive)."""
        n, T, W = self.offset, k.size(-2), self.slots
        first = max(0, n - (W - 1))  # the oldest earlier position any new query can still see
        old = torch.arange(first, n, device=k.device)
        keys = torch.cat([self.k[:, :, old % W], k], dim=2)
        values = torch.cat([self.v[:, :, old % W], v], dim=2)
        positions = torch.arange(first, n + T, device=k.device)
        keep = torch.arange(max(n, n + T - W), n + T, device=k.device)
        self.k[:, :, keep % W] = k[:, :, keep - n]
        self.v[:, :, keep % W] = v[:, :, keep - n]
        return keys, values, positions


class LinearState:
    """Linear attention's cache: S = sum_s phi(k_s) v_s^T (B, H, D, Dv) and z = sum_s phi(k_s) (B, H, D)."""

    def __init__(self, owner: "KVCache", batch_size: int, n_heads: int, head_dim: int, device, dtype):
        self.owner = owner
        self.S = torch.zeros(batch_size, n_heads, head_dim, head_dim, device=device, dtype=dtype)
        self.z = torch.zeros(batch_size, n_heads, head_dim, device=device, dtype=dtype)

    @property
    def offset(self) -> int:
        return self.owner.length


class KVCache:
    """The cache of a whole model: one layer cache per block, a shared length, and a padding mask.

    `key_mask` (B, max_len), True for real tokens, is set from the prompt's attention mask (left
    padding for batched prompts of different lengths); generated tokens are always real.
    """

    def __init__(self, model, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                 device=None, static: bool = False):
        max_len = max_len or model.config.block_size
        device = device or model.device
        dtype = dtype or next(model.parameters()).dtype
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0
        self.layers = [block.attn.new_layer_cache(self, batch_size, max_len, device, dtype) for block in model.blocks]
        self.key_mask: torch.Tensor | None = None
        self._device = device
        # static: the length mirrored on the device, and a padding mask that always exists
        self.position = torch.zeros((), dtype=torch.long, device=device) if static else None
        if static:
            self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)

    @property
    def static(self) -> bool:
        return self.position is not None

    def update_mask(self, attention_mask: torch.Tensor | None, T: int) -> None:
        """Record which of the T new positions are real (before the layers run)."""
        if attention_mask is None and self.key_mask is None:
            return
        if self.key_mask is None:  # padding appears now: everything before was real
            self.key_mask = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=self._device)
        new = attention_mask[:, -T:].bool() if attention_mask is not None else True
        self.key_mask[:, self.length : self.length + T] = new

    def advance(self, T: int) -> None:
        self.length += T
        if self.static:
            self.position.fill_(self.length)

    def reset(self) -> None:
        """Forget everything (buffers are reused; linear attention's running sums start from zero)."""
        self.length = 0
        if self.static:  # the same tensors stay, so a captured graph still reads them
            self.position.zero_()
            self.key_mask.fill_(True)
        else:
            self.key_mask = None
        for layer in self.layers:
            if isinstance(layer, LinearState):
                layer.S.zero_()
                layer.z.zero_()

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            for t in vars(layer).values():
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
