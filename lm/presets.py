"""Presets: the configurations of the seed models, and how many parameters a configuration has.

    config = lm.preset("rscalm-138m")                 # a fresh ModelConfig
    config = lm.preset("roketmodel", vocab_size=tok.vocab_size, block_size=256)
    lm.count_params(config)                            # exact, without building the model: 137,841,408
    lm.param_breakdown(config)                         # the same total, split into embeddings, attention, ...

`param_breakdown` is a closed form from the config alone, and `count_params` its sum; both must equal
`GPT(config).num_params(non_embedding=False)`, which the tests check for every preset (built on the
"meta" device, which allocates nothing) and for random configurations. Two seeds also state
back-of-the-envelope formulas; they are here as written, so a reader can see what they leave out:

    param_formula_seed000   Emb + N * (MHA + FFN) + Head        biases and norms omitted (seed 000)
    param_formula_rscalm    V*C + L * (4C^2 + 3*C*H_ff) + C      tied head, norms approximated (seed 002)
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, ModelConfig
from .registry import ATTENTION, FEEDFORWARD, NORMS, POSITIONS

# Each preset is the set of ModelConfig fields that differ from the defaults; `preset()` builds a new
# config from it every time, so no caller can change another's.
PRESETS: dict[str, dict[str, Any]] = {
    # Seed 000, roketmodel: a character-level GPT. d_model 512, 8 layers, 8 heads, d_ff 2048, context
    # 1024, dropout 0.1, learned positions, pre-LayerNorm, GELU, Xavier-uniform init. Its vocabulary is
    # "ASCII + Turkish extensions + special symbols": 256 leaves room for all of them; pass the
    # tokenizer's vocab_size. Its size formula counts the embedding and the head separately: untied.
    "roketmodel": dict(vocab_size=256, block_size=1024, n_layer=8, n_head=8, d_model=512, d_ff=2048, dropout=0.1,
                       bias=True, tie_weights=False, pos="learned", norm="layernorm", norm_position="pre",
                       ffn="gelu", init="xavier_uniform"),
    # Seed 001: GPT-2 small, exactly as OpenAI released it (124,439,808 parameters), tanh GELU included.
    "gpt2-124m": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768, bias=True,
                      tie_weights=True, pos="learned", norm="layernorm", ffn="gelu_tanh"),
    # Seed 002, RSCaLM: RoPE, RMSNorm (eps 1e-6), bias-free SwiGLU with H_ff = 4C, tied head, V = 32000.
    "rscalm-138m": dict(vocab_size=32000, block_size=1024, n_layer=12, n_head=12, d_model=768, bias=False,
                        tie_weights=True, pos="rope", norm="rmsnorm", norm_eps=1e-6, ffn="swiglu"),
    # The seed's table gives 20 heads for d_model 1024 and 24 heads for 1280; neither divides d_model
    # (1024/20 = 51.2, 1280/24 = 53.3), so the seed's code could not have run them. We keep layers and
    # widths (which set the size) and use head_dim 64: 16 and 20 heads. Heads do not change the count.
    # With ffn_mult 4 the seed's own formula gives 435M and 880M, not 350M and 700M (see tests/test_presets.py).
    "rscalm-350m": dict(vocab_size=32000, block_size=1024, n_layer=24, n_head=16, d_model=1024, bias=False,
                        tie_weights=True, pos="rope", norm="rmsnorm", norm_eps=1e-6, ffn="swiglu"),
    "rscalm-700m": dict(vocab_size=32000, block_size=1024, n_layer=32, n_head=20, d_model=1280, bias=False,
                        tie_weights=True, pos="rope", norm="rmsnorm", norm_eps=1e-6, ffn="swiglu"),
    # Seed 003, the modular GPT: n_embd 256, 8 heads, 6 layers, block 256, vocab 64, dropout 0.1,
    # RMSNorm, SwiGLU, sinusoidal positions, fused ("flash") attention. The seed leaves biases and tying
    # open: bias-free (its components are the LLaMA family's) and tied (its "optional weight tying").
    "modular-gpt": dict(vocab_size=64, block_size=256, n_layer=6, n_head=8, d_model=256, dropout=0.1, bias=False,
                        tie_weights=True, pos="sinusoidal", norm="rmsnorm", ffn="swiglu", attention="sdpa"),
    # Seed 004, Optimus Prime: dim 1024, depth 8, 8 heads sharing 2 key/value heads (GQA), GPT-2's
    # vocabulary, RoPE, SwiGLU, RMSNorm, gradient checkpointing. Not in the seed, taken from the public
    # implementation it describes: SwiGLU width 4 * dim (mlp_ratio 4), an untied head, bias-free
    # attention. block_size 512 is its training max_length. Its SwiGLU Linears keep torch's default
    # biases; ours follow the one `bias` flag (off), 9,216 fewer parameters per layer.
    "optimus-prime": dict(vocab_size=50257, block_size=512, n_layer=8, n_head=8, n_kv_heads=2, d_model=1024,
                          d_ff=4096, bias=False, tie_weights=False, pos="rope", norm="rmsnorm", norm_eps=1e-6,
                          ffn="swiglu", gradient_checkpointing=True),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A new ModelConfig for the preset `name`, with any field replaced by `overrides`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}.")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})


# ---- parameter counts ------------------------------------------------------------------------------
PARAM_GROUPS = ("embeddings", "attention", "feed-forward", "norms", "head")


def param_breakdown(config: ModelConfig) -> dict[str, int]:
    """Where the parameters of `GPT(config)` live, from the config alone (nothing is built):

        embeddings     token table V*C, plus the position table of learned positions (block_size*C)
        attention      every block's qkv: C -> (H + 2*H_kv)*D and proj: C -> C, with their biases
        feed-forward   every block's FFN: MLP, SwiGLU, or MoE router + experts
        norms          two per block, plus the final norm of a pre-norm model
        head           V*C for an untied output layer, 0 when it shares the token table

    Each component class states its own size as `cls.param_count(config)`.
    """
    C, V, L = config.d_model, config.vocab_size, config.n_layer
    n_norms = 2 * L + (1 if config.norm_position == "pre" else 0)
    return {
        "embeddings": V * C + POSITIONS.get(config.pos).param_count(config),
        "attention": L * ATTENTION.get(config.attention).param_count(config),
        "feed-forward": L * FEEDFORWARD.get(config.ffn).param_count(config),
        "norms": n_norms * NORMS.get(config.norm).param_count(config),
        "head": 0 if config.tie_weights else V * C,
    }


def count_params(config: ModelConfig) -> int:
    """The exact number of parameters of `GPT(config)` (a tied head counted once), from the config
    alone: the sum of `param_breakdown(config)`. Equals `GPT(config).num_params(non_embedding=False)`."""
    return sum(param_breakdown(config).values())


def param_formula_seed000(config: ModelConfig) -> int:
    """Seed 000's estimate, as written: Emb + N * (MHA + FFN) + Head, biases and norms omitted, with
    MHA = 4 * C^2 and FFN = 2 * C * d_ff + d_ff * C.

    Against the exact count: its FFN term has three C x d_ff matrices where a GELU MLP has two (it
    overcounts C * d_ff per layer, the size of a gated FFN), and it leaves out learned position
    embeddings, biases and norms. For the roketmodel preset it says 33.8M where the model has 26.0M.
    """
    C, V, N, F_ = config.d_model, config.vocab_size, config.n_layer, config.ffn_width
    mha = 4 * C * C
    ffn = 2 * C * F_ + F_ * C
    return V * C + N * (mha + ffn) + C * V


def param_formula_rscalm(config: ModelConfig) -> int:
    """Seed 002's estimate: V*C + L * (4C^2 + 3*C*H_ff) + C, with H_ff = d_ff (ffn_mult * C).

    Exact for a tied, bias-free RoPE + SwiGLU model with plain multi-head attention except for the
    per-layer RMSNorms, which it leaves out: the true count is 2*C*L larger.
    """
    C, V, L, H_ff = config.d_model, config.vocab_size, config.n_layer, config.ffn_width
    return V * C + L * (4 * C * C + 3 * C * H_ff) + C
