"""`lm.book.param_breakdown`: the size of each part of a model, checked against a built model's parameters."""

from __future__ import annotations

import pytest
import torch

import lm
from lm.book import PARAM_GROUPS, param_breakdown


def group_of(name: str) -> str:
    """Which breakdown group a state-dict name of `lm.GPT` belongs to."""
    if name.startswith(("tok_emb.", "pos_emb.")):
        return "embeddings"
    if name.startswith("lm_head."):
        return "head"
    if name.startswith("norm_f.") or ".norm1." in name or ".norm2." in name:
        return "norms"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "feed-forward"
    raise AssertionError(f"parameter {name} belongs to no group")


def measured_breakdown(model: lm.GPT) -> dict[str, int]:
    counts = dict.fromkeys(PARAM_GROUPS, 0)
    for name, p in model.named_parameters():  # a tied head is yielded once, as tok_emb.weight
        counts[group_of(name)] += p.numel()
    return counts


CONFIGS = {
    "default": dict(),
    "untied, no bias": dict(tie_weights=False, bias=False),
    "rope rmsnorm swiglu": dict(pos="rope", norm="rmsnorm", ffn="swiglu", bias=False),
    "sinusoidal scalenorm post": dict(pos="sinusoidal", norm="scalenorm", norm_position="post"),
    "moe gelu experts": dict(ffn="moe", n_experts=4, moe_top_k=2),
    "moe swiglu experts, gqa": dict(ffn="moe", n_experts=3, moe_top_k=1, moe_expert="swiglu", n_kv_heads=2),
    "no positions, d_ff": dict(pos="none", d_ff=40),
}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_breakdown_matches_the_built_model(overrides):
    config = lm.ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, d_model=32, **overrides)
    model = lm.GPT(config)
    breakdown = param_breakdown(config)
    assert list(breakdown) == list(PARAM_GROUPS)
    assert breakdown == measured_breakdown(model)
    assert sum(breakdown.values()) == lm.count_params(config) == model.num_params(non_embedding=False)


@pytest.mark.parametrize("name", sorted(lm.PRESETS))
def test_breakdown_of_every_preset(name):
    config = lm.preset(name)
    with torch.device("meta"):  # structure only, no memory
        model = lm.GPT(config)
    assert param_breakdown(config) == measured_breakdown(model)


def test_tied_head_costs_nothing_and_untying_adds_one_table():
    tied = param_breakdown(lm.preset("gpt2-124m"))
    untied = param_breakdown(lm.preset("gpt2-124m", tie_weights=False))
    assert tied["head"] == 0 and untied["head"] == 50257 * 768
    assert {k: v for k, v in tied.items() if k != "head"} == {k: v for k, v in untied.items() if k != "head"}
    assert tied["embeddings"] == (50257 + 1024) * 768  # tokens and learned positions


def test_the_book_and_lm_share_one_breakdown():
    assert lm.book.param_breakdown is lm.param_breakdown is lm.presets.param_breakdown
