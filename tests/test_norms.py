from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lm import NORMS, ModelConfig
from lm.norms import LayerNorm, RMSNorm, ScaleNorm, rms_norm, scale_norm


def config(**overrides) -> ModelConfig:
    return ModelConfig(**{"d_model": 32, "n_head": 4, **overrides})


def test_registered_names():
    assert NORMS.names() == ["layernorm", "rmsnorm", "scalenorm"]
    assert NORMS.get("rmsnorm") is RMSNorm


# ---- RMSNorm ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.1])
def test_rms_norm_equals_torch(eps):
    x = torch.randn(3, 7, 32) * 5 + 1
    weight = torch.randn(32)
    torch.testing.assert_close(rms_norm(x, weight, eps), F.rms_norm(x, (32,), weight, eps))
    torch_module = torch.nn.RMSNorm(32, eps=eps)
    module = RMSNorm(config(norm="rmsnorm", norm_eps=eps))
    with torch.no_grad():
        torch_module.weight.copy_(weight)
        module.weight.copy_(weight)
    torch.testing.assert_close(module(x), torch_module(x))


def test_rms_norm_written_out():
    x = torch.randn(4, 16, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rms_norm(x, None, 1e-6), expected)
    out = RMSNorm(config(norm="rmsnorm", d_model=16))(x.float())
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(4), atol=1e-4, rtol=0)  # unit RMS at init


def test_rms_norm_does_not_centre():
    x = torch.randn(8, 32) + 3.0
    assert (rms_norm(x, None, 1e-6).mean(-1) > 0.5).all()  # LayerNorm would give mean 0
    assert rms_norm(x, None, 1e-6).mean(-1).abs().max() > LayerNorm(config())(x).mean(-1).abs().max() + 0.5


def test_rms_norm_in_bfloat16_is_computed_in_float32():
    x = torch.randn(2, 5, 64) * 100
    out = rms_norm(x.bfloat16(), torch.ones(64, dtype=torch.bfloat16), 1e-6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), rms_norm(x, None, 1e-6), atol=2e-2, rtol=1e-2)


# ---- LayerNorm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_follows_config(bias):
    module = LayerNorm(config(bias=bias, norm_eps=1e-3))
    assert isinstance(module, torch.nn.LayerNorm)
    assert module.eps == 1e-3 and (module.bias is not None) == bias
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(module(x), F.layer_norm(x, (32,), module.weight, module.bias, 1e-3))


# ---- ScaleNorm ------------------------------------------------------------------------------------
def test_scalenorm_projects_onto_a_sphere_of_radius_g():
    module = ScaleNorm(config(norm="scalenorm"))
    assert module.g.shape == () and module.g.item() == pytest.approx(math.sqrt(32))
    x = torch.randn(4, 9, 32) * 7
    out = module(x)
    torch.testing.assert_close(out.norm(dim=-1), torch.full((4, 9), math.sqrt(32)))
    torch.testing.assert_close(out, math.sqrt(32) * x / x.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(module(3.5 * x), out)  # invariant to the input's scale


def test_scalenorm_of_zero_is_zero_not_nan():
    out = scale_norm(torch.zeros(2, 8), torch.tensor(2.0), 1e-5)
    assert torch.equal(out, torch.zeros(2, 8))


def test_scalenorm_learns_its_gain():
    module = ScaleNorm(config(norm="scalenorm"))
    module(torch.randn(3, 32)).sum().backward()
    assert module.g.grad is not None and module.g.grad.shape == ()


# ---- sizes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["layernorm", "rmsnorm", "scalenorm"])
@pytest.mark.parametrize("bias", [True, False])
def test_param_count_matches_the_module(name, bias):
    cfg = config(norm=name, bias=bias)
    cls = NORMS.get(name)
    assert cls.param_count(cfg) == sum(p.numel() for p in cls(cfg).parameters())
