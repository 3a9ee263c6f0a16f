"""A decoder-only transformer (GPT), composed from a `ModelConfig`.

    idx (B, T) -> token embedding (+ position embedding) -> N x Block -> final norm -> head -> logits (B, T, V)

The config names each component and `lm.registry` maps the name to a class built as `cls(config)`:
attention (`lm.attention`), positions (`lm.positions`), norms (`lm.norms`) and feed-forward
networks (`lm.feedforward`). The default config is GPT-2: learned positions, LayerNorm, GELU MLP.

Where the norms sit, `config.norm_position`:

    "pre"   x = x + Attn(norm1(x));   x = x + FFN(norm2(x))     ... final norm_f before the head
            GPT-2 and every large model since: the residual stream is a clean sum, so gradients
            reach early layers undiminished and deep stacks train without warmup tricks.
    "post"  x = norm1(x + Attn(x));   x = norm2(x + FFN(x))     ... no final norm
            The original transformer (Vaswani et al. 2017) and GPT-1: each block's output is already
            normalised, so a further norm before the head would be a second norm in a row.

With `pos="rope"` nothing is added to the embeddings: one `RotaryEmbedding` is built for the model and
passed to every attention layer, which rotates queries and keys by their positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import attention as _attention  # noqa: F401  (imported for its registrations)
from .config import ModelConfig
from .feedforward import MLP  # noqa: F401  (lm.model.MLP, the GPT-2 feed-forward, as before)
from .norms import NORM_TYPES
from .positions import build_positions
from .registry import ATTENTION, FEEDFORWARD, NORMS


class Block(nn.Module):
    """One transformer block: attention then a feed-forward network, each with a residual connection
    and a norm, placed before the sublayer ("pre") or after the residual sum ("post")."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.norm1 = NORMS.get(config.norm)(config)
        self.attn = ATTENTION.get(config.attention)(config)
        self.norm2 = NORMS.get(config.norm)(config)
        self.mlp = FEEDFORWARD.get(config.ffn)(config)

    def forward(self, x: torch.Tensor, rope=None, attention_mask=None, return_weights: bool = False, cache=None,
                static: bool = False):
        """x: (B, T, C) -> (B, T, C); with `return_weights`, also the attention weights (B, H, T, T).
        `cache`: this layer's KV cache (`lm.kv_cache`), when x holds only new positions; `static`:
        one token per row at the position a static cache keeps on the device (`GPT.decode_step`)."""
        if self.pre_norm:
            a, weights = self._attend(self.norm1(x), rope, attention_mask, return_weights, cache, static)
            x = x + a
            x = x + self.mlp(self.norm2(x))
        else:
            a, weights = self._attend(x, rope, attention_mask, return_weights, cache, static)
            x = self.norm1(x + a)
            x = self.norm2(x + self.mlp(x))
        return (x, weights) if return_weights else x

    def _attend(self, h, rope, attention_mask, return_weights, cache=None, static=False):
        if return_weights:
            return self.attn(h, rope=rope, attention_mask=attention_mask, return_weights=True)
        if cache is not None:
            return self.attn(h, rope=rope, cache=cache, static=static), None
        return self.attn(h, rope=rope, attention_mask=attention_mask), None


class GPT(nn.Module):
    """The whole model. `forward(idx, targets=None, attention_mask=None)` returns `(logits, loss)`.

    A tokenizer may be attached (`model.tokenizer = tok`, done by `lm.load_model`), so that
    `generate` takes and returns text. State-dict names: tok_emb, pos_emb (learned positions only),
    blocks.{i}.norm1 / attn / norm2 / mlp, norm_f (pre-norm only), lm_head (tied to tok_emb by default).
    """

    def __init__(self, config: ModelConfig, tokenizer=None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        # pos_emb: a (T, C) table added to the embeddings, or None; rope: one RotaryEmbedding, or None
        self.pos_emb, self.rope = build_positions(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = NORMS.get(config.norm)(config) if config.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.aux_loss: torch.Tensor | None = None  # MoE load-balancing loss of the last forward
        self.reset_parameters()

    # ---- initialisation ------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, norms at their identity-like start, and the
        projections that write into the residual stream (attention's `proj`, the MLP's `proj`,
        SwiGLU's `w3`, every MoE expert's output layer) scaled by 1/sqrt(2 * n_layer) so the
        stream's variance does not grow with depth. "xavier_uniform" uses Xavier-uniform Linear
        weights instead (seed 000's setting)."""
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if self.config.init == "xavier_uniform":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, NORM_TYPES):
                module.reset_parameters()
        if self.config.init == "gpt2":
            residual_std = std / math.sqrt(2 * self.config.n_layer)
            for block in self.blocks:
                for projection in [block.attn.proj, *block.mlp.residual_projections()]:
                    nn.init.normal_(projection.weight, mean=0.0, std=residual_std)

    # ---- size ----------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (shared tensors counted once).

        With `non_embedding`, lookup tables are left out: a learned position embedding, and the
        token embedding unless it is tied to the output head (then it does real work as the head).
        `lm.count_params(config)` gives the total without building the model.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if non_embedding:
            if self.pos_emb is not None:
                n -= sum(p.numel() for p in self.pos_emb.parameters())
            if not self.config.tie_weights:
                n -= self.tok_emb.weight.numel()
        return n

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache=None):
        """idx: (B, T) token ids. targets: (B, T) next-token ids, -100 where no loss is wanted.
        attention_mask: optional, passed to every attention layer (see `lm.attention`).

        Returns logits (B, T, V) and the mean cross-entropy loss (None without targets). With
        `ffn="moe"`, the load-balancing loss (mean over layers) is kept in `self.aux_loss` and, in
        training mode, `moe_aux_loss_coef * aux_loss` is added to the loss; in eval mode the loss
        stays the plain cross-entropy, so validation losses compare across architectures.

        With a `cache` (`lm.KVCache`), idx holds only the tokens after those already cached, at
        positions cache.length onward, and attention_mask (if any) covers the whole sequence so far.
        """
        if cache is not None:
            return self._forward_cached(idx, targets, attention_mask, cache)
        x = self._embed(idx)
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # keep only each block's input; rebuild its activations during backward
                x = checkpoint(block, x, self.rope, attention_mask, use_reentrant=False)
            else:
                x = block(x, self.rope, attention_mask)
        logits = self.lm_head(self.norm_f(x))
        self.aux_loss = self._moe_aux_loss()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
            if self.aux_loss is not None and self.training:
                loss = loss + self.config.moe_aux_loss_coef * self.aux_loss
        return logits, loss

    def _forward_cached(self, idx, targets, attention_mask, cache):
        T = idx.size(1)
        cache.update_mask(attention_mask, T)
        x = self._embed(idx, offset=cache.length)
        for block, layer_cache in zip(self.blocks, cache.layers):
            x = block(x, self.rope, cache=layer_cache)
        cache.advance(T)
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    def decode_step(self, idx: torch.Tensor, cache) -> torch.Tensor:
        """Logits (B, 1, V) of one new token per row, idx (B, 1), at the device position of a static
        cache (`KVCache(..., static=True)`), whose slot it fills.

        No shape and no Python value depends on the position, so the step can be captured once as
        a CUDA graph and replayed for every token (`lm.cuda_graph`). The cache is not advanced:
        the caller calls `cache.advance(1)`, outside any graph."""
        x = self._embed(idx, offset=cache.position)
        for block, layer_cache in zip(self.blocks, cache.layers):
            x = block(x, self.rope, cache=layer_cache, static=True)
        return self.lm_head(self.norm_f(x))

    def attention_weights(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The attention weights of every layer, each (B, H, T, T), for plotting."""
        x = self._embed(idx)
        weights = []
        for block in self.blocks:
            x, w = block(x, self.rope, attention_mask, return_weights=True)
            weights.append(w)
        return weights

    def _embed(self, idx: torch.Tensor, offset=0) -> torch.Tensor:
        """offset: an int, or a 0-d device tensor (a static cache's position, checked by its owner)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be a (B, T) tensor of token ids, got shape {tuple(idx.shape)}.")
        T = idx.size(1)
        if not isinstance(offset, torch.Tensor) and offset + T > self.config.block_size:
            raise ValueError(
                f"sequence length {offset + T} exceeds block_size={self.config.block_size}; "
                f"crop the input to its last {self.config.block_size} tokens."
            )
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(T, offset)
        return self.drop(x)

    def _moe_aux_loss(self) -> torch.Tensor | None:
        losses = [block.mlp.aux_loss for block in self.blocks if getattr(block.mlp, "aux_loss", None) is not None]
        return torch.stack(losses).mean() if losses else None

    # ---- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int = 100, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None, stop_at_eos: bool = True, *, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                 stop: str | list[str] | None = None, stop_tokens=None, use_cache: bool = True,
                 return_logprobs: bool = False, attention_mask: torch.Tensor | None = None,
                 cuda_graph: bool | None = None, compile: bool = False):
        """Sample a continuation of `prompt`.

        prompt: text (needs an attached tokenizer; returns the new text, without the prompt), a list
        of texts (batched, left-padded; returns a list), or a (B, T) tensor of ids (returns
        (B, T + new) ids, prompt included; `attention_mask` (B, T) marks real tokens if padded).

        Sampling: temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty,
        no_repeat_ngram_size (see `lm.sampling`); `seed` makes the draw reproducible.
        Stopping: after max_new_tokens; at the tokenizer's end-of-text token (text prompts, when
        `stop_at_eos`); at any id in `stop_tokens`; at any string in `stop` (cut off before it).
        `return_logprobs`: also return each new token's log-probability under the model.

        With `use_cache` (default) a KV cache makes each new token cost one position; the ids are
        the same as without it while the sequence fits in block_size. Beyond block_size, the
        uncached loop feeds the last block_size tokens at every step, and the cached one starts a
        fresh cache from the last 3/4 of block_size tokens whenever it is full (so it re-reads the
        context once every block_size/4 tokens). Either way a prompt longer than block_size is read
        from its last block_size tokens, and the returned ids still hold all of it.

        On CUDA each one-token step replays a CUDA graph (`lm.cuda_graph`; `cuda_graph=None` picks
        it whenever the model allows, False turns it off), with `compile=True` of a
        torch.compile'd step. The tokens are the same either way.
        """
        from .generation import Generation

        run = Generation(self, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         seed=seed, stop_at_eos=stop_at_eos, top_p=top_p, min_p=min_p,
                         repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                         stop=stop, stop_tokens=stop_tokens, use_cache=use_cache, attention_mask=attention_mask,
                         cuda_graph=cuda_graph, compile=compile)
        for _ in run.steps():
            pass
        return run.result(return_logprobs)

    @torch.no_grad()
    def stream(self, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0, **kwargs):
        """Yield the continuation of a text prompt piece by piece as it is generated.

        Only whole characters are yielded: when a character's UTF-8 bytes span several byte-level
        tokens, it is held back until it is complete; so is an ending that may be the start of a
        `stop` string. Each step decodes only its last few tokens. Same arguments as `generate`;
        "".join(model.stream(...)) equals model.generate(...) with the same seed."""
        from .generation import Generation, stream_text

        if not isinstance(prompt, str):
            raise ValueError("stream() takes a text prompt; use generate() for ids or lists of prompts.")
        yield from stream_text(Generation(self, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                          **kwargs))
