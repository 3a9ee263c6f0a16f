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
from . import cpu_kernels
from .config import ModelConfig
from .decode_step import has_hooks
from .losses import linear_cross_entropy
from .norms import NORM_TYPES
from .positions import build_positions
from .registry import ATTENTION, FEEDFORWARD, NORMS, PRETRAINED


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

    def forward(self, x: torch.Tensor, rope=None, attention_mask=None, cache=None) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C), the residual stream with what attention and the FFN add to it.
        `cache`: this layer's KV cache (`lm.kv_cache`), when x holds only new positions."""
        if self.pre_norm:
            x = self._residual(x, self.attn, self.norm1(x), rope, attention_mask, cache)
            return self._residual(x, self.mlp, self.norm2(x))
        x = self.norm1(self._residual(x, self.attn, x, rope, attention_mask, cache))
        return self.norm2(self._residual(x, self.mlp, x))

    @staticmethod
    def _residual(x: torch.Tensor, sublayer: nn.Module, h: torch.Tensor, *args) -> torch.Tensor:
        """x + sublayer(h, *args). Where the sublayer hands over its output before its projection's bias
        (`before_bias`: float32 training on a CPU), the bias and the residual sum are added in one pass of lm's C
        kernel (`lm.cpu_kernels.bias_residual`, chapter 6); never past a hook that calling the sublayer would run."""
        before_bias = getattr(sublayer, "before_bias", None)
        parts = None
        if (before_bias is not None and cpu_kernels.float32_training(h, sublayer.parameters())
                and not has_hooks(sublayer, backward=True)):  # the cheap check first: decoding pays nothing more
            parts = before_bias(h, *args)
        if parts is None:
            return x + sublayer(h, *args)
        return cpu_kernels.bias_residual(x, *parts)


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
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, cache=None, all_logits: bool = False,
                return_logits: bool = True):
        """idx: (B, T) token ids. targets: (B, T) next-token ids, -100 where no loss is wanted.
        attention_mask: (B, T), True for real tokens and False for padding, or (B, T, T), True where
        query i may see key j (packed documents); see `lm.attention`.

        Returns logits (B, T, V) and the mean cross-entropy loss (None without targets). With
        `ffn="moe"`, the load-balancing loss (mean over layers) is kept in `self.aux_loss` and, in
        training mode, `moe_aux_loss_coef * aux_loss` is added to the loss; in eval mode the loss
        stays the plain cross-entropy, so validation losses compare across architectures.

        With a `cache` (`lm.KVCache`), idx holds only the tokens after those already cached and
        attention_mask (if any) covers at least them. Generation needs only the next token's
        scores, so without targets only the last position goes through the head: logits (B, 1, V);
        `all_logits=True` gives every new position's, (B, T, V) (speculative decoding scores several).

        `return_logits=False` (with targets; without, it is an error) returns (None, loss): what training
        wants. Then the head and the loss run fused, a chunk of positions at a time
        (`lm.losses.linear_cross_entropy`), so the (B, T, V) logits and their float32 copy are never
        held: the same loss and gradients with far less memory. A head that is not a plain bias-free
        `nn.Linear` without hooks (a LoRA adapter on an untied head, an int8 head) gets the loss the
        plain way, and None for logits all the same.
        """
        if not return_logits and targets is None:
            raise ValueError("return_logits=False leaves only the loss, and there is none without targets; "
                             "give targets, or leave return_logits=True.")
        x = self._residual_stream(idx, attention_mask, cache)
        if cache is not None and targets is None and not all_logits:
            x = x[:, -1:]
        fused = not return_logits and self._head_is_plain()
        logits = None if fused else self.lm_head(self.norm_f(x))
        self.aux_loss = self._moe_aux_loss()
        loss = None
        if targets is not None:
            if fused:  # the head's weight goes in once: tied to tok_emb, its two gradients add up on it
                loss = linear_cross_entropy(self.norm_f(x), self.lm_head.weight, targets, ignore_index=-100)
            else:
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
            if self.aux_loss is not None and self.training:
                loss = loss + self.config.moe_aux_loss_coef * self.aux_loss
        return (logits if return_logits else None), loss

    def _head_is_plain(self) -> bool:
        """Whether `lm_head(h)` is just `h @ lm_head.weight.T`, so the fused loss may use the weight alone:
        an nn.Linear itself (not a LoRA wrapper, an int8 layer or a subclass), no bias, and no hook, of its
        own or global, that calling it would run."""
        head = self.lm_head
        return type(head) is nn.Linear and head.bias is None and not has_hooks(head, backward=True)

    def forward_ids(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (B, T, V) of ids (B, T), without a loss: seed 000's name for `forward(idx)[0]`."""
        return self(idx, attention_mask=attention_mask)[0]

    @classmethod
    def from_pretrained(cls, name: str, **options) -> "GPT":
        """A pretrained model from the Hugging Face hub ("gpt2", "gpt2-medium", ... or a repository
        id) or a local transformers folder; see `lm.hf.from_pretrained`. Needs the network the first
        time (then the hub's cache); `lm.from_hf(folder)` reads a folder you already have."""
        return PRETRAINED.get("huggingface")(name, **options)

    def hidden_states(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C): the residual stream after the final norm, what `lm_head` turns into logits; a
        classification head (`lm.classify`) reads it instead. idx and attention_mask as in `forward`."""
        return self.norm_f(self._residual_stream(idx, attention_mask))

    def _residual_stream(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         cache=None) -> torch.Tensor:
        """idx (B, T) -> (B, T, C), the residual stream after the last block (before the final norm)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be a (B, T) tensor of token ids, got shape {tuple(idx.shape)}.")
        T = idx.size(1)
        if attention_mask is not None and attention_mask.shape not in ((idx.size(0), T), (idx.size(0), T, T)):
            if not (cache is not None and attention_mask.dim() == 2 and attention_mask.size(1) >= T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; give (B, T) = "
                                 f"{tuple(idx.shape)} for padding, or (B, T, T) for packed documents.")
        if cache is not None and attention_mask is not None and attention_mask.dim() == 3:
            raise ValueError("a (B, T, T) document mask is for training on packed rows; generation with a "
                             "cache takes a (B, T) padding mask.")
        offset = 0 if cache is None else cache.begin(T, attention_mask)
        x = self.embed(idx, offset)
        if self.training:
            x = self.drop(x)
        layer_caches = [None] * len(self.blocks) if cache is None else cache.layers
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block, layer_cache in zip(self.blocks, layer_caches):
            if recompute:  # keep only each block's input; rebuild its activations during backward
                x = checkpoint(block, x, self.rope, attention_mask, use_reentrant=False)
            else:
                x = block(x, self.rope, attention_mask, layer_cache)
        if cache is not None:
            cache.end(T)
        return x

    def embed(self, idx: torch.Tensor, offset=0) -> torch.Tensor:
        """Token embeddings (B, T, C) of idx (B, T) at positions offset .. offset+T-1, plus the
        position table's rows for additive positions. offset: an int, or a static cache's 0-d
        device tensor (which the generation loop keeps below block_size)."""
        T = idx.size(1)
        if not isinstance(offset, torch.Tensor) and offset + T > self.config.block_size:
            raise ValueError(
                f"sequence length {offset + T} exceeds block_size={self.config.block_size}; "
                f"crop the input to its last {self.config.block_size} tokens."
            )
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(T, offset)
        return x

    def _moe_aux_loss(self) -> torch.Tensor | None:
        losses = [block.mlp.aux_loss for block in self.blocks if getattr(block.mlp, "aux_loss", None) is not None]
        return torch.stack(losses).mean() if losses else None

    @torch.no_grad()
    def attention_weights(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The attention weights of every layer, each (B, H, T, T), for plotting.

        One ordinary forward runs with a hook on every attention layer that keeps what it was
        given; each layer's `weights` then recomputes its weights from that input, written out."""
        inputs = []
        hooks = [block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args))
                 for block in self.blocks]
        try:
            self(idx, attention_mask=attention_mask)
        finally:
            for hook in hooks:
                hook.remove()
        return [block.attn.weights(x, rope, mask) for block, (x, rope, mask, _) in zip(self.blocks, inputs)]

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, prompt, config=None, *, attention_mask: torch.Tensor | None = None,
                 return_logprobs: bool = False, **options):
        """Sample a continuation of `prompt`; `lm.generation.Decoder.generate` explains every option.

        prompt: text (needs an attached tokenizer; returns the new text), a list of texts (batched,
        left-padded; returns a list), or a (B, T) tensor of ids (returns (B, T + new) ids).
        config: a `lm.GenerationConfig`; keyword options (max_new_tokens=200, temperature=0.8,
        top_k=40, ...) build one or change the given one.

        On a GPU the calls share `model.decoder`, which keeps the static KV cache and the CUDA graphs
        of the decoding step and the prompt between calls, so only the first call of a batch size
        captures them (`model.decoder.release()` frees that memory). A call made while another
        thread's is running gets a fresh decoder of its own."""
        decoder, held = self._claim_decoder()
        try:
            return decoder.generate(prompt, config, attention_mask=attention_mask,
                                    return_logprobs=return_logprobs, **options)
        finally:
            if held:
                decoder.busy.release()

    @property
    def decoder(self):
        """The `lm.Decoder` that `generate` uses, made on first use and kept with the model (it is left
        out when the model is copied or pickled)."""
        decoder = self.__dict__.get("_decoder")
        if decoder is None:
            from .generation import Decoder

            decoder = self.__dict__["_decoder"] = Decoder(self)
        return decoder

    def _claim_decoder(self):
        """(model.decoder, True) with its lock taken, or (a fresh Decoder, False) while another call holds it."""
        decoder = self.decoder
        if decoder.busy.acquire(blocking=False):
            return decoder, True
        from .generation import Decoder

        return Decoder(self), False

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_decoder", None)  # its CUDA graphs and caches were made for this copy's tensors
        return state

    def stream(self, prompt: str, config=None, **options):
        """Yield the continuation of a text prompt piece by piece as it is generated (whole
        characters only); see `lm.generation.Decoder.stream`. Like `generate`, it uses `model.decoder`
        (until the stream ends, is closed or is dropped), or a fresh decoder while that one is busy."""
        from .generation import HeldStream

        decoder, held = self._claim_decoder()
        if not held:
            return decoder.stream(prompt, config, **options)
        try:
            pieces = decoder.stream(prompt, config, **options)  # the prompt and settings are checked here
        except BaseException:
            decoder.busy.release()
            raise
        return HeldStream(pieces, decoder.busy)
