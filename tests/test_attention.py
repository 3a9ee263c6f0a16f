from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lm import GPT
from lm.attention import CausalSelfAttention, causal_mask, manual_causal_attention


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


def test_module_manual_and_sdpa_give_the_same_output(tiny_config):
    sdpa = CausalSelfAttention(dataclasses.replace(tiny_config, attention="sdpa"))
    manual = CausalSelfAttention(dataclasses.replace(tiny_config, attention="manual"))
    manual.load_state_dict(sdpa.state_dict())
    x = torch.randn(3, 11, tiny_config.d_model)
    torch.testing.assert_close(manual(x), sdpa(x), atol=1e-5, rtol=1e-5)
    y, weights = sdpa(x, return_weights=True)  # weights requested: the manual path, same result
    torch.testing.assert_close(y, sdpa(x), atol=1e-5, rtol=1e-5)
    assert weights.shape == (3, tiny_config.n_head, 11, 11)


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
    y, weights = attn(x, return_weights=True)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_weights, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_future_tokens_do_not_change_the_past(tiny_config, attention):
    model = GPT(dataclasses.replace(tiny_config, attention=attention)).eval()
    T, t = 12, 6
    idx = torch.randint(0, tiny_config.vocab_size, (2, T))
    changed = idx.clone()
    changed[:, t + 1 :] = (idx[:, t + 1 :] + 1) % tiny_config.vocab_size
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits[:, : t + 1], logits_changed[:, : t + 1], atol=1e-6, rtol=1e-6)
    # and the later positions do see the change, so the check above is not vacuous
    assert not torch.allclose(logits[:, t + 1 :], logits_changed[:, t + 1 :])


def test_model_attention_weights_per_layer(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (2, 7))
    weights = tiny_model.attention_weights(idx)
    assert len(weights) == tiny_config.n_layer
    for w in weights:
        assert w.shape == (2, tiny_config.n_head, 7, 7)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, tiny_config.n_head, 7))
        assert torch.all(w[..., ~causal_mask(7)] == 0)


def test_attention_dropout_only_in_training(tiny_config):
    attn = CausalSelfAttention(dataclasses.replace(tiny_config, dropout=0.5, attention="manual"))
    x = torch.randn(2, 8, tiny_config.d_model)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn(x))
