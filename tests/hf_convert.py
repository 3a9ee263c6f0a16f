"""Hugging Face models holding the weights of an lm GPT, the references for parity tests:
LlamaForCausalLM for LLaMA's architecture (RoPE, RMSNorm, bias-free SwiGLU, optional GQA), and
any GPT-2 model class for GPT-2's (learned positions, LayerNorm, GELU MLP)."""

from __future__ import annotations

import torch


def llama_from_lm(ours):
    import transformers

    config = ours.config
    n_kv_heads = config.n_kv_heads or config.n_head
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_width,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=n_kv_heads,
        max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps, rope_theta=config.rope_base,
        tie_word_embeddings=config.tie_weights, attention_bias=False, mlp_bias=False, hidden_act="silu",
        attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=None, attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()

    def copy(dst, src):
        assert dst.shape == src.shape
        dst.copy_(src)

    C, D = config.d_model, config.head_dim
    with torch.no_grad():
        m = hf.model
        copy(m.embed_tokens.weight, ours.tok_emb.weight)
        for layer, block in zip(m.layers, ours.blocks):
            q, k, v = block.attn.qkv.weight.split([C, n_kv_heads * D, n_kv_heads * D])
            copy(layer.self_attn.q_proj.weight, q)
            copy(layer.self_attn.k_proj.weight, k)
            copy(layer.self_attn.v_proj.weight, v)
            copy(layer.self_attn.o_proj.weight, block.attn.proj.weight)
            copy(layer.mlp.gate_proj.weight, block.mlp.w1.weight)
            copy(layer.mlp.up_proj.weight, block.mlp.w2.weight)
            copy(layer.mlp.down_proj.weight, block.mlp.w3.weight)
            copy(layer.input_layernorm.weight, block.norm1.weight)
            copy(layer.post_attention_layernorm.weight, block.norm2.weight)
        copy(m.norm.weight, ours.norm_f.weight)
        if not config.tie_weights:
            copy(hf.lm_head.weight, ours.lm_head.weight)
    return hf


def gpt2_from_lm(ours, model_class: str = "GPT2LMHeadModel", **config_changes):
    """A transformers GPT-2 model (`model_class`: GPT2LMHeadModel, GPT2ForSequenceClassification, ...)
    with `ours`'s backbone weights; a classification head is left to the caller."""
    import transformers

    config = ours.config
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.d_model,
        n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu",  # exact GELU, as F.gelu
        layer_norm_epsilon=config.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=config.tie_weights, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
        **config_changes,
    )
    hf = getattr(transformers, model_class)(hf_config).eval()
    assert hf.config._attn_implementation == "eager"

    def copy(dst, src):
        assert dst.shape == src.shape
        dst.copy_(src)

    with torch.no_grad():
        t = hf.transformer
        copy(t.wte.weight, ours.tok_emb.weight)
        copy(t.wpe.weight, ours.pos_emb.weight)
        for h, block in zip(t.h, ours.blocks):
            for hf_norm, our_norm in [(h.ln_1, block.norm1), (h.ln_2, block.norm2)]:
                copy(hf_norm.weight, our_norm.weight)
                copy(hf_norm.bias, our_norm.bias)
            # Conv1D stores weights [in, out], nn.Linear [out, in]
            for conv, linear in [(h.attn.c_attn, block.attn.qkv), (h.attn.c_proj, block.attn.proj),
                                 (h.mlp.c_fc, block.mlp.fc), (h.mlp.c_proj, block.mlp.proj)]:
                copy(conv.weight, linear.weight.T)
                copy(conv.bias, linear.bias)
        copy(t.ln_f.weight, ours.norm_f.weight)
        copy(t.ln_f.bias, ours.norm_f.bias)
        if hasattr(hf, "lm_head") and not config.tie_weights:
            copy(hf.lm_head.weight, ours.lm_head.weight)
    return hf
