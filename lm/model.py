"""A decoder-only transformer (GPT): embeddings, a stack of pre-norm blocks, a language-model head.

    idx (B, T) -> token embedding + learned position embedding -> N x Block -> LayerNorm -> head
    -> logits (B, T, V)

Each Block is  x = x + Attention(LayerNorm(x));  x = x + MLP(LayerNorm(x)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CausalSelfAttention
from .config import ModelConfig
from .sampling import check_sampling_args, sample_next


class MLP(nn.Module):
    """Position-wise feed-forward network: C -> d_ff -> GELU -> C."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.ffn_width, bias=config.bias)
        self.proj = nn.Linear(config.ffn_width, config.d_model, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """One pre-norm transformer block: attention then MLP, each added to the residual stream."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        if return_weights:
            a, weights = self.attn(self.norm1(x), return_weights=True)
            x = x + a
            return x + self.mlp(self.norm2(x)), weights
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """The whole model. `forward(idx, targets=None)` returns `(logits, loss)`.

    A tokenizer may be attached (`model.tokenizer = tok`, done by `lm.load_model`), so that
    `generate` takes and returns text.
    """

    def __init__(self, config: ModelConfig, tokenizer=None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    # ---- initialisation ------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, and the two projections that write into
        the residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth.
        "xavier_uniform" uses Xavier-uniform Linear weights instead (seed 000's setting)."""
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
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.config.init == "gpt2":
            residual_std = std / math.sqrt(2 * self.config.n_layer)
            for block in self.blocks:
                nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
                nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    # ---- size ----------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (shared tensors counted once).

        With `non_embedding`, lookup tables are left out: the position embedding, and the token
        embedding unless it is tied to the output head (then it does real work as the head).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if non_embedding:
            n -= self.pos_emb.weight.numel()
            if not self.config.tie_weights:
                n -= self.tok_emb.weight.numel()
        return n

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx: (B, T) token ids. targets: (B, T) next-token ids, -100 where no loss is wanted.

        Returns logits (B, T, V) and the mean cross-entropy loss (None without targets).
        """
        x = self._embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    def attention_weights(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """The attention weights of every layer, each (B, H, T, T), for plotting."""
        x = self._embed(idx)
        weights = []
        for block in self.blocks:
            x, w = block(x, return_weights=True)
            weights.append(w)
        return weights

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"idx must be a (B, T) tensor of token ids, got shape {tuple(idx.shape)}.")
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size={self.config.block_size}; "
                f"crop the input to its last {self.config.block_size} tokens."
            )
        pos = torch.arange(T, device=idx.device)
        return self.drop(self.tok_emb(idx) + self.pos_emb(pos))

    # ---- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt,
        max_new_tokens: int = 100,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ):
        """Sample a continuation.

        `prompt` is either text (needs an attached tokenizer; returns the generated text without
        the prompt, stopping early at `<EOS>` when `stop_at_eos`) or a (B, T) tensor of ids
        (returns the (B, T + max_new_tokens) ids, prompt included). The context is cropped to the
        last `block_size` tokens at each step. `seed` makes the draw reproducible.
        """
        check_sampling_args(temperature, top_k, max_new_tokens)
        as_text = isinstance(prompt, str)
        if as_text:
            if self.tokenizer is None:
                raise ValueError("generate() got a text prompt but the model has no tokenizer; "
                                 "set model.tokenizer = ... or pass a (B, T) tensor of ids.")
            ids = self.tokenizer.encode(prompt)
            if not ids:  # start from <BOS>, or from GPT-2's <|endoftext|> where there is no BOS
                start_id = next((i for i in (self.tokenizer.bos_id, getattr(self.tokenizer, "eos_id", None))
                                 if i is not None), None)
                if start_id is None:
                    raise ValueError("the prompt is empty and the tokenizer has no BOS or EOS token to start "
                                     "from; give a non-empty prompt.")
                ids = [start_id]
            idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        elif isinstance(prompt, torch.Tensor) and prompt.dim() == 2 and prompt.size(1) > 0:
            idx = prompt.to(self.device)
        else:
            raise ValueError("prompt must be a str or a non-empty (B, T) tensor of token ids.")

        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        eos_id = getattr(self.tokenizer, "eos_id", None) if (as_text and stop_at_eos) else None

        was_training = self.training
        self.eval()
        start = idx.size(1)
        try:
            for _ in range(max_new_tokens):
                logits, _ = self(idx[:, -self.config.block_size :])
                next_id = sample_next(logits[:, -1, :], temperature, top_k, generator)
                idx = torch.cat([idx, next_id], dim=1)
                if eos_id is not None and next_id.item() == eos_id:
                    break
        finally:
            self.train(was_training)

        if not as_text:
            return idx
        new_ids = idx[0, start:].tolist()
        if eos_id is not None and new_ids and new_ids[-1] == eos_id:
            new_ids = new_ids[:-1]
        return self.tokenizer.decode(new_ids)
