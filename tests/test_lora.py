"""LoRA (`lm.lora`): parity with peft on transformers' GPT-2, the fused path against the formula,
merging, training only the adapters (trainer, resume, int8 base), adapter files, generation, errors."""

from __future__ import annotations

import argparse
import copy
import io
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lm
from lm import GPT, ModelConfig, TrainConfig
from lm.lora import (
    LoRAConfig, LoRAError, LoRALinear, apply_lora, linear_layer_names, load_adapters, lora_delta, lora_layers,
    lora_state_dict, merge_lora, remove_lora, save_adapters, trainable_parameters, unmerge_lora,
)
from lm.quantize import Int8Linear, quantize_int8

from helpers import sharp_model


def randomize_adapters(model: nn.Module, std: float = 0.1) -> None:
    """Non-zero B (and fresh A), so that the adapters change what the model computes."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.normal_(std=std)
            layer.lora_B.normal_(std=std)


def adapted_model(config: ModelConfig, lora: LoRAConfig | None = None, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = sharp_model(config)
    apply_lora(model, lora or LoRAConfig(rank=4, alpha=8))
    randomize_adapters(model)
    return model


def text_run(n_layer: int = 2, **model_kwargs):
    """A character model and its data, for training runs."""
    text = "the king and queen of a small castle walked to the river at dawn while birds sang. " * 30
    tok = lm.CharTokenizer.train(text)
    ids = torch.tensor(tok.encode(text))
    config = ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=n_layer, n_head=2, d_model=32,
                         **model_kwargs)
    return GPT(config, tokenizer=tok), ids[:2000], ids[2000:]


def quick(**overrides) -> TrainConfig:
    settings = dict(max_steps=6, batch_size=4, lr=1e-2, warmup_steps=1, eval_interval=3, eval_iters=1,
                    progress=False)
    return TrainConfig(**{**settings, **overrides})


# ---- against peft on Hugging Face GPT-2 ------------------------------------------------------------
def gpt2_pair(transformers):
    """A random transformers GPT2LMHeadModel and the lm GPT holding the same weights."""
    hf_config = transformers.GPT2Config(
        vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4, activation_function="gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = GPT(ModelConfig(vocab_size=61, block_size=16, n_layer=2, n_head=4, d_model=32)).eval()
    with torch.no_grad():
        t = hf.transformer
        ours.tok_emb.weight.copy_(t.wte.weight)
        ours.pos_emb.weight.copy_(t.wpe.weight)
        for h, block in zip(t.h, ours.blocks):
            for hf_norm, our_norm in [(h.ln_1, block.norm1), (h.ln_2, block.norm2), (t.ln_f, ours.norm_f)]:
                our_norm.weight.copy_(hf_norm.weight)
                our_norm.bias.copy_(hf_norm.bias)
            # Conv1D stores its weight as [in, out], nn.Linear as [out, in]
            for conv, linear in [(h.attn.c_attn, block.attn.qkv), (h.attn.c_proj, block.attn.proj),
                                 (h.mlp.c_fc, block.mlp.fc), (h.mlp.c_proj, block.mlp.proj)]:
                linear.weight.copy_(conv.weight.T)
                linear.bias.copy_(conv.bias)
    return hf, ours


def adapter_pairs(peer, ours):
    """(peft's LoRA layer, lm's LoRALinear) for every adapted layer: c_attn <-> qkv, both c_proj <-> proj."""
    pairs = []
    for h, block in zip(peer.base_model.model.transformer.h, ours.blocks):
        pairs += [(h.attn.c_attn, block.attn.qkv), (h.attn.c_proj, block.attn.proj), (h.mlp.c_proj, block.mlp.proj)]
    return pairs


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a transformers API being renamed
def test_logits_gradients_and_merge_match_peft():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf, ours = gpt2_pair(transformers)
    idx = torch.randint(0, 61, (3, 16))
    with torch.no_grad():
        base_logits = ours(idx)[0]
        torch.testing.assert_close(base_logits, hf(idx).logits, atol=1e-5, rtol=1e-5)  # the same base

    peer = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, fan_in_fan_out=True,
                                                   target_modules=["c_attn", "c_proj"]))
    wrapped = apply_lora(ours, LoRAConfig(rank=4, alpha=12, targets=("qkv", "proj")))
    pairs = adapter_pairs(peer, ours)
    assert len(wrapped) == len(pairs) == 6
    randomize_adapters(ours, std=0.3)
    with torch.no_grad():  # A (r, in) and B (out, r) have the same layout in both; only the base is [in, out]
        for theirs, layer in pairs:
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)

    targets = torch.randint(0, 61, (3, 16))
    logits, loss = ours(idx, targets)
    peer_logits = peer(input_ids=idx).logits
    torch.testing.assert_close(logits, peer_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, base_logits, atol=1e-3)  # B != 0: the adapters change the outputs
    peer_loss = F.cross_entropy(peer_logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, peer_loss, atol=1e-6, rtol=1e-6)
    loss.backward()
    peer_loss.backward()
    for theirs, layer in pairs:
        torch.testing.assert_close(layer.lora_A.grad, theirs.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.grad, theirs.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-4)
        assert layer.lora_B.grad.abs().max() > 0

    # merging: peft transposes the change into Conv1D's [in, out] weight, lm adds it to [out, in]
    merged_peer = peer.merge_and_unload()
    merge_lora(ours)
    for h, block in zip(merged_peer.transformer.h, ours.blocks):
        torch.testing.assert_close(block.attn.qkv.base.weight, h.attn.c_attn.weight.T, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(block.mlp.proj.base.weight, h.mlp.c_proj.weight.T, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], merged_peer(idx).logits, atol=1e-5, rtol=1e-5)


# ---- the layer -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_path_matches_the_formula(bias, dropout):
    layer = LoRALinear(nn.Linear(24, 40, bias=bias), rank=4, alpha=8, dropout=dropout).train()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 24, requires_grad=True)
    weights = torch.randn(3, 5, 40)
    results = []
    for fused in (True, False):
        layer.fused = fused
        torch.manual_seed(1)  # the same dropout mask for both
        y = layer(x)
        (y * weights).sum().backward()
        results.append([y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad])
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    for fast, reference in zip(*results):
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    assert layer.base.weight.grad is None  # frozen


def test_formula_is_base_plus_scaled_low_rank_product():
    base = nn.Linear(16, 12)
    layer = LoRALinear(base, rank=2, alpha=6).eval()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 16)
    expected = base(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * (6 / 2)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora_delta(x, layer.lora_A, layer.lora_B, 3.0), expected - base(x), atol=1e-5,
                               rtol=1e-5)
    assert layer.lora_A.shape == (2, 16) and layer.lora_B.shape == (12, 2)
    assert not base.weight.requires_grad and not base.bias.requires_grad


def test_a_starts_like_a_linear_weight_and_b_at_zero():
    layer = LoRALinear(nn.Linear(256, 64), rank=16)
    bound = 1 / math.sqrt(256)  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert torch.equal(layer.lora_B, torch.zeros(64, 16))


def test_fused_path_under_autocast_matches_the_formula():
    layer = LoRALinear(nn.Linear(32, 48), rank=4).train()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 32, requires_grad=True)
    results = []
    for fused in (True, False):
        layer.fused = fused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == x.grad.dtype == torch.float32
        results.append([y.float(), x.grad, layer.lora_A.grad, layer.lora_B.grad])
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    for fast, reference in zip(*results):
        torch.testing.assert_close(fast, reference, atol=0.05, rtol=0.02)


def test_dropout_acts_in_training_mode_only():
    layer = LoRALinear(nn.Linear(32, 32), rank=4, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 32)
    layer.eval()
    no_dropout = layer.base(x) + lora_delta(x, layer.lora_A, layer.lora_B, layer.scale)
    torch.testing.assert_close(layer(x), no_dropout, atol=1e-5, rtol=1e-5)
    layer.train()
    first, second = layer(x), layer(x)
    assert not torch.allclose(first, second)  # a fresh mask each call
    assert LoRALinear(nn.Linear(4, 4), dropout=0.0).dropout is None  # no dropout: nothing to run


def test_merge_and_unmerge_keep_the_outputs(tiny_config):
    model = adapted_model(tiny_config).eval()
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    base_weight = model.blocks[0].attn.qkv.base.weight.clone()
    adapted = model(idx)[0]
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    assert not torch.equal(model.blocks[0].attn.qkv.base.weight, base_weight)
    merged = model(idx)[0]
    merge_lora(model)  # merging twice changes nothing
    torch.testing.assert_close(model(idx)[0], merged)
    unmerge_lora(model)
    unmerged = model(idx)[0]
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unmerged, adapted, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.blocks[0].attn.qkv.base.weight, base_weight, atol=1e-6, rtol=0)


def test_remove_lora_gives_back_plain_layers(tiny_config):
    torch.manual_seed(0)
    base = sharp_model(tiny_config)
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    before = base(idx)[0]
    plain_names = set(base.state_dict())

    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(rank=4))
    randomize_adapters(model)
    remove_lora(model, merge=False)  # the base as it was
    assert set(model.state_dict()) == plain_names
    assert torch.equal(model(idx)[0], before)
    assert all(p.requires_grad for p in model.parameters()) and model.lora_config is None

    apply_lora(model, LoRAConfig(rank=4))  # again, now that the first adapters are gone
    randomize_adapters(model)
    adapted = model(idx)[0]
    remove_lora(model)  # merged into the weights
    assert set(model.state_dict()) == plain_names
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(idx)[0], adapted, atol=1e-4, rtol=1e-4)


# ---- putting adapters into a model ---------------------------------------------------------------
def test_apply_lora_wraps_targets_and_freezes_the_rest(tiny_config):
    model = GPT(tiny_config)
    n_before = sum(p.numel() for p in model.parameters())
    wrapped = apply_lora(model, LoRAConfig(rank=4, targets=("qkv", "proj")))
    assert wrapped == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.proj",
                       "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.proj"]
    assert isinstance(model.blocks[0].mlp.fc, nn.Linear)  # not a target
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_{m}" for name in wrapped for m in "AB"}
    C = tiny_config.d_model
    per_block = 4 * (C + 3 * C) + 4 * (C + C) + 4 * (4 * C + C)  # r (in + out) for qkv, attn.proj, mlp.proj
    assert trainable_parameters(model) == (2 * per_block, n_before + 2 * per_block)
    assert model.lora_config == LoRAConfig(rank=4, targets=("qkv", "proj"))
    # state-dict names: the base weights one level down, the adapters beside them
    assert {"blocks.0.attn.qkv.base.weight", "blocks.0.attn.qkv.lora_A", "blocks.0.attn.qkv.lora_B"} <= set(
        model.state_dict())
    assert set(lora_state_dict(model)) == {f"{name}.lora_{m}" for name in wrapped for m in "AB"}


def test_dotted_targets_pick_one_kind_of_layer(tiny_config):
    model = GPT(tiny_config)
    assert apply_lora(model, LoRAConfig(targets=("attn.proj", "mlp.fc"))) == [
        "blocks.0.attn.proj", "blocks.0.mlp.fc", "blocks.1.attn.proj", "blocks.1.mlp.fc"]
    swiglu = GPT(ModelConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, d_model=16, ffn="swiglu", bias=False))
    assert apply_lora(swiglu, LoRAConfig(targets="w1")) == ["blocks.0.mlp.w1"]  # one string is one target


def test_adapters_start_as_no_change(tiny_config):
    torch.manual_seed(0)
    model = sharp_model(tiny_config)
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    # without gradients, so both runs take torch's operations (a float32 training forward on a CPU runs fc's
    # bias and GELU in lm's C kernel, which a LoRA fc does not take: the same numbers to float tolerance only)
    with torch.no_grad():
        before = model(idx)[0]
        apply_lora(model, LoRAConfig(rank=8, targets=("qkv", "proj", "fc")))
        assert torch.equal(model(idx)[0], before)  # B = 0: bit for bit


def test_lora_in_training_mode_follows_the_model(tiny_config):
    model = GPT(tiny_config).eval()
    apply_lora(model, LoRAConfig(dropout=0.1))
    assert not any(m.training for m in model.modules())


# ---- training ------------------------------------------------------------------------------------
def test_training_changes_only_the_adapters():
    torch.manual_seed(0)
    model, train_ids, val_ids = text_run()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapters = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer = lm.trainer.Trainer(model, train_ids, val_ids, quick(grad_clip=0.5))
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}  # the adapters alone
    out = trainer.train_step()
    assert math.isfinite(float(out["grad_norm"])) and float(out["grad_norm"]) > 0  # clipping saw the adapters
    history = trainer.fit()
    assert history.loss[-1] < history.loss[0]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # bit for bit
            assert p.grad is None
        else:
            assert not torch.equal(p, adapters[name]), name


def test_only_adapters_get_gradients(tiny_config):
    model = adapted_model(tiny_config).train()
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    model(idx, idx)[1].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config):
    grads = []
    for recompute in (False, True):
        config = ModelConfig(**{**tiny_config.to_dict(), "gradient_checkpointing": recompute})
        model = adapted_model(config).train()
        idx = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        model(idx, idx)[1].backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_checkpoints_of_a_lora_run_resume_exactly(tmp_path):
    class Stop(Exception):
        pass

    def run(out_dir, callback=None, resume=None, seed=0):
        torch.manual_seed(seed)
        model, train_ids, val_ids = text_run()
        apply_lora(model, LoRAConfig(rank=4, dropout=0.1))  # dropout draws random numbers
        return lm.train(model, train_ids, val_ids, quick(out_dir=str(out_dir)), callback=callback, resume=resume)

    full = run(tmp_path / "full")

    def stop_at_three(history):
        if history.eval_step[-1] == 2:
            raise Stop

    with pytest.raises(Stop):
        run(tmp_path / "part", callback=stop_at_three)
    resumed = run(tmp_path / "part", resume=tmp_path / "part" / "last.pt", seed=99)  # other weights: they get loaded
    assert resumed.loss == full.loss and resumed.val_loss == full.val_loss  # bit for bit


def test_int8_base_with_adapters_trains_and_generates():
    torch.manual_seed(0)
    model, train_ids, val_ids = text_run()
    quantize_int8(model)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert isinstance(model.blocks[0].attn.qkv.base, Int8Linear)
    assert model.blocks[0].attn.qkv.lora_A.dtype == torch.float32
    int8 = {name: t.clone() for name, t in model.state_dict().items() if "lora_" not in name}
    history = lm.train(model, train_ids, val_ids, quick(max_steps=10, eval_interval=5))
    assert history.loss[-1] < history.loss[0]
    assert all(torch.equal(t, int8[name]) for name, t in model.state_dict().items() if name in int8)
    assert model.blocks[0].attn.qkv.lora_B.abs().max() > 0
    prompt = train_ids[:5][None]
    cached = model.generate(prompt, max_new_tokens=12, temperature=0)
    assert cached.shape == (1, 17)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=12, temperature=0, use_cache=False))
    with pytest.raises(LoRAError, match="float weights"):
        merge_lora(model)


def test_int8_base_gradients_are_those_of_its_dequantized_weights(tiny_config):
    """Int8Linear's fused kernel has no backward; the adapter supplies dL/dx = dL/dy @ W."""
    torch.manual_seed(0)
    float_model = sharp_model(tiny_config)
    int8_model = quantize_int8(copy.deepcopy(float_model))
    with torch.no_grad():  # the float model gets the weights the int8 one really has
        for (name, module), float_module in zip(int8_model.named_modules(), float_model.modules()):
            if isinstance(module, Int8Linear):
                module.fused = False  # the float32 product, so that the comparison can be tight
                float_module.weight.copy_(module.dequantized())
    grads = []
    for model in (float_model, int8_model):
        torch.manual_seed(1)
        apply_lora(model, LoRAConfig(rank=4, targets=("qkv", "proj", "fc")))
        randomize_adapters(model)
        idx = torch.randint(0, tiny_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        model.train()(idx, idx)[1].backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---- generation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("merged", [False, True])
def test_cached_and_uncached_generation_agree_with_adapters(tiny_config, merged):
    model = adapted_model(ModelConfig(**{**tiny_config.to_dict(), "block_size": 40})).eval()
    if merged:
        merge_lora(model)
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    cached = model.generate(prompt, max_new_tokens=20, temperature=0)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=20, temperature=0, use_cache=False))
    sampled = dict(max_new_tokens=20, temperature=1.0, top_k=10, seed=3)
    assert torch.equal(model.generate(prompt, **sampled), model.generate(prompt, use_cache=False, **sampled))


# ---- adapter files -------------------------------------------------------------------------------
def test_saved_adapters_load_onto_a_fresh_base(tmp_path):
    config = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, d_model=64)
    torch.manual_seed(0)
    base_state = copy.deepcopy(sharp_model(config).state_dict())
    model = GPT(config).eval()
    model.load_state_dict(base_state)
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=("qkv", "attn.proj")))
    randomize_adapters(model)
    path = save_adapters(model, tmp_path / "adapters.safetensors")

    fresh = GPT(config).eval()
    fresh.load_state_dict(base_state)
    assert load_adapters(fresh, path) == list(lora_layers(model))
    assert fresh.lora_config == model.lora_config
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(fresh(idx)[0], model(idx)[0])
    full = io.BytesIO()
    torch.save(model.state_dict(), full)
    assert path.stat().st_size < full.getbuffer().nbytes / 20
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind

    randomize_adapters(fresh)  # loading into existing adapters overwrites their values
    load_adapters(fresh, path)
    assert torch.equal(fresh(idx)[0], model(idx)[0])


def test_adapters_trained_on_a_float_base_load_onto_its_int8_version(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()  # GPT-2's initialisation: weights of the size trained ones have
    int8 = quantize_int8(copy.deepcopy(model))
    apply_lora(model, LoRAConfig(rank=4))
    randomize_adapters(model)
    save_adapters(model, tmp_path / "a.safetensors")
    load_adapters(int8, tmp_path / "a.safetensors")  # the fingerprint is the config's: int8 or not
    assert isinstance(int8.blocks[0].attn.qkv.base, Int8Linear)
    for name, tensor in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(int8)[name], tensor)
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    float_logits, int8_logits = model(idx)[0], int8(idx)[0]
    assert (int8_logits - float_logits).abs().max() < 0.05 * float_logits.abs().max()


def test_without_safetensors_adapters_are_saved_with_torch_save(tmp_path, tiny_config, monkeypatch):
    model = adapted_model(tiny_config)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if it were not installed
    path = save_adapters(model, tmp_path / "adapters.pt")
    assert path.read_bytes()[:2] == b"PK"  # torch.save's archive
    fresh = sharp_model(tiny_config)
    fresh.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k})
    load_adapters(fresh, path)
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    assert torch.equal(fresh.eval()(idx)[0], model.eval()(idx)[0])


def test_loading_onto_another_base_names_the_difference(tmp_path, tiny_config):
    save_adapters(adapted_model(tiny_config), tmp_path / "a.safetensors")
    other = GPT(ModelConfig(**{**tiny_config.to_dict(), "d_model": 48}))
    with pytest.raises(LoRAError, match=r"another base model \(d_model: adapters 32, model 48\)"):
        load_adapters(other, tmp_path / "a.safetensors")
    assert not lora_layers(other)  # nothing changed
    # dropout only changes training: the adapters still fit
    load_adapters(GPT(ModelConfig(**{**tiny_config.to_dict(), "dropout": 0.2})), tmp_path / "a.safetensors")
    with pytest.raises(LoRAError, match="remove_lora"):
        load_adapters(adapted_model(tiny_config, LoRAConfig(rank=2)), tmp_path / "a.safetensors")


def test_damaged_or_foreign_files_are_refused(tmp_path, tiny_config):
    model = GPT(tiny_config)
    with pytest.raises(LoRAError, match="does not exist"):
        load_adapters(model, tmp_path / "missing.safetensors")
    good = save_adapters(adapted_model(tiny_config), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not an adapter file" * 10)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    code = tmp_path / "code.pt"
    torch.save({"metadata": argparse.Namespace(evil=True), "tensors": {}}, code)  # a class: never unpickled
    for path in (truncated, garbage, other, code):
        with pytest.raises(LoRAError, match="cannot read"):
            load_adapters(model, path)
    assert not lora_layers(model)


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, match", [
    (dict(rank=0), "rank=0 must be a positive int"),
    (dict(rank=2.5), "rank=2.5"),
    (dict(rank=True), "rank=True"),
    (dict(alpha=0), "alpha=0 must be a number > 0"),
    (dict(alpha=float("nan")), "alpha=nan"),
    (dict(dropout=1.0), "dropout=1.0 must be a number with 0 <= dropout < 1"),
    (dict(dropout=-0.1), "dropout=-0.1"),
    (dict(targets=()), "targets=\\(\\) must be a non-empty tuple"),
    (dict(targets=("qkv", "")), "targets="),
    (dict(targets=(".proj",)), "targets="),
])
def test_bad_settings_are_named(settings, match):
    with pytest.raises(LoRAError, match=match):
        LoRAConfig(**settings)


def test_config_round_trips_through_a_dict():
    config = LoRAConfig(rank=4, alpha=8.0, dropout=0.05, targets=["qkv", "attn.proj"])
    assert config.targets == ("qkv", "attn.proj")
    assert LoRAConfig.from_dict(config.to_dict()) == config
    assert config.scale == 2.0
    with pytest.raises(LoRAError, match=r"unknown LoRA config field\(s\) \['r'\]"):
        LoRAConfig.from_dict({"r": 8})


def test_unknown_target_lists_the_layers_there_are(tiny_config):
    model = GPT(tiny_config)
    with pytest.raises(LoRAError, match=r"target 'q_proj' matches no Linear layer.*\['fc', 'lm_head', 'proj', 'qkv'\]"):
        apply_lora(model, LoRAConfig(targets=("qkv", "q_proj")))
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # nothing changed
    assert "blocks.0.attn.qkv" in linear_layer_names(model)


def test_applying_twice_or_to_a_tied_head_is_refused(tiny_config):
    model = GPT(tiny_config)
    apply_lora(model)
    with pytest.raises(LoRAError, match="already has LoRA adapters"):
        apply_lora(model)
    with pytest.raises(LoRAError, match="shares its weight with the token embedding"):
        apply_lora(GPT(tiny_config), LoRAConfig(targets=("lm_head",)))
    untied = GPT(ModelConfig(**{**tiny_config.to_dict(), "tie_weights": False}))
    assert apply_lora(untied, LoRAConfig(targets=("lm_head",))) == ["lm_head"]


def test_functions_need_adapters(tiny_config, tmp_path):
    model = GPT(tiny_config)
    for call in (merge_lora, unmerge_lora, remove_lora, lora_state_dict):
        with pytest.raises(LoRAError, match="no LoRA adapters"):
            call(model)
    with pytest.raises(LoRAError, match="no LoRA adapters"):
        save_adapters(model, tmp_path / "a.safetensors")
    with pytest.raises(LoRAError, match="wraps an nn.Linear"):
        LoRALinear(nn.Embedding(4, 4))
