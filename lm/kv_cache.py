"""The KV cache: keys and values of tokens already seen, so each new token costs one position.

Without a cache, generating token t runs the model over all t tokens again. Yet the keys and values
of tokens 0 .. t-1 do not change (a causal model never lets a token see the future), so they can
be kept: each step then computes q, k, v for the one new token, stores k and v, and attends over
the stored ones. Per token the work drops from O(t) positions to one.

    cache = KVCache(model, batch_size=1, max_len=512)
    logits, _ = model(prompt_ids, cache=cache)          # prefill: the whole prompt at once
    logits, _ = model(next_id, cache=cache)             # decode: one token, attends over the cache

A cache holds one layer cache per block. An attention layer hands its new keys and values to its
layer cache and gets back everything to attend over, with the mask:

    keys, values, mask = layer_cache.update(k, v, pattern)

The mask combines causality, the attention variant's `pattern` (e.g. a block-sparse layout),
the window of a rolling buffer and padding. What a layer cache keeps depends on the variant
(`cache_kind` of the attention class):
- `DynamicCache` ("keys": sdpa, manual, block_sparse): every key and value, in buffers
  preallocated for `max_len` positions and sliced to the filled length; with GQA/MQA only the
  H_kv key/value heads, H/H_kv times less memory;
- `StaticCache` (the same, `KVCache(..., static=True)`): the filled length lives on the device
  and attention reads every slot under a mask, so no shape depends on the position and one step
  can be captured once as a CUDA graph and replayed (`lm.generation.Decoder`);
- `RollingCache` ("window": sliding_window): the last `window` positions, position p in slot
  p % window, so memory stays O(window);
- `LinearState` ("state": linear): the running sums S = sum phi(k) v^T and z = sum phi(k).

The layer caches of one model share a `Cursor`: how many positions are filled (an int, or a 0-d
device tensor for a static cache) and which of them hold real tokens rather than padding.
"""

from __future__ import annotations

import torch

from .attention.masks import causal


class Cursor:
    """Where the cached sequence stands: `length` positions filled (on the host), or `position`
    (a 0-d long tensor on the device, for static caches), and `real` (B, max_len): which positions
    hold real tokens. `real` is None while everything is real (a static cache always has it)."""

    def __init__(self, batch_size: int, max_len: int, device, static: bool):
        self.length = 0
        self.position = torch.zeros((), dtype=torch.long, device=device) if static else None
        self.real = torch.ones(batch_size, max_len, dtype=torch.bool, device=device) if static else None
        self.masks: dict = {}  # this forward's masks: every layer of a model asks for the same one

    @property
    def offset(self):
        """The position of the next token: an int, or the device tensor of a static cache."""
        return self.length if self.position is None else self.position

    def new_positions(self, T: int, device) -> torch.Tensor:
        """(T,) positions of the tokens being added."""
        if self.position is None:
            return torch.arange(self.length, self.length + T, device=device)
        return self.position.view(1) if T == 1 else self.position + torch.arange(T, device=device)

    def mask(self, layer, pattern, build):
        """The mask `build()` makes, built once per forward for each kind of layer and pattern (all
        layers of one model share their settings, so they share their masks)."""
        key = (type(layer), getattr(pattern, "__func__", pattern))
        if key not in self.masks:
            self.masks[key] = build()
        return self.masks[key]


def key_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, pattern=None,
             real: torch.Tensor | None = None) -> torch.Tensor:
    """(T, S), or (B, 1, T, S) with padding: which of S keys each of T queries may see.

    Causal (keys at negative positions, empty slots, are never seen), then the attention's
    `pattern(query_pos, key_pos)` when it has one, then padding: `real` (B, S) hides padded keys,
    except from the query at the same position (a padded query keeps itself, so no row is empty).
    """
    mask = causal(query_pos, key_pos) & (key_pos >= 0)
    restricted = None if pattern is None else pattern(query_pos, key_pos)
    if restricted is not None:
        mask = mask & restricted
    if real is not None:
        mask = mask & (real[:, None, None, :] | (key_pos == query_pos))
    return mask


def _columns(real: torch.Tensor, offset, T: int) -> torch.Tensor:
    """Columns offset .. offset+T-1 of `real` (B, max_len); offset an int or a 0-d device tensor."""
    if isinstance(offset, torch.Tensor):
        return real.index_select(1, offset + torch.arange(T, device=real.device))
    return real[:, offset : offset + T]


class DynamicCache:
    """Every key and value so far: k, v (B, H_kv, max_len, D), read up to the filled length."""

    def __init__(self, cursor: Cursor, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device, dtype):
        self.cursor, self.slots = cursor, max_len
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def offset(self):
        return self.cursor.offset

    def update(self, k: torch.Tensor, v: torch.Tensor, pattern=None):
        """Store the new positions' keys and values (B, H_kv, T, D); return the keys and values of
        positions 0 .. n+T-1 (views) and their mask, None when every query may see every key."""
        n, T = self.cursor.length, k.size(2)
        if n + T > self.slots:
            raise RuntimeError(f"the KV cache holds {self.slots} positions and {n} are filled, so {T} more do not "
                               f"fit; reset it or build it with a larger max_len (generate does this for you).")
        self.k.narrow(2, n, T).copy_(k)  # narrow/copy_: k[:, :, n:n+T] = ... without parsing the index
        self.v.narrow(2, n, T).copy_(v)
        keys, values = self.k.narrow(2, 0, n + T), self.v.narrow(2, 0, n + T)
        real = self.cursor.real
        if T == 1 and pattern is None and real is None:
            return keys, values, None  # one new token sees every cached one

        def build():
            query_pos = self.cursor.new_positions(T, k.device)[:, None]
            key_pos = torch.arange(n + T, device=k.device)[None, :]
            return key_mask(query_pos, key_pos, pattern, None if real is None else real[:, : n + T])

        return keys, values, self.cursor.mask(self, pattern, build)


class StaticCache(DynamicCache):
    """The same buffers, written at the cursor's device position and read whole under a mask: no
    shape and no Python number depends on the position, so a step can be replayed as a CUDA graph."""

    def update(self, k: torch.Tensor, v: torch.Tensor, pattern=None):
        positions = self.cursor.new_positions(k.size(2), k.device)  # (T,) on the device
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)

        def build():
            key_pos = torch.arange(self.slots, device=k.device)[None, :]
            return key_mask(positions[:, None], key_pos, pattern, self.cursor.real)

        return self.k, self.v, self.cursor.mask(self, pattern, build)


class RollingCache(DynamicCache):
    """The last `slots` (= the window) keys and values: position p lives in slot p % slots, so the
    memory stays the same however long the sequence grows. Works with an int or a device position."""

    def update(self, k: torch.Tensor, v: torch.Tensor, pattern=None):
        p, T, W, device = self.offset, k.size(2), self.slots, k.device
        new = self.cursor.new_positions(T, device)
        keys, values = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)  # copies, before writing

        def build():
            held = (p - 1) - ((p - 1) - torch.arange(W, device=device)) % W  # each slot's position; < 0: empty
            key_pos = torch.cat([held, new])[None, :]
            query_pos = new[:, None]
            real = self.cursor.real
            if real is not None:
                real = real.index_select(1, key_pos[0].clamp(min=0))
            return key_mask(query_pos, key_pos, pattern, real) & (query_pos - key_pos < W)

        mask = self.cursor.mask(self, pattern, build)
        keep = min(T, W)  # only the last W new positions survive
        self.k.index_copy_(2, new[T - keep :] % W, k[:, :, T - keep :])
        self.v.index_copy_(2, new[T - keep :] % W, v[:, :, T - keep :])
        return keys, values, mask


class LinearState:
    """Linear attention's cache: S = sum_s phi(k_s) v_s^T (B, H, D, Dv) and z = sum_s phi(k_s) (B, H, D)."""

    def __init__(self, cursor: Cursor, batch_size: int, n_heads: int, head_dim: int, device, dtype):
        self.cursor = cursor
        self.S = torch.zeros(batch_size, n_heads, head_dim, head_dim, device=device, dtype=dtype)
        self.z = torch.zeros(batch_size, n_heads, head_dim, device=device, dtype=dtype)

    @property
    def offset(self):
        return self.cursor.offset

    def update(self, phi_k: torch.Tensor, v: torch.Tensor):
        """Add the new keys (already through phi) and values to the sums. Returns the sums before
        them, and phi_k with padded keys zeroed (padding adds nothing to any sum)."""
        if self.cursor.real is not None:
            real = _columns(self.cursor.real, self.offset, phi_k.size(2))
            phi_k = phi_k * real[:, None, :, None].to(phi_k.dtype)
        S, z = self.S.clone(), self.z.clone()
        self.S += phi_k.transpose(-2, -1) @ v
        self.z += phi_k.sum(-2)
        return S, z, phi_k


class KVCache:
    """The cache of a whole model: one layer cache per block, sharing one cursor.

    `GPT.forward` calls `begin` before its blocks (it records which new positions are real) and
    `end` after them (it advances the cursor). `static=True` keeps the position on the device
    (see `StaticCache`); the buffers then always span `max_len` positions.

    The buffers are allocated here, for `max_len` positions (default block_size). `generate` asks
    for what one generation can use, prompt plus max_new_tokens and never more than block_size
    (past it, generation refills the cache rather than growing it).
    """

    def __init__(self, model, batch_size: int, max_len: int | None = None, *, static: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        max_len = max_len or model.config.block_size
        device = device or model.device
        dtype = dtype or next(model.parameters()).dtype
        self.batch_size, self.max_len, self.static = batch_size, max_len, static
        self.cursor = Cursor(batch_size, max_len, device, static)
        self.layers = [self._layer_cache(block.attn, device, dtype) for block in model.blocks]

    def _layer_cache(self, attn, device, dtype):
        B, cursor = self.batch_size, self.cursor
        if attn.cache_kind == "state":
            return LinearState(cursor, B, attn.n_head, attn.head_dim, device, dtype)
        if attn.cache_kind == "window":
            return RollingCache(cursor, B, attn.n_kv_heads, min(attn.window, self.max_len), attn.head_dim, device, dtype)
        kind = StaticCache if self.static else DynamicCache
        return kind(cursor, B, attn.n_kv_heads, self.max_len, attn.head_dim, device, dtype)

    @property
    def offset(self):
        """The position of the next token (an int; a 0-d device tensor for a static cache)."""
        return self.cursor.offset

    @property
    def length(self) -> int:
        """Positions filled (for a static cache this reads the device)."""
        return self.cursor.length if not self.static else int(self.cursor.position)

    def begin(self, T: int, attention_mask: torch.Tensor | None = None):
        """Record which of the T new positions are real (the last T columns of `attention_mask`,
        True = real; None: all of them) and return the position of the first one."""
        cursor, offset = self.cursor, self.cursor.offset
        cursor.masks = {}  # a new forward: new positions, new masks
        if attention_mask is None and cursor.real is None:
            return offset
        new = True if attention_mask is None else attention_mask[:, -T:].bool()
        if self.static:  # a static cache starts all real: only a mask needs writing
            if attention_mask is not None:
                cursor.real.index_copy_(1, offset + torch.arange(T, device=cursor.real.device), new)
            return offset
        if cursor.real is None:  # padding appears now: everything before was real
            cursor.real = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=attention_mask.device)
        cursor.real[:, offset : offset + T] = new
        return offset

    def end(self, T: int) -> None:
        """The T new positions are stored in every layer: move the cursor past them."""
        if self.static:
            self.cursor.position.add_(T)  # on the device, so a captured graph advances it on replay
        else:
            self.cursor.length += T

    def reset(self) -> None:
        """Forget everything. The same tensors stay (a captured graph still reads them); linear
        attention's running sums start from zero again."""
        self.cursor.length = 0
        if self.static:
            self.cursor.position.zero_()
            self.cursor.real.fill_(True)
        else:
            self.cursor.real = None
        for layer in self.layers:
            if isinstance(layer, LinearState):
                layer.S.zero_()
                layer.z.zero_()

    def crop(self, n: int) -> None:
        """Keep the first `n` positions and forget the rest, so the next token goes to position n.

        Speculative decoding (`lm.speculative`) feeds a model tokens that may be rejected and then
        steps back to the last accepted one. Nothing is erased: the slots past n are overwritten by
        the next tokens and never read before (the cursor decides what attention sees). Only caches
        that keep every key and value can step back: a rolling window has overwritten old slots, and
        linear attention's running sums cannot subtract what they added."""
        kinds = {type(layer).__name__ for layer in self.layers if type(layer) not in (DynamicCache, StaticCache)}
        if kinds:
            raise ValueError(f"a KV cache with {', '.join(sorted(kinds))} layers cannot be cropped (they do not keep "
                             f"every position); crop works with attention that caches every key (sdpa, manual, "
                             f"block_sparse); otherwise reset() the cache and feed the tokens again.")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.length:
            raise ValueError(f"crop(n={n!r}): n must be an integer from 0 to the {self.length} positions filled.")
        if self.static:
            self.cursor.position.fill_(n)
        else:
            self.cursor.length = n

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache keeps (buffers, sums, position, padding)."""
        cursor = [t for t in (self.cursor.position, self.cursor.real) if t is not None]
        return cursor + [t for layer in self.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]

    def nbytes(self) -> int:
        """Bytes of the layers' buffers (keys, values or running sums)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in vars(layer).values()
                   if isinstance(t, torch.Tensor))


__all__ = ["Cursor", "DynamicCache", "KVCache", "LinearState", "RollingCache", "StaticCache", "key_mask"]
