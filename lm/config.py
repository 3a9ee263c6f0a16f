"""Model configuration: one dataclass that says everything needed to build a model.

A config is plain data. It round-trips through dicts, YAML and JSON so that a checkpoint can store
a snapshot of it and a reader can keep experiments in small text files.

Every value is checked here, once, when a config is made; the modules that build components from
it trust it. Component names are checked against `lm.registry`, the only part of `lm` this module
imports: the components import the config, never the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .registry import ATTENTION, FEEDFORWARD, NORMS, POSITIONS

# Choices that are plain words rather than registered classes.
INIT_CHOICES = ("gpt2", "xavier_uniform")
NORM_POSITION_CHOICES = ("post", "pre")
SPARSE_PATTERNS = ("local_strided", "full")  # block_sparse attention's layouts; "full" = causal attention


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and how to fix it."""


@dataclass
class ModelConfig:
    """Shape and components of a decoder-only transformer.

    Letters used in shape comments across `lm`: B batch, T time, C = d_model, H = n_head,
    D = C // H (head dim), V = vocab_size, F = ffn_width.

    Components are named by strings that `lm.registry` maps to classes, so a YAML file can say
    `norm: rmsnorm`; `ModelConfig.validate` lists the known names when one is wrong. The defaults
    build GPT-2's architecture; `lm.preset(name)` gives the configurations of the seed models.
    """

    # ---- sizes
    vocab_size: int = 256
    block_size: int = 256  # the longest context the model is built for (T max)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int | None = None  # hidden width F of every ffn kind (SwiGLU, MoE experts too); None means 4 * d_model
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2 has them
    tie_weights: bool = True  # share the token embedding with the output head
    # ---- positions: "learned" | "sinusoidal" (added to the token embeddings), "rope" (rotates q and k), "none"
    pos: str = "learned"
    rope_base: float = 10000.0  # RoPE's theta: the slowest rotation has wavelength about 2*pi*rope_base
    # ---- normalisation: "layernorm" | "rmsnorm" | "scalenorm"; "pre": x + f(norm(x)), "post": norm(x + f(x))
    norm: str = "layernorm"
    norm_position: str = "pre"
    norm_eps: float = 1e-5
    # ---- attention: "sdpa" | "manual" | "sliding_window" | "linear" | "block_sparse"
    attention: str = "sdpa"
    n_kv_heads: int | None = None  # key/value heads shared by groups of query heads (GQA); None means n_head
    window: int | None = None  # sliding_window: each query sees this many most recent keys, itself included
    sparse_block: int = 16  # block_sparse: block size in tokens
    sparse_local: int = 2  # block_sparse: how many earlier blocks every query block sees
    sparse_stride: int = 4  # block_sparse: and every sparse_stride-th ("summary") block before those; 0: none
    sparse_pattern: str = "local_strided"  # block_sparse: "local_strided", or "full" (= causal attention)
    # ---- feed-forward: "gelu" | "swiglu" | "moe"
    ffn: str = "gelu"
    n_experts: int = 8  # moe: experts per layer
    moe_top_k: int = 2  # moe: experts each token is sent to
    moe_expert: str = "gelu"  # moe: the kind of each expert, "gelu" or "swiglu"
    moe_aux_loss_coef: float = 0.01  # moe: weight of the load-balancing loss added to the training loss
    # ---- initialisation and memory
    init: str = "gpt2"  # "gpt2" (normal 0.02, scaled residual projections) or "xavier_uniform"
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, ~1/3 more compute

    def __post_init__(self) -> None:
        self.validate()

    @property
    def ffn_width(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_head

    def validate(self) -> None:
        """Raise ConfigError, naming the value and a fix, for anything that would not build."""
        for f in fields(self):  # NaN passes every `<` and `>` check below, and inf most of them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}={value!r} is not a finite number; give a number such as the "
                                  f"default, {f.default!r}.")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "n_experts", "moe_top_k",
                     "sparse_block"):
            value = getattr(self, name)
            if not _is_int_at_least(value, 1):
                raise ConfigError(f"{name}={value!r} must be a positive integer.")
        for name in ("sparse_local", "sparse_stride"):
            value = getattr(self, name)
            if not _is_int_at_least(value, 0):
                raise ConfigError(f"{name}={value!r} must be an integer >= 0.")
        for name in ("d_ff", "n_kv_heads", "window"):
            value = getattr(self, name)
            if value is not None and not _is_int_at_least(value, 1):
                raise ConfigError(f"{name}={value!r} must be a positive integer or None.")
        for name in ("bias", "tie_weights", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false.")
        for name, low in (("norm_eps", 0.0), ("rope_base", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
                default = ModelConfig.__dataclass_fields__[name].default
                raise ConfigError(f"{name}={value!r} must be a number > {low:g} (the default is {default}).")
        if self.d_model % self.n_head != 0:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                f"pick n_head from the divisors of d_model, e.g. {_divisors_near(self.d_model, self.n_head)}."
            )
        if self.n_kv_heads is not None and self.n_head % self.n_kv_heads != 0:
            raise ConfigError(
                f"n_kv_heads={self.n_kv_heads} does not divide n_head={self.n_head}: each key/value head serves "
                f"a group of query heads of equal size. Choose n_kv_heads from {_divisors(self.n_head)} "
                f"(1 = multi-query attention, {self.n_head} = plain multi-head), or None."
            )
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r} must be a number in [0, 1).")
        if not _is_number(self.moe_aux_loss_coef) or self.moe_aux_loss_coef < 0:
            raise ConfigError(f"moe_aux_loss_coef={self.moe_aux_loss_coef!r} must be a number >= 0.")

        for name, known in self.component_choices().items():
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in known:
                raise ConfigError(f"{name}={getattr(self, name)!r} is unknown; choose one of {known}.")

        if self.attention == "sliding_window" and self.window is None:
            raise ConfigError("attention='sliding_window' needs window=<keys each query sees>, a positive "
                              f"integer (at most block_size={self.block_size} to make a difference).")
        if self.moe_top_k > self.n_experts:
            raise ConfigError(f"moe_top_k={self.moe_top_k} exceeds n_experts={self.n_experts}; "
                              f"a token cannot be routed to more experts than exist. Lower moe_top_k or add experts.")
        if self.pos == "rope" and self.head_dim % 2 != 0:
            raise ConfigError(
                f"pos='rope' rotates pairs of channels, so head_dim = d_model / n_head must be even, but "
                f"{self.d_model} / {self.n_head} = {self.head_dim}; change d_model or n_head.")

    @staticmethod
    def component_choices() -> dict[str, list[str]]:
        """The known names of every component field. Component classes register themselves in
        `lm.registry` when `lm` is imported, which Python does before it runs this module."""
        return {
            "pos": POSITIONS.names(),
            "norm": NORMS.names(),
            "norm_position": list(NORM_POSITION_CHOICES),
            "attention": ATTENTION.names(),
            "sparse_pattern": list(SPARSE_PATTERNS),
            "ffn": FEEDFORWARD.names(),
            "moe_expert": [name for name in FEEDFORWARD.names() if name != "moe"],
            "init": list(INIT_CHOICES),
        }

    # ---- round trips -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a mapping, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields are {sorted(known)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "ModelConfig":
        return cls.from_dict(yaml.safe_load(text))

    def save(self, path: str | Path) -> None:
        """Write the config to `path`; the suffix (.json, .yaml or .yml) picks the format."""
        path = Path(path)
        path.write_text(self.to_json() if _format_of(path) == "json" else self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        text = path.read_text()
        return cls.from_json(text) if _format_of(path) == "json" else cls.from_yaml(text)


def _is_int_at_least(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise ConfigError(f"cannot tell the format of {str(path)!r}: use a .json, .yaml or .yml file name.")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _divisors_near(n: int, target: int) -> list[int]:
    return sorted(_divisors(n), key=lambda d: abs(d - target))[:3]
