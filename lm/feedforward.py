"""Position-wise feed-forward networks, chosen by name with `ModelConfig(ffn=...)`.

    gelu       MLP(x)    = proj(GELU(fc(x)))                  C -> F -> C, exact GELU (torch's default)
    gelu_tanh  the same with GELU's tanh approximation          GPT-2 as OpenAI trained it
    swiglu     SwiGLU(x) = w3(SiLU(w1(x)) * w2(x))              C -> F (twice) -> C, LLaMA / RSCaLM
    moe        MoE(x)    = sum over the top-k experts e of p_e(x) * expert_e(x)   Switch / GShard / Mixtral

F is `config.ffn_width`: `d_ff`, or 4 * d_model when `d_ff` is None, for every kind. SwiGLU keeps
that width for all three of its matrices, as seed 002 does (H_ff = ffn_mult * C), so at the same F
it has 1.5x the parameters of the GELU MLP (3CF instead of 2CF). LLaMA instead shrinks F to about
(2/3) * 4C to match the MLP's size; pass `d_ff` for that.

Each module is built as `cls(config)`, maps (B, T, C) -> (B, T, C), names the layers that write
into the residual stream in `residual_projections()` (GPT-2 init scales those down with depth),
and counts its parameters with `cls.param_count(config)` without being built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .config import ModelConfig
from .registry import FEEDFORWARD


@FEEDFORWARD.register("gelu")
class MLP(nn.Module):
    """Two linear layers with a GELU between them: C -> F -> C."""

    approximate = "none"  # GELU(x) = x * Phi(x), Phi the normal distribution's CDF

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.ffn_width, bias=config.bias)
        self.proj = nn.Linear(config.ffn_width, config.d_model, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self._hidden(x))
        return self.drop(y) if self.training else y  # eval: skip the no-op call (decoding speed)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(fc(x)), the F-wide activations"""
        if self._bias_gelu_in_c(x):  # float32 training on a CPU: the same, faster (chapter 6)
            return cpu_kernels.bias_gelu(F.linear(x, self.fc.weight), self.fc.bias)
        return F.gelu(self.fc(x), approximate=self.approximate)

    def before_bias(self, x: torch.Tensor):
        """(`forward`'s output without proj's bias, that bias) in float32 training on a CPU where nothing follows
        proj (no dropout while training), so that `lm.model.Block` adds the bias with the residual in one pass of
        lm's C kernel; None otherwise (also for a subclass with a `forward` of its own, or a proj that is not a
        plain nn.Linear)."""
        if (type(self).forward is MLP.forward and (self.drop.p == 0.0 or not self.training)
                and cpu_kernels.float32_training_through(x, self.proj) and self.proj.bias is not None
                and cpu_kernels.rows_unavailable(self.proj.out_features) is None):
            return F.linear(self._hidden(x), self.proj.weight), self.proj.bias
        return None

    def _bias_gelu_in_c(self, x: torch.Tensor) -> bool:
        """Whether fc's bias and the GELU run in lm's C kernel (`lm.cpu_kernels.bias_gelu`): float32 training on
        a CPU, where it saves the bias broadcast into fc's output and the pass that sums the bias's gradient.
        Only for the exact GELU and a plain nn.Linear fc (not LoRA's or int8's) with a bias and no hooks, outside
        autocast and torch.compile, and where the kernel runs (`bias_gelu_unavailable`)."""
        return (self.approximate == "none" and cpu_kernels.float32_training_through(x, self.fc)
                and self.fc.bias is not None and cpu_kernels.bias_gelu_unavailable(self.fc.out_features) is None)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.proj]

    @staticmethod
    def param_count(config: ModelConfig) -> int:
        C, F_ = config.d_model, config.ffn_width
        return 2 * C * F_ + (F_ + C if config.bias else 0)


@FEEDFORWARD.register("gelu_tanh")
class TanhMLP(MLP):
    """The MLP with GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    GPT-2 was trained with it (it was cheaper than erf on 2019 hardware); it differs from the exact
    GELU by at most about 5e-4, enough to move GPT-2's logits by about 1e-3, so loading GPT-2's
    weights needs this kind. Same parameters and names as "gelu"."""

    approximate = "tanh"


@FEEDFORWARD.register("swiglu")
class SwiGLU(nn.Module):
    """Gated MLP: w3(SiLU(w1 x) * w2 x), with w1, w2: C -> F and w3: F -> C (seed 002's names).

    The seed's SwiGLU is bias-free; here the biases follow `config.bias` like every other Linear,
    and the presets that reproduce LLaMA-style models set `bias=False`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        C, F_ = config.d_model, config.ffn_width
        self.w1 = nn.Linear(C, F_, bias=config.bias)  # gate; Hugging Face LLaMA calls it gate_proj
        self.w2 = nn.Linear(C, F_, bias=config.bias)  # value; up_proj
        self.w3 = nn.Linear(F_, C, bias=config.bias)  # back to C; down_proj
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w1(x), self.w2(x)
        if self._gate_in_c(gate):  # float32 training on a CPU: the same product, in C (chapter 6)
            y = self.w3(cpu_kernels.silu_gate(gate, value))
        else:
            y = self.w3(F.silu(gate) * value)
        return self.drop(y) if self.training else y

    @staticmethod
    def _gate_in_c(gate: torch.Tensor) -> bool:
        """Whether SiLU(gate) * value runs in lm's C kernel (`lm.cpu_kernels.silu_gate`): float32 training on a CPU,
        no autocast and no torch.compile (`float32_training`), and rows the kernel takes."""
        return (gate.numel() > 0 and cpu_kernels.float32_training(gate)
                and cpu_kernels.rows_unavailable(gate.size(-1)) is None)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.w3]

    @staticmethod
    def param_count(config: ModelConfig) -> int:
        C, F_ = config.d_model, config.ffn_width
        return 3 * C * F_ + (2 * F_ + C if config.bias else 0)


def route_top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing. logits (N, E) from the router, one row per token.

    Returns probs (N, E): the softmax over all experts (float32), and for each token its k experts
    `experts` (N, k) and their weights (N, k): the k probabilities renormalised to sum to 1.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    top_probs, experts = probs.topk(k, dim=-1)
    weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
    return probs, experts, weights


def load_balancing_loss(
    probs: torch.Tensor, experts: torch.Tensor, n_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch-Transformer auxiliary loss E * sum_i f_i * P_i, and the usage f (E,).

    f_i is the share of the N * k routing slots that went to expert i (sums to 1) and P_i the mean
    router probability of expert i (sums to 1). f is counted, so it has no gradient; P carries the
    gradient that pushes probability away from overused experts. The loss is 1 when routing is
    perfectly uniform and up to E when every token goes to one expert.
    """
    usage = torch.bincount(experts.flatten(), minlength=n_experts).float() / experts.numel()
    mean_prob = probs.mean(dim=0)
    return n_experts * (usage * mean_prob).sum(), usage


@FEEDFORWARD.register("moe")
class MoE(nn.Module):
    """Sparse mixture of experts: a router sends each token to `moe_top_k` of `n_experts` MLPs.

    Each expert is a full feed-forward network of kind `moe_expert` ("gelu" or "swiglu") and width F,
    so the layer has n_experts times the parameters of one dense FFN while each token pays for k.
    After every forward the layer keeps

        aux_loss     the load-balancing loss (a scalar tensor with gradient), see `load_balancing_loss`
        last_usage   (E,) the share of routing slots each expert received (sums to 1)

    Dispatch sorts the N * k (token, expert) pairs by expert, so each expert runs once on one
    contiguous batch of its tokens; the only Python loop is over the E experts.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_experts
        self.top_k = config.moe_top_k
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        expert = FEEDFORWARD.get(config.moe_expert)
        self.experts = nn.ModuleList(expert(config) for _ in range(config.n_experts))
        self.register_buffer("last_usage", torch.zeros(config.n_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        tokens = x.reshape(B * T, C)  # (N, C)
        probs, experts, weights = route_top_k(self.router(tokens), self.top_k)  # (N, E), (N, k), (N, k)
        self.aux_loss, usage = load_balancing_loss(probs, experts, self.n_experts)
        self.last_usage = usage.detach()

        # Sort the N*k slots by expert: expert e's tokens become one contiguous run of counts[e] rows.
        flat_experts = experts.flatten()  # (N*k,), slot s belongs to token s // k
        order = torch.argsort(flat_experts, stable=True)
        token_of_slot = order // self.top_k
        counts = torch.bincount(flat_experts, minlength=self.n_experts).tolist()
        runs = tokens[token_of_slot].split(counts)  # E tensors, (counts[e], C)
        outputs = torch.cat([expert(run) for expert, run in zip(self.experts, runs)])  # (N*k, C)

        slot_weights = weights.flatten()[order].to(outputs.dtype)  # (N*k,)
        # in the experts' dtype: under autocast they return bfloat16 while the stream is float32
        combined = tokens.new_zeros(tokens.shape, dtype=outputs.dtype)
        combined.index_add_(0, token_of_slot, outputs * slot_weights[:, None])
        return combined.view(B, T, C)

    def residual_projections(self) -> list[nn.Linear]:
        return [proj for expert in self.experts for proj in expert.residual_projections()]

    @staticmethod
    def param_count(config: ModelConfig) -> int:
        router = config.d_model * config.n_experts
        return router + config.n_experts * FEEDFORWARD.get(config.moe_expert).param_count(config)
