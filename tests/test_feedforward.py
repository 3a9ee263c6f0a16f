from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lm import FEEDFORWARD, ModelConfig
from lm.feedforward import MLP, MoE, SwiGLU, load_balancing_loss, route_top_k


def config(**overrides) -> ModelConfig:
    return ModelConfig(**{"d_model": 16, "n_head": 2, "d_ff": 24, **overrides})


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.5)
    return module


def test_registered_names():
    assert FEEDFORWARD.names() == ["gelu", "gelu_tanh", "moe", "swiglu"]
    assert FEEDFORWARD.get("gelu_tanh").__mro__[1] is MLP
    assert FEEDFORWARD.get("gelu") is MLP and FEEDFORWARD.get("swiglu") is SwiGLU and FEEDFORWARD.get("moe") is MoE


# ---- dense -----------------------------------------------------------------------------------------
def test_gelu_tanh_is_torchs_tanh_approximation_and_differs_from_the_exact_gelu():
    exact, tanh = (randomize_(FEEDFORWARD.get(name)(config())) for name in ("gelu", "gelu_tanh"))
    tanh.load_state_dict(exact.state_dict())  # same names and shapes
    x = torch.randn(2, 5, 16)
    reference = tanh.proj(torch.nn.GELU(approximate="tanh")(tanh.fc(x)))
    torch.testing.assert_close(tanh(x), reference, rtol=0, atol=0)
    assert (tanh(x) - exact(x)).abs().max() > 1e-5  # a real difference: GPT-2's logits need the right one


def test_mlp_written_out():
    mlp = randomize_(MLP(config()))
    x = torch.randn(2, 5, 16)
    expected = F.gelu(x @ mlp.fc.weight.T + mlp.fc.bias) @ mlp.proj.weight.T + mlp.proj.bias
    torch.testing.assert_close(mlp(x), expected)
    assert mlp.residual_projections() == [mlp.proj]


def test_swiglu_written_out_with_seed_002_names():
    ffn = randomize_(SwiGLU(config(bias=False)))
    assert ffn.w1.weight.shape == (24, 16) and ffn.w2.weight.shape == (24, 16) and ffn.w3.weight.shape == (16, 24)
    assert all(layer.bias is None for layer in (ffn.w1, ffn.w2, ffn.w3))
    x = torch.randn(2, 5, 16)
    gate = x @ ffn.w1.weight.T
    expected = (gate * torch.sigmoid(gate) * (x @ ffn.w2.weight.T)) @ ffn.w3.weight.T
    torch.testing.assert_close(ffn(x), expected)
    assert ffn.residual_projections() == [ffn.w3]


def test_swiglu_uses_d_ff_for_all_three_matrices():
    ffn = SwiGLU(config(d_ff=None, bias=False))  # None: 4 * d_model, as seed 002's ffn_mult = 4
    assert ffn.w1.out_features == ffn.w2.out_features == ffn.w3.in_features == 64
    assert sum(p.numel() for p in ffn.parameters()) == 3 * 16 * 64  # 1.5x the GELU MLP's 2 * 16 * 64


@pytest.mark.parametrize("name", ["gelu", "swiglu", "moe"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("expert", ["gelu", "swiglu"])
def test_param_count_matches_the_module(name, bias, expert):
    cfg = config(ffn=name, bias=bias, n_experts=3, moe_top_k=2, moe_expert=expert)
    cls = FEEDFORWARD.get(name)
    assert cls.param_count(cfg) == sum(p.numel() for p in cls(cfg).parameters())


# ---- mixture of experts ----------------------------------------------------------------------------
def moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: the weighted sum of the outputs of its top-k experts."""
    out = torch.zeros_like(x)
    for b in range(x.size(0)):
        for t in range(x.size(1)):
            token = x[b, t]
            probs = torch.softmax(moe.router(token), -1)
            top, experts = probs.topk(moe.top_k)
            for weight, e in zip(top / top.sum(), experts.tolist()):
                out[b, t] += weight * moe.experts[e](token[None])[0]
    return out


@pytest.mark.parametrize("expert", ["gelu", "swiglu"])
def test_moe_with_one_expert_equals_the_dense_ffn(expert):
    cfg = config(ffn="moe", n_experts=1, moe_top_k=1, moe_expert=expert)
    dense = randomize_(FEEDFORWARD.get(expert)(cfg))
    moe = MoE(cfg)
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(moe(x), dense(x))
    assert moe.last_usage.tolist() == [1.0]
    assert moe.aux_loss.item() == pytest.approx(1.0)  # one expert: trivially balanced


@pytest.mark.parametrize("expert", ["gelu", "swiglu"])
@pytest.mark.parametrize("n_experts, top_k", [(4, 1), (4, 2), (5, 3), (3, 3)])
def test_moe_equals_a_token_by_token_reference(expert, n_experts, top_k):
    moe = randomize_(MoE(config(ffn="moe", n_experts=n_experts, moe_top_k=top_k, moe_expert=expert)))
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(moe(x), moe_reference(moe, x), atol=1e-5, rtol=1e-5)


def test_moe_with_experts_that_get_no_tokens():
    moe = randomize_(MoE(config(ffn="moe", n_experts=8, moe_top_k=2)))
    x = torch.randn(1, 1, 16)  # one token: six experts idle
    torch.testing.assert_close(moe(x), moe_reference(moe, x), atol=1e-5, rtol=1e-5)
    assert (moe.last_usage > 0).sum() == 2 and moe.last_usage.sum().item() == pytest.approx(1.0)


def test_moe_under_bf16_autocast_matches_the_dense_ffn_and_trains():
    # the experts return bfloat16 under autocast while the stream is float32: the mix must add up
    cfg = config(ffn="moe", n_experts=1, moe_top_k=1)
    dense = randomize_(FEEDFORWARD.get("gelu")(cfg))
    moe = MoE(cfg)
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = moe(x), dense(x)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out, want)
    out.float().sum().backward()
    assert x.grad is not None and moe.experts[0].fc.weight.grad.abs().sum() > 0


def test_route_top_k():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 0.0, 2.9]])
    probs, experts, weights = route_top_k(logits, 2)
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    assert experts.tolist() == [[3, 2], [0, 3]]
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    torch.testing.assert_close(weights[0], torch.softmax(torch.tensor([3.0, 2.0]), -1))


def test_load_balancing_loss_is_one_when_balanced_and_e_when_collapsed():
    E, N = 4, 8
    uniform = torch.full((N, E), 1 / E)
    balanced = torch.arange(N)[:, None] % E  # top-1, every expert gets N / E tokens
    loss, usage = load_balancing_loss(uniform, balanced, E)
    assert loss.item() == pytest.approx(1.0) and usage.tolist() == [0.25] * 4
    collapsed_probs = torch.zeros(N, E)
    collapsed_probs[:, 0] = 1.0
    loss, usage = load_balancing_loss(collapsed_probs, torch.zeros(N, 1, dtype=torch.long), E)
    assert loss.item() == pytest.approx(E) and usage.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_moe_usage_and_aux_loss_after_forward():
    moe = randomize_(MoE(config(ffn="moe", n_experts=4, moe_top_k=2)))
    x = torch.randn(4, 8, 16)
    moe(x)
    probs, experts, _ = route_top_k(moe.router(x.reshape(-1, 16)), 2)
    counts = torch.bincount(experts.flatten(), minlength=4).float()
    torch.testing.assert_close(moe.last_usage, counts / counts.sum())
    assert not moe.last_usage.requires_grad and "last_usage" not in moe.state_dict()
    torch.testing.assert_close(moe.aux_loss, 4 * (moe.last_usage * probs.mean(0)).sum())
    moe.aux_loss.backward()  # the balancing loss trains the router
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_moe_gradients_reach_router_and_used_experts():
    moe = randomize_(MoE(config(ffn="moe", n_experts=4, moe_top_k=2)))
    moe(torch.randn(2, 16, 16)).pow(2).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0  # through the renormalised top-k weights
    for e, expert in enumerate(moe.experts):
        used = moe.last_usage[e] > 0
        assert (expert.fc.weight.grad is not None and expert.fc.weight.grad.abs().sum() > 0) == bool(used)


def test_moe_residual_projections_are_every_experts_output_layer():
    moe = MoE(config(ffn="moe", n_experts=3, moe_expert="swiglu"))
    assert moe.residual_projections() == [expert.w3 for expert in moe.experts]
