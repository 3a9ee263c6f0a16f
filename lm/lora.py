"""Low-rank adapters (LoRA, Hu et al. 2021): fine-tune a frozen model through a few small matrices.

A Linear layer y = W x + b (W: out x in) gets a trainable low-rank change beside its frozen weight:

    y = W x + b  +  (alpha / r) * B A dropout(x)        A: (r, in), B: (out, r), r << min(in, out)

A starts like a Linear weight (Kaiming-uniform) and B at zero, so before training the adapter adds
nothing and the model computes exactly what the base model computes. Only A and B are trained:
r * (in + out) numbers per layer instead of in * out, and no optimizer state for the base weights.
`alpha / r` keeps the size of the change roughly independent of the rank chosen.

    config = lm.LoRAConfig(rank=8, alpha=16, targets=("qkv", "proj"))
    lm.apply_lora(model, config)          # wraps blocks.*.attn.qkv, *.proj; freezes everything else
    lm.train(model, train_ids, val_ids, lm.TrainConfig(...))   # trains the adapters only
    lm.save_adapters(model, "adapters.safetensors")            # a small file: A, B and the config
    lm.load_adapters(other_base_model, "adapters.safetensors")
    lm.merge_lora(model)                  # W <- W + (alpha / r) B A: no extra cost at inference

The base may be int8 (QLoRA's idea, which uses 4 bits): `lm.quantize.quantize_int8(model)` first, then
`apply_lora`. The base stays int8 and frozen, the adapters are float, and every int8 layer learns to
pass gradients back to its input (`Int8LinearWithInputGrad`), which the fused int8 kernel alone
cannot.

State-dict names: the wrapped layer keeps its name and its own weights move one level down, under
`base`; the adapter adds two tensors:

    blocks.0.attn.qkv.weight  ->  blocks.0.attn.qkv.base.weight, blocks.0.attn.qkv.lora_A, blocks.0.attn.qkv.lora_B

An adapter file holds only the lora_A / lora_B tensors (by those names), the LoRAConfig and a
fingerprint of the base model's config; `load_adapters` checks both before it copies anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .files import write_atomically
from .quantize import Int8Linear

FORMAT = "lm-lora"
VERSION = 1
# Model settings that change training but not what the weights compute: adapters may move across them.
RUNTIME_SETTINGS = ("dropout", "gradient_checkpointing", "init", "moe_aux_loss_coef")


class LoRAError(ValueError):
    """A LoRA setting, model or adapter file is wrong; the message names the value and the fix."""


# ---- configuration -------------------------------------------------------------------------------
@dataclass
class LoRAConfig:
    """Where adapters go and how big they are.

    rank      r, the inner size of B A
    alpha     the adapter's output is scaled by alpha / rank
    dropout   dropout on the adapter's input (training only); 0 skips it
    targets   layer names: the last part of a module's name ("qkv" matches every blocks.i.attn.qkv) or
              a dotted tail of it ("attn.proj" matches attention's output only, not the MLP's "proj")
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv", "proj")

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # targets="qkv" means one target, not the letters q, k, v
            self.targets = (self.targets,)
        if isinstance(self.targets, list):  # from JSON
            self.targets = tuple(self.targets)
        self.validate()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoRAError(f"rank={self.rank!r} must be a positive int (typically 4 to 64), e.g. rank=8.")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise LoRAError(f"alpha={self.alpha!r} must be a number > 0; the adapter is scaled by alpha / rank, "
                            f"and alpha = 2 * rank (alpha=16 for rank=8) is a common choice.")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0 <= self.dropout < 1):
            raise LoRAError(f"dropout={self.dropout!r} must be a number with 0 <= dropout < 1 (0 turns it off; "
                            f"0.05 to 0.1 is usual).")
        if (not isinstance(self.targets, tuple) or not self.targets
                or not all(isinstance(t, str) and t and not t.startswith(".") and not t.endswith(".")
                           for t in self.targets)):
            raise LoRAError(f"targets={self.targets!r} must be a non-empty tuple of layer names, e.g. "
                            f"targets=('qkv', 'proj') or ('attn.qkv', 'attn.proj').")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["targets"] = list(self.targets)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "LoRAConfig":
        if not isinstance(values, dict):
            raise LoRAError(f"a LoRA config must be a mapping, got {type(values).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LoRAError(f"unknown LoRA config field(s) {unknown}; known fields are {sorted(known)}.")
        return cls(**values)


# ---- the layer -----------------------------------------------------------------------------------
def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """What an adapter adds to its layer's output, as the formula reads: scale * x A^T B^T.
    x (..., in), A (r, in), B (out, r) -> (..., out). The reference for LoRALinear's fused path."""
    return scale * F.linear(F.linear(x, A), B)


class _FusedLoRA(torch.autograd.Function):
    """LoRALinear's fast path: a frozen float base and its adapter, forward and backward written out so
    that every product adds into the one before it and no pass over the outputs only scales or sums.

        forward    y = x W^T + b;   h = x_a A^T;   y += s h B^T              x (N, in), h (N, r), y (N, out)
        backward   g_h = s g B;   g_x = g W (+ g_h A);   g_A = g_h^T x_a;   g_B = s g^T h

    x_a is the adapter's input: dropout(x), or None when it is x itself (then both gradients to x
    land in one matrix, g_x). Autograd would compute the same with two more sums of (N, in) and
    (N, out) tensors and a scaling pass per layer; `lora_delta` is the reference it is tested against.

    Thin products (one side of size r) are written in the orientation whose long dimension is the
    last one of the result, (r, N) rather than (N, r), and transposed as views: the same numbers,
    but CPU BLAS runs them several times faster that way (g^T h as (h^T g)^T most of all).
    """

    @staticmethod
    def forward(ctx, x, x_a, weight, bias, A, B, scale: float):
        adapter_input = x if x_a is None else x_a
        y = F.linear(x, weight, bias)
        h = (A @ adapter_input.t()).t()  # x_a A^T, as (r, N) transposed: see "thin products" above
        y.addmm_(h, B.t(), alpha=scale)
        ctx.save_for_backward(adapter_input, weight, A, B, h)
        ctx.scale, ctx.shared_input = scale, x_a is None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        adapter_input, weight, A, B, h = ctx.saved_tensors
        needs_x, needs_x_a, _, _, needs_A, needs_B, _ = ctx.needs_input_grad
        g_h = (B.t() @ g.t()).t().mul_(ctx.scale)  # (N, r) = s g B
        g_x = g_x_a = None
        if needs_x:
            g_x = g @ weight
            if ctx.shared_input:
                g_x.addmm_(g_h, A)
        if needs_x_a:
            g_x_a = g_h @ A
        g_A = g_h.t() @ adapter_input if needs_A else None
        g_B = (h.t() @ g).t().mul_(ctx.scale) if needs_B else None  # (out, r) = s g^T h
        return g_x, g_x_a, None, None, g_A, g_B, None


class _FrozenInt8(torch.autograd.Function):
    """An Int8Linear's forward, with the gradient to its input that the fused int8 kernel does not have:
    dL/dx = dL/dy @ W, W dequantized only during the backward pass (nothing float is kept)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
        ctx.layer = layer
        return Int8Linear.forward(layer, x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantized(grad.dtype), None


class Int8LinearWithInputGrad(Int8Linear):
    """An Int8Linear (same weights, same outputs) that also passes gradients back to its input.

    Adapters train through every layer between them and the loss, frozen int8 layers too, and
    Int8Linear's fused CPU kernel has no backward. `apply_lora` gives each Int8Linear of the model
    this class in place (`module.__class__`: nothing is copied and the state dict is unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenInt8.apply(x, self)
        return super().forward(x)


def _pass_input_gradients(layer: nn.Module) -> None:
    if type(layer) is Int8Linear:
        layer.__class__ = Int8LinearWithInputGrad


class LoRALinear(nn.Module):
    """A frozen Linear (or Int8Linear) `base` plus a trainable low-rank change:

        y = base(x) + (alpha / rank) * dropout(x) @ A^T @ B^T      x (..., in) -> y (..., out)

    lora_A: (rank, in), Kaiming-uniform like nn.Linear's weight; lora_B: (out, rank), zeros.
    `merge()` folds (alpha / rank) B A into a float base weight, after which forward is the base alone;
    `unmerge()` takes it out again. `merged` says which state the layer is in.

    A frozen float base runs the fused path (`_FusedLoRA`); an int8 base, a base with trainable
    weights, or `fused = False` runs the formula as written (`lora_delta`), with the same results.
    """

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, (nn.Linear, Int8Linear)):
            raise LoRAError(f"LoRALinear wraps an nn.Linear or lm.quantize.Int8Linear, not {type(base).__name__}.")
        LoRAConfig(rank=rank, alpha=alpha, dropout=dropout)  # the same checks and messages
        _pass_input_gradients(base)
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        # float adapters even on an int8 base: in the dtype the base computes in (its scale follows model.to())
        like = base.weight if isinstance(base, nn.Linear) else base.scale
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=like.device, dtype=like.dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=like.device, dtype=like.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.merged = False
        self.fused = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A like nn.Linear's weight, B = 0: the adapter starts as no change at all."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        x_a = None if self.dropout is None else self.dropout(x)
        if self.fused and self._base_is_frozen_float():
            y = self._fused_forward(x.reshape(-1, self.in_features),
                                    None if x_a is None else x_a.reshape(-1, self.in_features))
            return y.view(*x.shape[:-1], self.out_features)
        return self.base(x) + lora_delta(x if x_a is None else x_a, self.lora_A, self.lora_B, self.scale)

    def _base_is_frozen_float(self) -> bool:
        return isinstance(self.base, nn.Linear) and not any(p.requires_grad for p in self.base.parameters())

    def _fused_forward(self, x: torch.Tensor, x_a: torch.Tensor | None) -> torch.Tensor:
        """x, x_a (N, in) -> (N, out). Under autocast every input is cast to its dtype first, as autocast
        would cast them for F.linear; without autocast, `.to` returns the tensors themselves."""
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        base = self.base
        return _FusedLoRA.apply(x.to(dtype), None if x_a is None else x_a.to(dtype), base.weight.to(dtype),
                                None if base.bias is None else base.bias.to(dtype), self.lora_A.to(dtype),
                                self.lora_B.to(dtype), self.scale)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) B A, the change to the weight (out, in) that the adapter makes."""
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha / rank) B A; forward then runs the base alone (and dropout no longer applies)."""
        if self.merged:
            return
        self._check_float_base("merge")
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - (alpha / rank) B A: the base weight back (up to float rounding) and the adapter separate."""
        if not self.merged:
            return
        self._check_float_base("unmerge")
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def _check_float_base(self, action: str) -> None:
        if not isinstance(self.base, nn.Linear):
            raise LoRAError(f"cannot {action} an adapter into an int8 base: merging adds (alpha / rank) B A to "
                            f"the weight, which needs float weights. Keep the adapters separate (they work "
                            f"unmerged), or load them onto the float model (lm.load_adapters) and merge there.")

    def extra_repr(self) -> str:
        dropout = 0.0 if self.dropout is None else self.dropout.p
        return f"rank={self.rank}, alpha={self.alpha:g}, dropout={dropout:g}, merged={self.merged}"


# ---- putting adapters into a model -------------------------------------------------------------
def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers LoRA can wrap (nn.Linear, Int8Linear), in model order."""
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Int8Linear)) and not _inside_lora(name, model)]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear layers by name, in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def _inside_lora(name: str, model: nn.Module) -> bool:
    return name.endswith(".base") and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), LoRALinear)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _select_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The names of the layers `config.targets` pick out, in model order, checked (see apply_lora)."""
    candidates = linear_layer_names(model)
    chosen = []
    for target in config.targets:
        matched = [name for name in candidates if _matches(name, target)]
        if not matched:
            short = sorted({name.rsplit(".", 1)[-1] for name in candidates})
            raise LoRAError(f"target {target!r} matches no Linear layer of this model; its Linear layers are named "
                            f"{short} (or by a dotted tail such as 'attn.proj' of e.g. "
                            f"{candidates[0] if candidates else 'none'!r}): fix LoRAConfig(targets=...).")
        chosen += [name for name in matched if name not in chosen]
    chosen.sort(key=candidates.index)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name in chosen:
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Linear) and id(layer.weight) in tied:
            raise LoRAError(f"{name!r} shares its weight with the token embedding (tie_weights=True): merging an "
                            f"adapter there would change the embedding too. Leave {name!r} out of targets.")
    return chosen


def apply_lora(model: nn.Module, config: LoRAConfig | None = None) -> list[str]:
    """Wrap the target layers of `model` in LoRALinear, in place; freeze every other parameter.

    Returns the names of the wrapped layers. The config is kept as `model.lora_config` (for
    `save_adapters`). Raises LoRAError when adapters are already there, when a target matches no
    Linear layer (the message lists the names there are), or when a target's weight is tied to
    the token embedding (merging would change the embedding too)."""
    config = config or LoRAConfig()
    if lora_layers(model) or getattr(model, "lora_config", None) is not None:
        raise LoRAError("this model already has LoRA adapters; call lm.remove_lora(model) first, or "
                        "lm.load_adapters(model, path) to load other adapter values into them.")
    chosen = _select_targets(model, config)
    model._lora_trainable_before = [name for name, p in model.named_parameters() if p.requires_grad]
    model.requires_grad_(False)
    for module in model.modules():  # frozen int8 layers between the adapters and the loss must pass gradients
        _pass_input_gradients(module)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoRALinear(parent.get_submodule(child), config.rank, config.alpha, config.dropout)
        setattr(parent, child, wrapped.train(model.training))
    model.lora_config = config
    return chosen


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (float bases only): inference then costs what the base costs."""
    for layer in _layers_or_raise(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged adapter back out of its base weight."""
    for layer in _layers_or_raise(model).values():
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put plain layers back, in place: with `merge`, the adapters folded into their weights (float
    bases only); without, the base model as it was (merged adapters are taken out first). The
    parameters that were trainable before `apply_lora` are trainable again. Returns the model."""
    layers = _layers_or_raise(model)
    if merge:  # check every layer before changing any
        for layer in layers.values():
            layer._check_float_base("merge")
    for name, layer in layers.items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    trainable = set(getattr(model, "_lora_trainable_before", ()))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    model.lora_config = None
    return model


def _layers_or_raise(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("this model has no LoRA adapters; add them with lm.apply_lora(model, lm.LoRAConfig(...)).")
    return layers


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of weights, shared tensors once. Total also counts the int8 weights of
    Int8Linear layers, which are buffers rather than parameters but are the model's weights all the same."""
    params = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    int8 = sum(m.weight_int8.numel() for m in model.modules() if isinstance(m, Int8Linear))
    return trainable, sum(p.numel() for p in params.values()) + int8


# ---- adapter files -------------------------------------------------------------------------------
def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone, {"blocks.0.attn.qkv.lora_A": (rank, in), "...lora_B": (out, rank), ...}."""
    state = {}
    for name, layer in _layers_or_raise(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
    return state


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the settings of the model's config that shape its weights and what they compute
    (not dropout or other training-only settings): adapters fit a base with the same fingerprint."""
    return hashlib.sha256(json.dumps(_base_settings(model), sort_keys=True).encode()).hexdigest()[:16]


def _base_settings(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise LoRAError(f"adapter files need an lm.GPT (its config identifies the base model); got "
                        f"{type(model).__name__}. Save lm.lora_state_dict(model) with torch.save instead.")
    return {k: v for k, v in config.to_dict().items() if k not in RUNTIME_SETTINGS}


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    """Write the adapters (A and B of every layer), the LoRA config and the base model's fingerprint to
    `path`, atomically: a crash mid-save leaves any earlier file whole. Merged adapters are saved as
    they are (A and B do not change when merged). safetensors when it is installed, else torch.save."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise LoRAError("this model has no LoRA adapters to save; add them with lm.apply_lora(model, config).")
    tensors = {name: t.contiguous().cpu() for name, t in lora_state_dict(model).items()}
    metadata = {"format": FORMAT, "version": str(VERSION), "lora_config": json.dumps(config.to_dict()),
                "base_fingerprint": base_fingerprint(model), "base_config": json.dumps(_base_settings(model))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda f: f.write(_encode(tensors, metadata)))


def _encode(tensors: dict, metadata: dict) -> bytes:
    try:
        from safetensors.torch import save
    except ImportError:
        buffer = io.BytesIO()
        torch.save({"metadata": metadata, "tensors": tensors}, buffer)
        return buffer.getvalue()
    return save(tensors, metadata=metadata)


def _decode(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of an adapter file; neither reader can run code from the file."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's archive; safetensors starts with a header length
    if is_zip:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return payload["tensors"], payload["metadata"]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}


def read_adapters(path: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor], dict]:
    """The LoRAConfig, tensors and metadata of an adapter file, checked to be one (LoRAError if not)."""
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"adapter file {str(path)!r} does not exist; write one with lm.save_adapters(model, path).")
    try:
        tensors, metadata = _decode(path)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"no 'format': '{FORMAT}' entry")
        if int(metadata["version"]) > VERSION:
            raise LoRAError(f"{str(path)!r} has adapter format version {metadata['version']}; this lm reads "
                            f"versions up to {VERSION}: upgrade lm.")
        config = LoRAConfig.from_dict(json.loads(metadata["lora_config"]))
    except LoRAError:
        raise
    except Exception as err:  # truncated, not safetensors, not a dict, missing entries, bad JSON
        raise LoRAError(f"cannot read {str(path)!r} as an lm adapter file ({type(err).__name__}: {err}); "
                        f"it is damaged or was not written by lm.save_adapters.") from err
    return config, tensors, metadata


def load_adapters(model: nn.Module, path: str | Path) -> list[str]:
    """Load adapters written by `save_adapters` into `model`, in place; returns the adapted layer names.

    A model without adapters gets them first (`apply_lora` with the file's config). The file must
    belong to a base of the same configuration (its fingerprint), and every tensor must fit; the
    error says what differs. Nothing is changed unless everything fits."""
    config, tensors, metadata = read_adapters(path)
    if metadata.get("base_fingerprint") != base_fingerprint(model):
        saved, ours = json.loads(metadata.get("base_config", "{}")), _base_settings(model)
        differ = ", ".join(f"{k}: adapters {saved.get(k)!r}, model {ours.get(k)!r}"
                           for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k))
        raise LoRAError(f"{str(path)!r} holds adapters for another base model ({differ or 'fingerprint differs'}); "
                        f"load them onto the model they were trained on.")
    layers = lora_layers(model)
    if layers:
        current = model.lora_config
        if any(getattr(current, k) != getattr(config, k) for k in ("rank", "alpha", "targets")):
            raise LoRAError(f"the model has adapters with {current}, the file {config}; call "
                            f"lm.remove_lora(model, merge=False) first to load the file's adapters.")
        if any(layer.merged for layer in layers.values()):
            raise LoRAError("the model's adapters are merged into its weights; lm.unmerge_lora(model) first.")
        shapes = {name: (layer.in_features, layer.out_features) for name, layer in layers.items()}
    else:
        shapes = {name: _features(model.get_submodule(name)) for name in _select_targets(model, config)}
    expected = {}
    for name, (n_in, n_out) in shapes.items():
        expected[f"{name}.lora_A"] = (config.rank, n_in)
        expected[f"{name}.lora_B"] = (n_out, config.rank)
    _check_tensors(expected, tensors, path)
    if not layers:
        apply_lora(model, config)
    state = lora_state_dict(model)
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value)
    return list(shapes)


def _features(layer: nn.Module) -> tuple[int, int]:
    return layer.in_features, layer.out_features


def _check_tensors(expected: dict[str, tuple], tensors: dict, path) -> None:
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LoRAError(f"{str(path)!r} does not fit this model: adapters missing from the file {missing[:4]}, "
                        f"in the file but not in the model {unexpected[:4]}; load it onto the model it was "
                        f"trained on.")
    wrong = [f"{name}: file {tuple(tensors[name].shape)}, model {shape}"
             for name, shape in expected.items() if tuple(tensors[name].shape) != shape]
    if wrong:
        raise LoRAError(f"{str(path)!r} does not fit this model's adapters: {'; '.join(wrong[:4])}.")


__all__ = [
    "Int8LinearWithInputGrad", "LoRAConfig", "LoRAError", "LoRALinear", "apply_lora", "base_fingerprint",
    "linear_layer_names", "load_adapters", "lora_delta", "lora_layers", "lora_state_dict", "merge_lora",
    "read_adapters", "remove_lora", "save_adapters", "trainable_parameters", "unmerge_lora",
]
