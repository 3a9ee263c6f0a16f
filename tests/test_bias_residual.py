"""lm.cpu_kernels.bias_residual (lm_bias_residual, in lm/csrc/causal.c): the residual connection x + (h + bias)
around a sublayer whose output projection h was made without its bias, as `lm.model.Block` runs it in float32
CPU training; bit for bit torch's sum forward and backward, a GPT's training step the same to the bit with and
without it, where it is not used, and the inputs it does not take."""

from __future__ import annotations

import pytest
import torch

from lm import GPT, ModelConfig, cpu_kernels
from lm.lora import LoRAConfig, apply_lora
from lm.model import Block

from helpers import assert_same_step, model_step

needs_kernel = pytest.mark.skipif(cpu_kernels.rows_unavailable(16) is not None,
                                  reason=f"lm's row kernels: {cpu_kernels.rows_unavailable(16)}")
GPT_SMALL = dict(vocab_size=40, block_size=32, n_layer=2, n_head=2, d_model=64, dropout=0.0, ffn="gelu")


@pytest.fixture
def calls(monkeypatch) -> list:
    """The residual sums that went through the kernel, one entry each"""
    seen, real = [], cpu_kernels.BiasResidual.apply

    def counted(*args):
        seen.append(args[1].shape)
        return real(*args)
    monkeypatch.setattr(cpu_kernels.BiasResidual, "apply", counted)
    return seen


def plain_residual(monkeypatch) -> None:
    monkeypatch.setattr(Block, "_residual", staticmethod(lambda x, sublayer, h, *args: x + sublayer(h, *args)))


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 16), (5, 32), (3, 7, 48), (2, 130, 384)])
def test_it_is_torchs_sum_bit_for_bit_forward_and_backward(shape):
    g = torch.Generator().manual_seed(0)
    x, h, grad = (torch.randn(*shape, generator=g) * 3 for _ in range(3))
    bias = torch.randn(shape[-1], generator=g)
    x.view(-1)[3], h.view(-1)[-1] = float("nan"), float("inf")  # carried through as torch carries them
    leaves = [t.clone().requires_grad_() for t in (x, h, bias)]
    want = leaves[0] + (leaves[1] + leaves[2])
    want.backward(grad)
    ours = [t.clone().requires_grad_() for t in (x, h, bias)]
    got = cpu_kernels.bias_residual(ours[0], ours[1] * 1.0, ours[2])  # h: a fresh tensor, as a product is
    got.backward(grad)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    for mine, theirs in zip(ours, leaves):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=0, equal_nan=True)


@needs_kernel
def test_it_writes_the_sum_into_h():
    x, h, bias = torch.randn(4, 32), torch.randn(4, 32), torch.randn(32)
    want = x + (h + bias)
    assert cpu_kernels.bias_residual(x, h, bias) is h
    assert torch.equal(h, want)


@needs_kernel
@pytest.mark.parametrize("options", [{}, {"ffn": "gelu_tanh"}, {"norm_position": "post"}],
                         ids=["pre-norm", "tanh GELU", "post-norm"])
def test_a_gpt_training_step_is_the_same_to_the_bit_with_and_without_it(options, calls, monkeypatch):
    config = ModelConfig(**{**GPT_SMALL, **options})
    ids = torch.randint(0, 40, (3, 33), generator=torch.Generator().manual_seed(1))
    step = model_step(config, ids)
    assert len(calls) == 2 * config.n_layer  # around attention and around the MLP, in every block
    plain_residual(monkeypatch)
    torch_step = model_step(config, ids)
    assert len(calls) == 2 * config.n_layer
    assert_same_step(step, torch_step)


@needs_kernel
def test_where_it_is_not_used(calls):
    ids = torch.randint(0, 40, (2, 16))
    GPT(ModelConfig(**{**GPT_SMALL, "dropout": 0.1}))(ids, ids)[1].backward()  # dropout after the projection
    GPT(ModelConfig(**{**GPT_SMALL, "bias": False}))(ids, ids)[1].backward()  # no bias to add
    GPT(ModelConfig(**{**GPT_SMALL, "d_model": 40, "d_ff": 80}))(ids, ids)[1].backward()  # 40 % 16
    model = GPT(ModelConfig(**GPT_SMALL))
    with torch.no_grad():
        model(ids, ids)  # evaluation
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, ids)
    model.double()(ids, ids)
    assert calls == []
    model = GPT(ModelConfig(**GPT_SMALL))
    apply_lora(model, LoRAConfig(targets=("attn.proj",)))  # attention's proj a LoRA layer: its forward must run
    model(ids, ids)[1].backward()
    assert len(calls) == GPT_SMALL["n_layer"]  # the MLP's residual only
    calls.clear()
    model = GPT(ModelConfig(**GPT_SMALL))
    seen = []
    model.blocks[0].mlp.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    model(ids, ids)[1].backward()
    assert seen == [(2, 16, 64)]  # the hook ran: the first block's MLP went through its own forward
    assert len(calls) == 2 * GPT_SMALL["n_layer"] - 1


def test_switched_off_the_model_adds_as_torch_does(fresh, monkeypatch, calls):
    monkeypatch.setenv("LM_CPU_KERNELS", "0")
    ids = torch.randint(0, 40, (2, 16))
    GPT(ModelConfig(**GPT_SMALL))(ids, ids)[1].backward()
    assert calls == []


def test_inputs_it_does_not_take_are_named():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match=r"x \(4, 32\) and h \(4, 16\) must have one shape"):
        cpu_kernels.bias_residual(x, x[:, :16].contiguous(), torch.zeros(16))
    with pytest.raises(ValueError, match=r"bias \(16,\) one number per column"):
        cpu_kernels.bias_residual(x, x.clone(), torch.zeros(16))
    with pytest.raises(ValueError, match="h must be float32 on the CPU, got torch.float64"):
        cpu_kernels.bias_residual(x, x.double(), torch.zeros(32))
    with pytest.raises(ValueError, match="h must be contiguous"):
        cpu_kernels.bias_residual(x, torch.randn(32, 4).t(), torch.zeros(32))
    with pytest.raises(ValueError, match="empty x"):
        cpu_kernels.bias_residual(x[:0], x[:0].clone(), torch.zeros(32))
    if cpu_kernels.rows_unavailable(16) is None:
        with pytest.raises(RuntimeError, match="a multiple of 16 floats, not 24"):
            cpu_kernels.bias_residual(x[:, :24].contiguous(), x[:, :24].contiguous(), torch.zeros(24))
