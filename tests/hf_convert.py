"""Build a Hugging Face LlamaForCausalLM holding the weights of an lm GPT of LLaMA's architecture
(RoPE, RMSNorm, bias-free SwiGLU, optional GQA): the reference for parity tests."""

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
