from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lm import ModelConfig
from lm.positions import (
    LearnedPositionEmbedding, NoPositionEmbedding, RotaryEmbedding, SinusoidalPositionEmbedding, apply_rotary,
    build_positions, rope_tables, rotate_half, sinusoidal_table,
)
from lm.registry import POSITIONS, RegistryError


# ---- sinusoidal and learned ----------------------------------------------------------------------
@pytest.mark.parametrize("T, C", [(1, 2), (7, 8), (10, 5)])
def test_sinusoidal_table_matches_the_formula(T, C):
    table = sinusoidal_table(T, C)
    assert table.shape == (T, C) and table.dtype == torch.float32
    for p in range(T):
        for i in range(C):
            angle = p / 10000 ** ((i - i % 2) / C)
            expected = math.sin(angle) if i % 2 == 0 else math.cos(angle)
            assert table[p, i].item() == pytest.approx(expected, abs=1e-5)


def test_sinusoidal_offset_is_a_slice_of_a_longer_table():
    torch.testing.assert_close(sinusoidal_table(4, 16, offset=6), sinusoidal_table(10, 16)[6:])


def test_sinusoidal_module_is_a_buffer_that_grows():
    module = SinusoidalPositionEmbedding(SimpleNamespace(block_size=8, d_model=6))
    assert list(module.parameters()) == [] and module.state_dict() == {}  # derived, never saved
    torch.testing.assert_close(module(5), sinusoidal_table(5, 6))
    torch.testing.assert_close(module(4, offset=10), sinusoidal_table(14, 6)[10:])  # past block_size


def test_learned_positions_are_an_embedding_table():
    module = LearnedPositionEmbedding(SimpleNamespace(block_size=8, d_model=6))
    assert isinstance(module, nn.Embedding) and list(module.state_dict()) == ["weight"]
    assert module.weight.shape == (8, 6)
    assert torch.equal(module(5), module.weight[:5])
    assert torch.equal(module(3, offset=5), module.weight[5:8])
    with pytest.raises(ValueError, match="block_size"):
        module(4, offset=5)


def test_build_positions_for_every_name():
    config = ModelConfig(d_model=32, n_head=4, block_size=16)
    additive, rope = build_positions(config)
    assert isinstance(additive, LearnedPositionEmbedding) and rope is None
    additive, rope = build_positions(ModelConfig(d_model=32, n_head=4, block_size=16, pos="sinusoidal"))
    assert isinstance(additive, SinusoidalPositionEmbedding) and rope is None
    additive, rope = build_positions(ModelConfig(d_model=32, n_head=4, block_size=16, pos="rope", rope_base=500.0))
    assert additive is None and isinstance(rope, RotaryEmbedding)
    assert rope.head_dim == 8 and rope.base == 500.0 and rope.cos_cached.shape == (16, 8)
    assert build_positions(ModelConfig(pos="none")) == (None, None)
    with pytest.raises(RegistryError, match="learned"):
        build_positions(SimpleNamespace(pos="alibi"))


def test_registry_names_and_parameter_counts():
    assert POSITIONS.names() == ["learned", "none", "rope", "sinusoidal"]
    config = ModelConfig(d_model=32, n_head=4, block_size=16)
    for name in POSITIONS.names():
        additive, rope = build_positions(ModelConfig(d_model=32, n_head=4, block_size=16, pos=name))
        built = sum(p.numel() for m in (additive, rope) if m is not None for p in m.parameters())
        assert POSITIONS.get(name).param_count(config) == built
    assert NoPositionEmbedding()(5) is None


# ---- rotary ------------------------------------------------------------------------------------
def test_rotate_half_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(rotate_half(x), torch.tensor([-3.0, -4.0, 1.0, 2.0]))


def test_rotation_preserves_norms():
    cos, sin = rope_tables(20, 16)
    x = torch.randn(2, 3, 20, 16, dtype=torch.float64)
    rotated = apply_rotary(x, cos.double(), sin.double())
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(apply_rotary(x, *rope_tables(20, 16, base=3.0)).norm(dim=-1).double(),
                               x.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_position_zero_is_the_identity():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    rq, rk = rope(q, k)
    torch.testing.assert_close(rq, q)
    torch.testing.assert_close(rk, k)


@pytest.mark.parametrize("shift", [1, 5, 100])
def test_scores_depend_only_on_relative_position(shift):
    """q at position m and k at position n give the same score as at m + shift and n + shift."""
    D = 16
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    cos, sin = (t.double() for t in rope_tables(200, D))

    def score(m, n):
        return apply_rotary(q, cos[m], sin[m]) @ apply_rotary(k, cos[n], sin[n])

    for m, n in [(0, 0), (3, 1), (7, 2), (10, 10), (2, 9)]:
        assert score(m + shift, n + shift).item() == pytest.approx(score(m, n).item(), abs=1e-5)  # float32 angles
    assert score(5, 0).item() != pytest.approx(score(6, 0).item(), abs=1e-6)  # and it does depend on the distance


def test_offset_equals_a_slice_of_a_longer_computation():
    rope = RotaryEmbedding(8, max_seq_len=16)
    q, k = torch.randn(2, 4, 12, 8), torch.randn(2, 1, 12, 8)  # k with fewer heads (GQA) broadcasts the same
    full_q, full_k = rope(q, k)
    part_q, part_k = rope(q[:, :, 5:], k[:, :, 5:], offset=5)
    torch.testing.assert_close(part_q, full_q[:, :, 5:])
    torch.testing.assert_close(part_k, full_k[:, :, 5:])


def test_cache_grows_on_demand():
    rope = RotaryEmbedding(8, max_seq_len=4)
    q = torch.randn(1, 1, 3, 8)
    rq, _ = rope(q, q, offset=10)  # positions 10..12, past the cache of 4
    assert rope.cos_cached.size(0) == 13
    cos, sin = rope_tables(13, 8)
    torch.testing.assert_close(rq, apply_rotary(q, cos[10:], sin[10:]))
    assert rope.state_dict() == {}  # the tables are derived, not saved


def test_tables_stay_float32_and_cast_to_the_input_dtype():
    rope = RotaryEmbedding(8, max_seq_len=32).to(torch.bfloat16)  # casting the module must not coarsen the angles
    q = torch.randn(1, 2, 32, 8)
    rq, _ = rope(q.bfloat16(), q.bfloat16())
    assert rq.dtype == torch.bfloat16 and rope.cos_cached.dtype == torch.float32
    expected, _ = RotaryEmbedding(8, max_seq_len=32)(q, q)
    torch.testing.assert_close(rq.float(), expected, atol=0.05, rtol=0.02)


def test_invalid_rope_settings():
    with pytest.raises(ValueError, match="head_dim=7"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="rope_base"):
        RotaryEmbedding(8, base=1.0)


# ---- parity with Hugging Face Llama ----------------------------------------------------------------
def test_rotate_half_and_apply_match_transformers_llama():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    x = torch.randn(2, 3, 5, 8)
    torch.testing.assert_close(rotate_half(x), llama.rotate_half(x), atol=0, rtol=0)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = rope_tables(5, 8)
    expected_q, expected_k = llama.apply_rotary_pos_emb(q, k, cos[None], sin[None])
    ours_q, ours_k = RotaryEmbedding(8)(q, k)
    torch.testing.assert_close(ours_q, expected_q)
    torch.testing.assert_close(ours_k, expected_k)


@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_tables_match_transformers_llama_rotary_embedding(base):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=32,
                                      rope_theta=base)
    hf = LlamaRotaryEmbedding(config)
    x = torch.randn(1, 20, 64)
    position_ids = torch.arange(3, 23)[None]  # an offset of 3, as after a cache of 3 tokens
    hf_cos, hf_sin = hf(x, position_ids)
    ours = RotaryEmbedding(16, max_seq_len=32, base=base)
    cos, sin = ours.tables(20, offset=3)
    torch.testing.assert_close(cos, hf_cos[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sin, hf_sin[0], atol=1e-6, rtol=1e-6)
    q, k = torch.randn(1, 4, 20, 16), torch.randn(1, 4, 20, 16)
    expected = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    for got, want in zip(ours(q, k, offset=3), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
