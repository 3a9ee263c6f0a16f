from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from lm import GPT, ConfigError, ModelConfig
from lm.attention import (
    BlockSparseAttention, CausalSelfAttention, LinearAttention, SlidingWindowAttention, block_sparse_layout,
    block_sparse_mask, causal_linear_attention, causal_mask, linear_attention_weights, local_block_attention,
    manual_causal_attention, masked_attention, sliding_window_mask,
)
from lm.positions import RotaryEmbedding, apply_rotary
from lm.registry import ATTENTION

VARIANTS = ["sdpa", "manual", "sliding_window", "linear", "block_sparse"]


def make(attention: str = "sdpa", **overrides) -> torch.nn.Module:
    """An attention layer of the tiny test size (C=32, H=4, D=8), eval mode, built from a ModelConfig."""
    fields = dict(block_size=32, n_head=4, d_model=32, attention=attention)
    if attention == "sliding_window":
        fields["window"] = 4
    if attention == "block_sparse":
        fields.update(sparse_block=2, sparse_local=1, sparse_stride=2)
    fields.update(overrides)
    return ATTENTION.get(attention)(ModelConfig(**fields)).eval()


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ---- functions -----------------------------------------------------------------------------------
def test_causal_mask_is_lower_triangular():
    mask = causal_mask(5)
    assert mask.dtype == torch.bool and mask.shape == (5, 5)
    for i in range(5):
        for j in range(5):
            assert bool(mask[i, j]) == (j <= i)


@pytest.mark.parametrize("B, H, T, D", [(1, 1, 1, 4), (2, 3, 7, 8), (3, 4, 16, 16)])
def test_manual_attention_equals_torch_sdpa(B, H, T, D):
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    out, weights = manual_causal_attention(q, k, v)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == (B, H, T, D) and weights.shape == (B, H, T, T)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_manual_attention_equals_an_explicit_loop():
    B, H, T, D = 1, 2, 5, 3
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    out, _ = manual_causal_attention(q, k, v)
    for h in range(H):
        for t in range(T):
            scores = torch.stack([q[0, h, t] @ k[0, h, s] for s in range(t + 1)]) / D**0.5
            expected = (torch.softmax(scores, 0)[:, None] * v[0, h, : t + 1]).sum(0)
            torch.testing.assert_close(out[0, h, t], expected)


def test_weights_are_causal_distributions():
    q, k, v = (torch.randn(2, 3, 9, 4) for _ in range(3))
    _, weights = manual_causal_attention(q, k, v)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 9))
    above_diagonal = ~causal_mask(9)
    assert torch.all(weights[..., above_diagonal] == 0)
    assert torch.all(weights[..., ~above_diagonal] > 0)
    assert torch.all(weights[..., 0, 0] == 1)  # the first token can only attend to itself


def test_sliding_window_mask_by_hand():
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 0],
                             [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(sliding_window_mask(5, 2), expected)
    assert torch.equal(sliding_window_mask(5, 5), causal_mask(5))
    assert torch.equal(sliding_window_mask(5, 1), torch.eye(5, dtype=torch.bool))


def test_block_sparse_layout_by_hand():
    # 8 blocks, each sees itself and 1 block before it, plus summary blocks 1, 3, 5 (stride 2: j % 2 == 1)
    layout = block_sparse_layout(8, local=1, stride=2)
    for i in range(8):
        expected = {j for j in range(i + 1) if i - j <= 1 or j % 2 == 1}
        assert {j for j in range(8) if layout[i, j]} == expected
    assert torch.equal(block_sparse_layout(6, 1, 0), torch.tensor(
        [[i - 1 <= j <= i for j in range(6)] for i in range(6)]))
    assert torch.equal(block_sparse_layout(5, 0, 3, pattern="full"), causal_mask(5))
    mask = block_sparse_mask(6, block=2, local=0, stride=0)  # block-diagonal, causal inside each block
    assert torch.equal(mask, torch.block_diag(*[causal_mask(2)] * 3))


@pytest.mark.parametrize("T", [1, 7, 16, 37])
@pytest.mark.parametrize("window, block", [(1, 1), (3, 3), (5, 2), (8, 8), (20, 6)])
def test_local_block_attention_equals_the_sliding_window_mask(T, window, block):
    q, k, v = (torch.randn(2, 3, T, 4, dtype=torch.float64) for _ in range(3))
    n_prev = math.ceil((window - 1) / block)
    expected, _ = masked_attention(q, k, v, sliding_window_mask(T, window))
    close(local_block_attention(q, k, v, block, n_prev, window=window), expected, 1e-10)


@pytest.mark.parametrize("T", [1, 9, 32, 45])
@pytest.mark.parametrize("block, local, stride", [(1, 0, 0), (2, 1, 2), (4, 2, 4), (3, 0, 1), (5, 1, 3)])
def test_local_block_attention_equals_the_block_sparse_mask(T, block, local, stride):
    q, k, v = (torch.randn(2, 3, T, 4, dtype=torch.float64) for _ in range(3))
    expected, _ = masked_attention(q, k, v, block_sparse_mask(T, block, local, stride))
    close(local_block_attention(q, k, v, block, local, summary_stride=stride), expected, 1e-10)


def naive_linear_attention(q, k, v, eps=1e-6):
    """The formula of Katharopoulos et al. with explicit causal sums, one position at a time."""
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    out = torch.empty_like(v)
    for t in range(q.size(-2)):
        S = torch.einsum("bhsd,bhse->bhde", phi_k[:, :, : t + 1], v[:, :, : t + 1])  # sum phi(k_s) v_s^T
        z = phi_k[:, :, : t + 1].sum(-2)
        num = torch.einsum("bhd,bhde->bhe", phi_q[:, :, t], S)
        den = (phi_q[:, :, t] * z).sum(-1, keepdim=True)
        out[:, :, t] = num / (den + eps)
    return out


@pytest.mark.parametrize("T, chunk", [(1, 64), (13, 4), (32, 8), (50, 64), (40, 1)])
def test_linear_attention_equals_the_naive_formula(T, chunk):
    q, k, v = (torch.randn(2, 3, T, 5, dtype=torch.float64) for _ in range(3))
    expected = naive_linear_attention(q, k, v)
    close(causal_linear_attention(q, k, v, chunk=chunk), expected, 1e-10)
    close(linear_attention_weights(q, k) @ v, expected, 1e-10)


# ---- modules: registry, shapes, parameters -----------------------------------------------------
def test_every_variant_is_registered():
    assert set(VARIANTS) <= set(ATTENTION.names())
    assert ATTENTION.get("sdpa") is ATTENTION.get("manual") is CausalSelfAttention
    assert ATTENTION.get("sliding_window") is SlidingWindowAttention
    assert ATTENTION.get("linear") is LinearAttention
    assert ATTENTION.get("block_sparse") is BlockSparseAttention


@pytest.mark.parametrize("attention", VARIANTS)
@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_shapes_and_parameter_counts(attention, n_kv_heads):
    attn = make(attention, n_kv_heads=n_kv_heads)
    C, H, D = 32, 4, 8
    H_kv = n_kv_heads or H
    assert attn.qkv.weight.shape == ((H + 2 * H_kv) * D, C) and attn.proj.weight.shape == (C, C)
    n = sum(p.numel() for p in attn.parameters())
    assert n == type(attn).param_count(ModelConfig(d_model=C, n_head=H, n_kv_heads=n_kv_heads))
    assert n == C * (H + 2 * H_kv) * D + C * C + (H + 2 * H_kv) * D + C
    x = torch.randn(2, 9, C)
    y, weights = attn(x), attn.weights(x)
    assert attn(x).shape == y.shape == (2, 9, C)
    assert weights.shape == (2, H, 9, 9)


def test_mqa_is_smaller_than_mha():
    sizes = [sum(p.numel() for p in make(n_kv_heads=h).parameters()) for h in (None, 2, 1)]
    assert sizes[0] > sizes[1] > sizes[2]
    # each K/V head dropped saves 2 * D * (C + 1) parameters
    assert sizes[0] - sizes[2] == 3 * 2 * 8 * (32 + 1)


# ---- modules: equalities between paths -----------------------------------------------------------
@pytest.mark.parametrize("n_kv_heads", [None, 4, 2, 1])
def test_module_manual_and_sdpa_give_the_same_output(n_kv_heads):
    sdpa = make("sdpa", n_kv_heads=n_kv_heads)
    manual = make("manual", n_kv_heads=n_kv_heads)
    manual.load_state_dict(sdpa.state_dict())
    x = torch.randn(3, 11, 32)
    close(manual(x), sdpa(x))
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, :4] = False
    close(manual(x, attention_mask=mask), sdpa(x, attention_mask=mask))
    y, weights = sdpa(x), sdpa.weights(x)  # weights requested: the manual path, same result
    close(y, sdpa(x))
    assert weights.shape == (3, 4, 11, 11)


def test_gqa_with_as_many_kv_heads_as_heads_is_mha():
    mha = make(n_kv_heads=None)
    gqa = make(n_kv_heads=4)
    gqa.load_state_dict(mha.state_dict())  # same parameter names and shapes
    x = torch.randn(2, 10, 32)
    close(gqa(x), mha(x), 0)


@pytest.mark.parametrize("n_kv_heads", [2, 1])
@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_gqa_equals_a_reference_that_repeats_kv_heads(attention, n_kv_heads):
    attn = make(attention, n_kv_heads=n_kv_heads)
    x = torch.randn(2, 10, 32)
    B, T, H, D = 2, 10, 4, 8
    W, b = attn.qkv.weight, attn.qkv.bias
    q = (x @ W[: H * D].T + b[: H * D]).view(B, T, H, D)
    k = (x @ W[H * D : (H + n_kv_heads) * D].T + b[H * D : (H + n_kv_heads) * D]).view(B, T, n_kv_heads, D)
    v = (x @ W[(H + n_kv_heads) * D :].T + b[(H + n_kv_heads) * D :]).view(B, T, n_kv_heads, D)
    group = H // n_kv_heads
    heads = []
    for h in range(H):  # query head h reads key/value head h // group
        scores = q[:, :, h] @ k[:, :, h // group].transpose(1, 2) / math.sqrt(D)
        scores = scores.masked_fill(~causal_mask(T), float("-inf"))
        heads.append(torch.softmax(scores, -1) @ v[:, :, h // group])
    expected = attn.proj(torch.cat(heads, dim=-1))
    close(attn(x), expected)


def test_module_equals_torch_multihead_attention(tiny_config):
    """nn.MultiheadAttention with a causal mask and the same projection weights is the reference."""
    attn = CausalSelfAttention(tiny_config)
    C, H = tiny_config.d_model, tiny_config.n_head
    with torch.no_grad():
        attn.qkv.bias.normal_()
        attn.proj.bias.normal_()
    ref = torch.nn.MultiheadAttention(C, H, bias=True, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.qkv.weight)
        ref.in_proj_bias.copy_(attn.qkv.bias)
        ref.out_proj.weight.copy_(attn.proj.weight)
        ref.out_proj.bias.copy_(attn.proj.bias)
    ref.eval()
    x = torch.randn(2, 10, C)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(10)
    expected, expected_weights = ref(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)
    y, weights = attn(x), attn.weights(x)
    close(y, expected)
    close(weights, expected_weights)


@pytest.mark.parametrize("window", [12, 40])
def test_sliding_window_as_long_as_the_input_is_full_attention(window):
    full = make("sdpa", n_kv_heads=2)
    local = make("sliding_window", window=window, n_kv_heads=2)
    local.load_state_dict(full.state_dict())
    x = torch.randn(2, 12, 32)
    close(local(x), full(x))
    close(local.weights(x), full.weights(x))


@pytest.mark.parametrize("window", [1, 3, 5])
def test_sliding_window_weights_are_zero_outside_the_window(window):
    attn = make("sliding_window", window=window)
    x = torch.randn(2, 12, 32)
    y, weights = attn(x), attn.weights(x)
    outside = ~sliding_window_mask(12, window)
    assert torch.all(weights[..., outside] == 0) and torch.all(weights[..., ~outside] > 0)
    close(weights.sum(-1), torch.ones(2, 4, 12))
    close(attn(x), y)  # the blockwise computation agrees with the written-out one
    attn.use_blocks = False
    close(attn(x), y)  # and so does SDPA with the mask


def test_block_sparse_full_pattern_is_full_attention():
    full = make("sdpa")
    sparse = make("block_sparse", sparse_pattern="full", sparse_block=3)
    sparse.load_state_dict(full.state_dict())
    x = torch.randn(2, 14, 32)
    close(sparse(x), full(x))
    close(sparse.weights(x), full.weights(x))


@pytest.mark.parametrize("block, local, stride", [(2, 1, 2), (3, 0, 2), (2, 2, 0), (1, 1, 3)])
def test_block_sparse_weights_are_zero_where_the_layout_forbids(block, local, stride):
    attn = make("block_sparse", sparse_block=block, sparse_local=local, sparse_stride=stride, n_kv_heads=2)
    T = 17
    x = torch.randn(2, T, 32)
    y, weights = attn(x), attn.weights(x)
    allowed = block_sparse_mask(T, block, local, stride)
    assert torch.all(weights[..., ~allowed] == 0) and torch.all(weights[..., allowed] > 0)
    assert not torch.equal(allowed, causal_mask(T))  # the layout really drops something
    close(weights.sum(-1), torch.ones(2, 4, T))
    close(attn(x), y)  # computing only the allowed blocks gives the masked result
    attn.use_blocks = False
    close(attn(x), y)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_linear_attention_module_matches_its_weights(n_kv_heads):
    attn = make("linear", n_kv_heads=n_kv_heads)
    x = torch.randn(2, 70, 32)  # longer than a chunk (64)
    y, weights = attn(x), attn.weights(x)
    close(attn(x), y)
    close(weights.sum(-1), torch.ones(2, 4, 70))
    assert torch.all(weights[..., ~causal_mask(70)] == 0)


# ---- properties every variant must have -------------------------------------------------------
@pytest.mark.parametrize("attention", VARIANTS)
@pytest.mark.parametrize("with_rope", [False, True])
def test_future_inputs_do_not_change_the_past(attention, with_rope):
    attn = make(attention, n_kv_heads=2)
    rope = RotaryEmbedding(8, max_seq_len=16) if with_rope else None
    T, t = 13, 6
    x = torch.randn(2, T, 32)
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn(2, T - t - 1, 32)
    y, y_changed = attn(x, rope=rope), attn(changed, rope=rope)
    close(y[:, : t + 1], y_changed[:, : t + 1], 1e-6)
    assert not torch.allclose(y[:, t + 1 :], y_changed[:, t + 1 :])  # the later positions do see the change


@pytest.mark.parametrize("attention", VARIANTS)
def test_future_tokens_do_not_change_the_past_in_a_model(tiny_config, attention):
    extra = {"window": 3} if attention == "sliding_window" else {}
    model = GPT(dataclasses.replace(tiny_config, attention=attention, **extra)).eval()
    T, t = 12, 6
    idx = torch.randint(0, tiny_config.vocab_size, (2, T))
    changed = idx.clone()
    changed[:, t + 1 :] = (idx[:, t + 1 :] + 1) % tiny_config.vocab_size
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits[:, : t + 1], logits_changed[:, : t + 1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(logits[:, t + 1 :], logits_changed[:, t + 1 :])


@pytest.mark.parametrize("attention", VARIANTS)
@pytest.mark.parametrize("with_rope", [False, True])
def test_left_padding_is_invisible_to_real_tokens(attention, with_rope):
    """Pad a sequence on the left and mask the pads: real tokens see exactly what they saw unpadded.
    (block_sparse blocks sit on absolute positions: the pad is a multiple of block * stride = 4.)
    With RoPE this holds although the real tokens moved: rotary scores depend on distances only.
    Not for linear attention with RoPE: phi = elu + 1 applied after the rotation breaks that, so
    there the real tokens' outputs change with the shift (the weights still ignore the pads)."""
    attn = make(attention, n_kv_heads=2)
    rope = RotaryEmbedding(8, max_seq_len=16) if with_rope else None
    pad, T = 4, 9
    x = torch.randn(2, T, 32)
    padded = torch.cat([torch.randn(2, pad, 32), x], dim=1)
    mask = torch.ones(2, pad + T, dtype=torch.bool)
    mask[:, :pad] = False
    y = attn(padded, rope=rope, attention_mask=mask)
    assert torch.isfinite(y).all()  # padded query rows are finite too
    if not (attention == "linear" and with_rope):
        close(y[:, pad:], attn(x, rope=rope), 1e-5)
    weights = attn.weights(padded, rope, mask)
    assert torch.all(weights[:, :, pad:, :pad] == 0)  # real queries give padded keys no weight
    close(weights[:, :, pad:].sum(-1), torch.ones(2, 4, T))


@pytest.mark.parametrize("attention", VARIANTS)
def test_mixed_padding_in_one_batch(attention):
    """Row 0 padded on the left by 4, row 1 by 8, row 2 on the right: the mask handles each row.
    (Left pads are multiples of block_sparse's block * stride = 4.)"""
    attn = make(attention)
    T = 12
    x = torch.randn(3, T, 32)
    mask = torch.ones(3, T, dtype=torch.bool)
    mask[0, :4] = False
    mask[1, :8] = False
    mask[2, 9:] = False
    y = attn(x, attention_mask=mask)
    assert torch.isfinite(y).all()
    close(y[0, 4:], attn(x[0:1, 4:])[0])
    close(y[1, 8:], attn(x[1:2, 8:])[0])
    close(y[2, :9], attn(x[2:3, :9])[0])


@pytest.mark.parametrize("attention", VARIANTS)
def test_returned_weights_are_distributions(attention):
    attn = make(attention)
    weights = attn.weights(torch.randn(2, 11, 32))
    assert torch.all(weights >= 0)
    close(weights.sum(-1), torch.ones(2, 4, 11))
    assert torch.all(weights[..., ~causal_mask(11)] == 0)


@pytest.mark.parametrize("attention", ["sdpa", "manual", "sliding_window", "block_sparse"])
def test_rope_is_applied_to_queries_and_keys(attention):
    """With RoPE the layer equals attention over explicitly rotated q and k."""
    attn = make(attention, window=40, sparse_pattern="full")  # full patterns: compare with plain attention
    rope = RotaryEmbedding(8, max_seq_len=16)
    x = torch.randn(2, 10, 32)
    q, k, v = attn.qkv(x).view(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
    cos, sin = rope.tables(10)
    out, _ = manual_causal_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
    expected = attn.proj(out.transpose(1, 2).reshape(2, 10, 32))
    close(attn(x, rope=rope), expected)
    assert not torch.allclose(attn(x), expected)


def test_attention_dropout_only_in_training(tiny_config):
    attn = CausalSelfAttention(dataclasses.replace(tiny_config, dropout=0.5, attention="manual"))
    x = torch.randn(2, 8, tiny_config.d_model)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn(x))


def test_model_attention_weights_per_layer(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (2, 7))
    weights = tiny_model.attention_weights(idx)
    assert len(weights) == tiny_config.n_layer
    for w in weights:
        assert w.shape == (2, tiny_config.n_head, 7, 7)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, tiny_config.n_head, 7))
        assert torch.all(w[..., ~causal_mask(7)] == 0)


# ---- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (dict(d_model=30, n_head=4), ["d_model=30", "n_head=4", "[3, 5, 2]"]),
    (dict(n_kv_heads=3), ["n_kv_heads=3", "n_head=4", "[1, 2, 4]"]),
    (dict(attention="sliding_window", window=0), ["window=0"]),
    (dict(attention="sliding_window", window=None), ["window=<keys each query sees>"]),
    (dict(attention="block_sparse", sparse_block=0), ["sparse_block=0"]),
    (dict(attention="block_sparse", sparse_local=-1), ["sparse_local=-1"]),
    (dict(attention="block_sparse", sparse_pattern="dilated"), ["'dilated'", "local_strided"]),
])
def test_invalid_settings_are_refused_by_the_config(overrides, words):
    """Settings are checked once, where a config is made; the layers trust their config."""
    with pytest.raises(ConfigError) as error:
        ModelConfig(**{"d_model": 32, "n_head": 4, **overrides})
    for word in words:
        assert word in str(error.value)


# ---- causal attention keeping its probabilities (CPU, bfloat16 training) ---------------------------
def test_attention_keeping_probabilities_equals_sdpa_in_float64():
    from lm.attention.kernels import _CausalAttentionKeepingProbabilities
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    ours = _CausalAttentionKeepingProbabilities.apply(q, k, v)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    close(ours, want, 1e-12)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        close(a, b, 1e-12)


def test_sdpa_keeps_probabilities_only_for_short_bfloat16_training_on_a_cpu(monkeypatch):
    from lm.attention import kernels
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    kept = lambda out: type(out.grad_fn).__name__.startswith("_CausalAttentionKeepingProbabilities")  # noqa: E731
    assert kept(kernels.sdpa(q, k, v))
    with torch.no_grad():  # no backward to keep them for
        assert kernels.sdpa(q, k, v).grad_fn is None
    assert not kept(kernels.sdpa(q, k, v, causal_mask(16)))  # a mask: SDPA
    assert not kept(kernels.sdpa(q, k, v, dropout_p=0.1))
    assert kept(kernels.sdpa(q, k[:, :2], v[:, :2]))  # fewer K/V heads: repeated for it
    assert not kept(kernels.sdpa(*(x.float() for x in (q, k, v))))  # float32: lm's C kernel or SDPA's
    monkeypatch.setattr(kernels, "SAVED_PROBABILITIES", 2 * 4 * 16 * 16 - 1)  # one number too many
    assert not kept(kernels.sdpa(q, k, v))


def test_attention_keeping_probabilities_is_as_accurate_as_sdpa_in_bfloat16():
    from lm.attention import kernels
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 4, 64, 16, dtype=torch.bfloat16)
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = F.scaled_dot_product_attention(*exact, is_causal=True)
    want_grads = torch.autograd.grad(want, exact, grad.double())
    ours = kernels.sdpa(q, k, v)
    flash = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for out in (ours, flash):  # the error of each against float64, outputs and gradients
        grads = torch.autograd.grad(out, (q, k, v), grad)
        errors = [(out.double() - want).abs().max()] + [(a.double() - b).abs().max() for a, b in zip(grads, want_grads)]
        if out is ours:
            ours_errors = errors
        else:
            flash_errors = errors
    for ours_error, flash_error in zip(ours_errors, flash_errors):
        assert ours_error <= 2 * flash_error + 0.01, (ours_errors, flash_errors)


def test_grouped_query_attention_keeping_probabilities_is_as_accurate_as_sdpa_in_bfloat16():
    """2 K/V heads for 4 query heads, repeated for the batched products; gradients of k and v summed back over
    the query heads that share them, as close to float64 as SDPA's own GQA."""
    from lm.attention import kernels
    torch.manual_seed(1)
    q = torch.randn(2, 4, 64, 16, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 64, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn(2, 4, 64, 16, dtype=torch.bfloat16)
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = F.scaled_dot_product_attention(*exact, is_causal=True, enable_gqa=True)
    want_grads = torch.autograd.grad(want, exact, grad.double())
    errors = {}
    for name, out in (("ours", kernels.sdpa(q, k, v)),
                      ("flash", F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))):
        grads = torch.autograd.grad(out, (q, k, v), grad)
        errors[name] = [(out.double() - want).abs().max()] + [(a.double() - b).abs().max()
                                                             for a, b in zip(grads, want_grads)]
    assert type(kernels.sdpa(q, k, v).grad_fn).__name__.startswith("_CausalAttentionKeepingProbabilities")
    for ours, flash in zip(errors["ours"], errors["flash"]):
        assert ours <= 2 * flash + 0.01, errors


def test_a_bfloat16_cpu_training_step_gives_the_same_loss_and_gradients_either_way(monkeypatch):
    from lm.attention import kernels
    config = ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=4, d_model=32, dropout=0.0)
    ids = torch.randint(0, 40, (3, 32), generator=torch.Generator().manual_seed(1))

    def step():
        torch.manual_seed(0)
        model = GPT(config)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():  # the query, key and value rows of qkv apart
            parts = p.grad.chunk(3) if "qkv" in name else [p.grad]
            grads.update({f"{name}[{i}]": part for i, part in enumerate(parts)})
        return loss.detach(), grads

    loss, grads = step()
    monkeypatch.setattr(kernels, "SAVED_PROBABILITIES", 0)  # SDPA's flash kernel throughout
    flash_loss, flash_grads = step()
    torch.testing.assert_close(loss, flash_loss, rtol=0, atol=0.02)
    for name, grad in grads.items():  # each weight's gradient, the attention projections' included
        assert (grad - flash_grads[name]).norm() <= 0.05 * flash_grads[name].norm() + 1e-4, name
