"""The KV cache (`lm.kv_cache`): cached forwards equal full ones for every attention variant, the
static cache (device position, the CUDA-graph path) equals the dynamic one, each layer cache's
`update` returns the keys and the mask a query may see, and the memory each keeps."""

from __future__ import annotations

import pytest
import torch

from lm import GPT, ModelConfig
from lm.attention import block_sparse, sliding_window
from lm.kv_cache import DynamicCache, KVCache, LinearState, RollingCache, StaticCache

from test_generation import VARIANTS, build


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_logits_equal_a_full_forward(name):
    """A prompt, then chunks of 3, then single tokens: the last position of each cached call scores
    what the full forward scores at that position."""
    model = build(name)
    idx = torch.randint(0, 50, (2, 30))
    ends = [7, 10, 13, 16, 19, 22] + list(range(23, 31))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache(model, batch_size=2)
        start, last = 0, []
        for end in ends:
            logits = model(idx[:, start:end], cache=cache)[0]
            assert logits.shape == (2, 1, 50)  # only the position generation needs goes through the head
            last.append(logits[:, 0])
            start = end
    assert cache.length == 30
    torch.testing.assert_close(torch.stack(last, 1), full[:, [e - 1 for e in ends]], atol=1e-4, rtol=1e-4)


def decode_both(model, prompt, mask, steps):
    """Prefill a dynamic and a static cache with the prompt, then feed both the same greedy tokens
    one at a time; returns both lists of (B, V) logits."""
    B, T0 = prompt.shape
    dynamic, static = KVCache(model, B), KVCache(model, B, static=True)
    with torch.no_grad():
        model(prompt, attention_mask=mask, cache=dynamic)
        token = model(prompt, attention_mask=mask, cache=static)[0][:, -1].argmax(-1, keepdim=True)
        full_mask = None if mask is None else torch.cat([mask, torch.ones(B, steps, dtype=torch.bool)], 1)
        out_dynamic, out_static = [], []
        for step in range(steps):
            L = T0 + step + 1
            a = model(token, attention_mask=None if full_mask is None else full_mask[:, :L], cache=dynamic)[0][:, -1]
            b = model(token, cache=static)[0][:, -1]  # the same call a CUDA graph replays
            out_dynamic.append(a)
            out_static.append(b)
            token = a.argmax(-1, keepdim=True)
    assert static.length == dynamic.length == T0 + steps
    return out_dynamic, out_static


@pytest.mark.parametrize("name", VARIANTS)
def test_static_cache_equals_the_dynamic_cache(name):
    model = build(name, block_size=24)
    dynamic, static = decode_both(model, torch.randint(0, 50, (2, 6)), None, steps=12)  # past windows and blocks
    torch.testing.assert_close(torch.stack(static), torch.stack(dynamic), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_static_cache_keeps_left_padding_out(name):
    model = build(name, block_size=24)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :4] = False
    dynamic, static = decode_both(model, torch.randint(0, 50, (2, 8)), mask, steps=10)
    torch.testing.assert_close(torch.stack(static), torch.stack(dynamic), atol=1e-5, rtol=1e-5)


def test_static_cache_reset_keeps_its_tensors():
    model = build("mha")
    cache = KVCache(model, 2, static=True)
    tensors = cache.tensors()
    real, position = cache.cursor.real, cache.cursor.position
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 5)), attention_mask=torch.tensor([[0, 1, 1, 1, 1]] * 2).bool(), cache=cache)
    assert int(position) == 5 and not bool(real[0, 0])
    cache.reset()
    assert all(a is b for a, b in zip(cache.tensors(), tensors))  # a captured graph still reads these
    assert int(position) == 0 and bool(real.all())


# ---- each layer cache's update ---------------------------------------------------------------------
def one_layer(slots=8, static=False, batch=2, **config) -> KVCache:
    """The cache of a one-layer model with 2 key/value heads of size 4, around its one layer cache."""
    model = GPT(ModelConfig(vocab_size=10, block_size=64, n_layer=1, n_head=2, d_model=8, **config))
    return KVCache(model, batch, max_len=slots, static=static)


@pytest.mark.parametrize("kind, static", [(DynamicCache, False), (StaticCache, True)])
def test_update_returns_every_stored_key_and_the_causal_padding_mask(kind, static):
    cache = one_layer(static=static)
    assert type(cache.layers[0]) is kind
    k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    real = torch.tensor([[False, True, True, True, True], [True] * 5])
    cache.begin(3, real[:, :3])
    keys, values, mask = cache.layers[0].update(k[:, :, :3], v[:, :, :3])
    cache.end(3)
    cache.begin(2, real)
    keys, values, mask = cache.layers[0].update(k[:, :, 3:], v[:, :, 3:])
    cache.end(2)
    S = keys.size(2)
    assert S == (8 if static else 5)  # a static cache returns every slot, masked
    torch.testing.assert_close(keys[:, :, :5], k)
    torch.testing.assert_close(values[:, :, :5], v)
    assert mask.shape == (2, 1, 2, S)
    for row in range(2):
        for q in (3, 4):
            for key in range(S):
                expected = key <= q and (key >= 5 or bool(real[row, key]) or key == q)
                assert bool(mask[row, 0, q - 3, key]) == expected, (row, q, key)


def test_dynamic_cache_one_token_without_padding_needs_no_mask():
    cache = one_layer()
    cache.begin(1)
    _, _, mask = cache.layers[0].update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    assert mask is None


def test_update_applies_the_attention_pattern():
    cache = one_layer(slots=16)
    cache.begin(12)
    pattern = lambda q, k: block_sparse(q, k, block=2, local=1, stride=2)  # noqa: E731
    _, _, mask = cache.layers[0].update(torch.randn(2, 2, 12, 4), torch.randn(2, 2, 12, 4), pattern)
    q, k = torch.arange(12)[:, None], torch.arange(12)[None, :]
    assert torch.equal(mask, pattern(q, k) & (k <= q))


@pytest.mark.parametrize("static", [False, True])
def test_rolling_cache_keeps_the_last_window_and_masks_by_distance(static):
    """Positions arrive in chunks of 3; the buffer holds 4 slots. Each query sees exactly the keys
    within its window, whichever slot they sit in, and every key it sees is the right one."""
    W, T = 4, 3
    cache = one_layer(slots=64, static=static, batch=1, attention="sliding_window", window=W)
    assert type(cache.layers[0]) is RollingCache and cache.layers[0].slots == W
    keys_by_position = torch.arange(15, dtype=torch.float32).view(1, 1, 15, 1).expand(1, 2, 15, 4)
    for start in range(0, 15, T):
        cache.begin(T)
        k = keys_by_position[:, :, start:start + T]
        keys, _, mask = cache.layers[0].update(k, k, lambda q, p: sliding_window(q, p, W))
        cache.end(T)
        assert keys.size(2) == W + T  # the buffer before this chunk, then the chunk itself
        for i in range(T):
            seen = sorted(keys[0, 0, mask[..., i, :].flatten(), 0].long().tolist())
            query = start + i
            assert seen == list(range(max(0, query - W + 1), query + 1)), (query, seen)


def test_linear_state_returns_the_sums_before_the_new_keys():
    cache = one_layer(batch=1, attention="linear")
    state = cache.layers[0]
    assert type(state) is LinearState
    phi_k, v = torch.rand(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    S, z, _ = state.update(phi_k, v)
    assert torch.equal(S, torch.zeros(1, 2, 4, 4)) and torch.equal(z, torch.zeros(1, 2, 4))
    S, z, _ = state.update(phi_k, v)
    torch.testing.assert_close(S, phi_k.transpose(-2, -1) @ v)
    torch.testing.assert_close(z, phi_k.sum(-2))


# ---- memory and limits -----------------------------------------------------------------------------
def test_cache_memory_follows_the_kv_heads_and_the_window():
    def cache_bytes(**kw):
        model = GPT(ModelConfig(vocab_size=50, block_size=256, n_layer=2, n_head=8, d_model=64, **kw))
        return KVCache(model, batch_size=1).nbytes()

    full = cache_bytes()
    assert full == 2 * 2 * 8 * 256 * 8 * 4  # layers x (k, v) x heads x positions x head_dim x fp32
    assert cache_bytes(n_kv_heads=2) * 4 == full  # GQA: 4 query heads share each stored head
    assert cache_bytes(n_kv_heads=1) * 8 == full  # MQA
    assert cache_bytes(attention="sliding_window", window=32) * 8 == full  # a rolling buffer of 32
    assert cache_bytes(attention="linear") == 2 * 8 * (8 * 8 + 8) * 4  # a D x D state and a D sum per head


def test_full_cache_says_what_to_do():
    model = build("mha", block_size=8)
    cache = KVCache(model, batch_size=1, max_len=8)
    model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises((RuntimeError, ValueError), match="block_size|max_len"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_cache_follows_the_weights_dtype():
    model = build("mha").to(torch.bfloat16)
    assert KVCache(model, batch_size=1).layers[0].k.dtype == torch.bfloat16
