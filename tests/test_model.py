from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import sharp_model
from lm import GPT, CharTokenizer, ModelConfig, SamplingError


def randomize_(model: GPT) -> GPT:
    """Give biases and norm parameters non-default values so comparisons exercise them too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    return model


# ---- forward and loss ------------------------------------------------------------------------------
def test_logits_shape_and_loss_equals_cross_entropy(tiny_model, tiny_config):
    B, T, V = 3, 10, tiny_config.vocab_size
    idx = torch.randint(0, V, (B, T))
    targets = torch.randint(0, V, (B, T))
    logits, loss = tiny_model(idx, targets)
    assert logits.shape == (B, T, V)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T)))
    manual = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss, manual)
    assert tiny_model(idx)[1] is None


def test_untrained_loss_is_close_to_uniform(tiny_model, tiny_config):
    V = tiny_config.vocab_size
    _, loss = tiny_model(torch.randint(0, V, (4, 16)), torch.randint(0, V, (4, 16)))
    assert abs(loss.item() - math.log(V)) < 0.1


def test_ignore_index(tiny_model, tiny_config):
    V = tiny_config.vocab_size
    idx, targets = torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 8))
    masked = targets.clone()
    masked[:, :5] = -100
    logits, loss = tiny_model(idx, masked)
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, 5:].reshape(-1, V), targets[:, 5:].reshape(-1)))
    assert not torch.isclose(loss, tiny_model(idx, targets)[1])


def test_input_checks(tiny_model, tiny_config):
    with pytest.raises(ValueError, match=f"exceeds block_size={tiny_config.block_size}"):
        tiny_model(torch.zeros(1, tiny_config.block_size + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        tiny_model(torch.zeros(5, dtype=torch.long))
    tiny_model(torch.zeros(1, tiny_config.block_size, dtype=torch.long))  # exactly block_size is fine


def test_manual_and_sdpa_models_agree(tiny_config):
    sdpa = randomize_(GPT(tiny_config))
    manual = GPT(dataclasses.replace(tiny_config, attention="manual"))
    manual.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    torch.testing.assert_close(manual(idx)[0], sdpa(idx)[0], atol=1e-5, rtol=1e-5)


# ---- weight tying and size -------------------------------------------------------------------------
def test_tied_weights_share_storage(tiny_config):
    tied = GPT(tiny_config)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = GPT(dataclasses.replace(tiny_config, tie_weights=False))
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.tok_emb.weight)


def unique_parameter_count(model: GPT) -> int:
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel()
    return total


@pytest.mark.parametrize("tie_weights", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_num_params(tiny_config, tie_weights, bias):
    model = GPT(dataclasses.replace(tiny_config, tie_weights=tie_weights, bias=bias))
    total = unique_parameter_count(model)
    assert model.num_params(non_embedding=False) == total
    lookup = model.pos_emb.weight.numel() + (0 if tie_weights else model.tok_emb.weight.numel())
    assert model.num_params() == total - lookup


@pytest.mark.parametrize("tie_weights", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_num_params_closed_form(tie_weights, bias):
    V, Tmax, L, C, F_ = 101, 24, 3, 48, 80
    config = ModelConfig(vocab_size=V, block_size=Tmax, n_layer=L, n_head=4, d_model=C, d_ff=F_,
                         bias=bias, tie_weights=tie_weights)
    b = 1 if bias else 0
    norm = C + b * C
    block = (norm + (C * 3 * C + b * 3 * C) + (C * C + b * C)  # norm1, qkv, attention projection
             + norm + (C * F_ + b * F_) + (F_ * C + b * C))  # norm2, mlp fc, mlp projection
    head = 0 if tie_weights else V * C
    expected = V * C + Tmax * C + L * block + norm + head
    model = GPT(config)
    assert model.num_params(non_embedding=False) == expected
    assert model.num_params() == expected - Tmax * C - (0 if tie_weights else V * C)


def test_default_layout_is_twelve_c_squared_per_block():
    C, L = 64, 2
    model = GPT(ModelConfig(vocab_size=10, block_size=8, n_layer=L, n_head=4, d_model=C))
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    assert per_block == 12 * C * C + 13 * C


# ---- initialisation --------------------------------------------------------------------------------
def wide_model(init: str) -> GPT:
    return GPT(ModelConfig(vocab_size=512, block_size=64, n_layer=8, n_head=4, d_model=128, init=init))


def test_gpt2_init_statistics():
    model = wide_model("gpt2")
    residual_std = 0.02 / math.sqrt(2 * 8)
    residual = torch.cat([torch.cat([b.attn.proj.weight.flatten(), b.mlp.proj.weight.flatten()])
                          for b in model.blocks])
    plain = torch.cat([torch.cat([b.attn.qkv.weight.flatten(), b.mlp.fc.weight.flatten()]) for b in model.blocks])
    for values, std in [(residual, residual_std), (plain, 0.02), (model.tok_emb.weight.flatten(), 0.02),
                        (model.pos_emb.weight.flatten(), 0.02)]:
        assert values.std().item() == pytest.approx(std, rel=0.05)
        assert abs(values.mean().item()) < 0.05 * std
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif "norm" in name:
            assert torch.all(p == 1), name


def test_xavier_uniform_init_bound():
    model = wide_model("xavier_uniform")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not model.tok_emb.weight:
            fan_out, fan_in = module.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            w = module.weight
            assert w.abs().max().item() <= bound, name
            assert w.abs().max().item() > 0.95 * bound, name  # fills the whole interval
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name


def test_init_depends_on_the_seed_only(tiny_config):
    torch.manual_seed(7)
    a = GPT(tiny_config)
    torch.manual_seed(7)
    b = GPT(tiny_config)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


# ---- parity with Hugging Face transformers ---------------------------------------------------------
@pytest.mark.parametrize("tie_weights", [True, False])
def test_logits_match_hugging_face_gpt2(tie_weights):
    pytest.importorskip("transformers")
    from hf_convert import gpt2_from_lm

    config = ModelConfig(vocab_size=67, block_size=20, n_layer=2, n_head=4, d_model=32, tie_weights=tie_weights)
    ours = GPT(config).eval()
    with torch.no_grad():  # weights large enough that GELU inputs are O(1), where exact and tanh GELU differ
        for name, p in ours.named_parameters():
            p.normal_(mean=1.0 if "norm" in name and name.endswith("weight") else 0.0, std=0.3)
    hf = gpt2_from_lm(ours)
    assert (hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()) == tie_weights

    idx = torch.randint(0, config.vocab_size, (3, config.block_size))
    with torch.no_grad():
        out = hf(idx, labels=idx)
        logits, loss = ours(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(ours(idx)[0], out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, out.logits[:, :-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)  # HF shifts labels itself


# ---- generation ------------------------------------------------------------------------------------
# ---- composition from the config -------------------------------------------------------------------
def composed(**overrides) -> ModelConfig:
    settings = dict(vocab_size=40, block_size=16, n_layer=2, n_head=4, d_model=32, d_ff=48)
    return ModelConfig(**{**settings, **overrides})


def test_default_state_dict_names_are_unchanged(tiny_config):
    """Checkpoints written before components became configurable load into the default model."""
    names = set(GPT(tiny_config).state_dict())
    block = {f"blocks.{i}.{part}.{p}" for i in range(2) for part in ("norm1", "norm2", "attn.qkv", "attn.proj",
                                                                      "mlp.fc", "mlp.proj") for p in ("weight", "bias")}
    expected = {"tok_emb.weight", "pos_emb.weight", "norm_f.weight", "norm_f.bias", "lm_head.weight"} | block
    assert names == expected


def test_rscalm_state_dict_names():
    names = set(GPT(composed(pos="rope", norm="rmsnorm", ffn="swiglu", bias=False, n_layer=1)).state_dict())
    assert names == {"tok_emb.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                     "blocks.0.norm2.weight", "blocks.0.mlp.w1.weight", "blocks.0.mlp.w2.weight",
                     "blocks.0.mlp.w3.weight", "norm_f.weight", "lm_head.weight"}  # seed 002's layout


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope", "none"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "scalenorm"])
@pytest.mark.parametrize("ffn", ["gelu", "swiglu", "moe"])
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_every_component_combination_trains(pos, norm, ffn, norm_position):
    model = GPT(composed(pos=pos, norm=norm, ffn=ffn, norm_position=norm_position, n_experts=3))
    idx = torch.randint(0, 40, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 40) and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("attention", ["sdpa", "manual", "sliding_window", "linear", "block_sparse"])
@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_every_attention_builds_with_rope_and_gqa(attention, n_kv_heads):
    config = composed(attention=attention, n_kv_heads=n_kv_heads, window=4, sparse_block=4, pos="rope",
                      norm="rmsnorm", ffn="swiglu", bias=False)
    model = GPT(config).eval()
    idx = torch.randint(0, 40, (2, 16))
    logits, _ = model(idx)
    assert logits.shape == (2, 16, 40)
    assert model.generate(idx[:, :3], max_new_tokens=4, temperature=0).shape == (2, 7)
    weights = model.attention_weights(idx)
    assert len(weights) == 2 and weights[0].shape == (2, 4, 16, 16)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(2, 4, 16), atol=1e-4, rtol=0)


def test_positions_are_wired_as_configured():
    learned, sinusoidal = GPT(composed()), GPT(composed(pos="sinusoidal"))
    rope, none = GPT(composed(pos="rope", rope_base=500.0)), GPT(composed(pos="none"))
    assert isinstance(learned.pos_emb, torch.nn.Embedding) and learned.rope is None
    assert sinusoidal.pos_emb is not None and list(sinusoidal.pos_emb.parameters()) == [] and sinusoidal.rope is None
    assert rope.pos_emb is None and rope.rope.base == 500.0 and rope.rope.head_dim == 8
    assert none.pos_emb is None and none.rope is None
    # no position information: in one layer, shuffling the earlier tokens leaves the last logits unchanged
    # (with more layers the earlier tokens' own outputs depend on their causal prefixes, hence on order)
    model = randomize_(GPT(composed(pos="none", n_layer=1))).eval()
    idx = torch.randint(0, 40, (1, 8))
    shuffled = torch.cat([idx[:, :7][:, torch.randperm(7)], idx[:, 7:]], dim=1)
    torch.testing.assert_close(model(idx)[0][:, -1], model(shuffled)[0][:, -1], atol=1e-5, rtol=1e-5)


def test_rope_is_passed_to_every_layer():
    calls = []
    model = GPT(composed(pos="rope", n_layer=3)).eval()
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda m, args: calls.append(args[1]))  # attn(x, rope, ...)
    model(torch.randint(0, 40, (1, 5)))
    assert len(calls) == 3 and all(rope is model.rope for rope in calls)


@pytest.mark.parametrize("pos, non_embedding_lookup",
                         [("learned", 16 * 32), ("sinusoidal", 0), ("rope", 0), ("none", 0)])
def test_num_params_subtracts_only_learned_positions(pos, non_embedding_lookup):
    model = GPT(composed(pos=pos))
    assert model.num_params() == model.num_params(non_embedding=False) - non_embedding_lookup


def test_post_norm_block_written_out():
    """post-norm (original transformer, GPT-1): norm after each residual sum and no final norm."""
    model = randomize_(GPT(composed(norm_position="post", n_layer=1))).eval()
    assert isinstance(model.norm_f, torch.nn.Identity) and "norm_f.weight" not in model.state_dict()
    block = model.blocks[0]
    idx = torch.randint(0, 40, (2, 8))
    x = model.tok_emb(idx) + model.pos_emb.weight[:8]
    x = block.norm1(x + block.attn(x))
    x = block.norm2(x + block.mlp(x))
    torch.testing.assert_close(model(idx)[0], model.lm_head(x))


def test_pre_norm_block_written_out():
    model = randomize_(GPT(composed(n_layer=1, norm="rmsnorm", pos="none"))).eval()
    block = model.blocks[0]
    idx = torch.randint(0, 40, (2, 8))
    x = model.tok_emb(idx)
    x = x + block.attn(block.norm1(x))
    x = x + block.mlp(block.norm2(x))
    torch.testing.assert_close(model(idx)[0], model.lm_head(model.norm_f(x)))


def test_gpt2_init_scales_every_residual_projection():
    L = 8
    swiglu = GPT(composed(n_layer=L, d_model=128, d_ff=512, ffn="swiglu", bias=False))
    moe = GPT(composed(n_layer=L, d_model=128, d_ff=512, ffn="moe", n_experts=2, moe_expert="swiglu"))
    residual_std = 0.02 / math.sqrt(2 * L)
    for weights, std in [
        ([b.mlp.w3.weight for b in swiglu.blocks], residual_std),
        ([b.mlp.w1.weight for b in swiglu.blocks] + [b.mlp.w2.weight for b in swiglu.blocks], 0.02),
        ([e.w3.weight for b in moe.blocks for e in b.mlp.experts], residual_std),
        ([b.attn.proj.weight for b in moe.blocks], residual_std),
        ([b.mlp.router.weight for b in moe.blocks], 0.02),
    ]:
        assert torch.cat([w.flatten() for w in weights]).std().item() == pytest.approx(std, rel=0.05)
    scalenorm = GPT(composed(norm="scalenorm"))
    assert all(m.g.item() == pytest.approx(math.sqrt(32)) for m in scalenorm.modules() if hasattr(m, "g"))


# ---- mixture of experts in the model ---------------------------------------------------------------
def test_moe_loss_adds_the_balancing_loss_in_training_only():
    model = GPT(composed(ffn="moe", n_experts=4, moe_top_k=2, moe_aux_loss_coef=0.5))
    idx = torch.randint(0, 40, (2, 16))
    model.train()
    logits, loss = model(idx, idx)
    ce = F.cross_entropy(logits.reshape(-1, 40), idx.reshape(-1))
    aux = torch.stack([b.mlp.aux_loss for b in model.blocks]).mean()
    torch.testing.assert_close(model.aux_loss, aux)
    torch.testing.assert_close(loss, ce + 0.5 * aux)
    assert model.aux_loss.item() >= 1.0 - 1e-6  # 1 when perfectly balanced, more otherwise
    model.eval()
    logits, loss = model(idx, idx)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 40), idx.reshape(-1)))
    assert model.aux_loss is not None
    assert GPT(composed())(idx)[1] is None and GPT(composed()).aux_loss is None


def test_moe_usage_is_kept_per_layer():
    model = GPT(composed(ffn="moe", n_experts=4, moe_top_k=2)).eval()
    model(torch.randint(0, 40, (3, 16)))
    for block in model.blocks:
        assert block.mlp.last_usage.shape == (4,)
        assert block.mlp.last_usage.sum().item() == pytest.approx(1.0)


# ---- gradient checkpointing ------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"ffn": "moe", "n_experts": 3}, {"dropout": 0.2, "pos": "rope"}])
def test_gradient_checkpointing_gives_the_same_gradients(overrides):
    config = composed(**overrides)
    plain = randomize_(GPT(config)).train()
    checkpointed = GPT(dataclasses.replace(config, gradient_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 40, (2, 16))
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(5)  # the same dropout masks; checkpointing replays the RNG when it recomputes
        _, loss = model(idx, idx)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_gradient_checkpointing_only_in_training(monkeypatch):
    import lm.model

    calls = []
    real = lm.model.checkpoint
    monkeypatch.setattr(lm.model, "checkpoint", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    model = GPT(composed(gradient_checkpointing=True))
    idx = torch.randint(0, 40, (1, 8))
    model.train()(idx, idx)[1].backward()
    assert len(calls) == 2  # one per block
    model.eval()(idx)
    with torch.no_grad():
        model.train()(idx)
    assert len(calls) == 2


# ---- padding masks and checkpoints -----------------------------------------------------------------
def test_left_padding_with_rope_leaves_real_tokens_unchanged():
    model = randomize_(GPT(composed(pos="rope", norm="rmsnorm", ffn="swiglu"))).eval()
    idx = torch.randint(1, 40, (1, 10))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), idx], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 10])
    torch.testing.assert_close(model(padded, attention_mask=mask)[0][:, 3:], model(idx)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(padded)[0][:, 3:], model(idx)[0], atol=1e-3)  # without the mask it differs


def test_composed_model_round_trips_through_a_checkpoint(tmp_path):
    from lm import load_model, save_checkpoint

    config = composed(pos="rope", norm="scalenorm", ffn="moe", n_experts=3, norm_position="post", n_kv_heads=2)
    model = randomize_(GPT(config)).eval()
    save_checkpoint(tmp_path / "m.pt", model)
    loaded = load_model(tmp_path / "m.pt", device="cpu")
    assert loaded.config == config
    idx = torch.randint(0, 40, (2, 9))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])


# ---- parity with Hugging Face LLaMA ----------------------------------------------------------------
@pytest.mark.parametrize("n_kv_heads, tie_weights", [(2, True), (4, False), (1, True)])
def test_logits_match_hugging_face_llama(n_kv_heads, tie_weights):
    """An RSCaLM-style model (RoPE, RMSNorm, bias-free SwiGLU, GQA) is LLaMA: copying the weights
    over (q/k/v split from the fused qkv; gate = w1, up = w2, down = w3) gives the same logits."""
    pytest.importorskip("transformers")
    from hf_convert import llama_from_lm

    config = ModelConfig(vocab_size=71, block_size=24, n_layer=2, n_head=4, n_kv_heads=n_kv_heads, d_model=32,
                         d_ff=56, bias=False, tie_weights=tie_weights, pos="rope", rope_base=500.0, norm="rmsnorm",
                         norm_eps=1e-6, ffn="swiglu")
    ours = GPT(config).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.3)
    hf = llama_from_lm(ours)
    assert hf.config._attn_implementation == "eager"
    m = hf.model
    assert (hf.lm_head.weight.data_ptr() == m.embed_tokens.weight.data_ptr()) == tie_weights
    assert sum(p.numel() for p in hf.parameters()) == ours.num_params(non_embedding=False)

    idx = torch.randint(0, config.vocab_size, (3, config.block_size))
    with torch.no_grad():
        out = hf(idx, labels=idx)
        logits, loss = ours(idx[:, :-1], idx[:, 1:])
        full = ours(idx)[0]
    assert full.abs().mean() > 1.0  # logits large enough that a wrong rotation would show
    torch.testing.assert_close(full, out.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, out.logits[:, :-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, out.loss, atol=1e-4, rtol=1e-4)


def test_the_loss_is_computed_in_float32_with_and_without_autocast():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, d_model=16, dropout=0.0))
    idx, targets = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    widened = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    assert torch.equal(loss, widened)  # the float32 cross-entropy of the bf16 logits
    half = model.to(torch.bfloat16)  # no autocast: bf16 logits, still a float32 loss
    logits, loss = half(idx, targets)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()))
