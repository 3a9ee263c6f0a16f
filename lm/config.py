"""Model configuration: one dataclass that says everything needed to build a model.

A config is plain data. It round-trips through dicts, YAML and JSON so that a checkpoint can store
a snapshot of it and a reader can keep experiments in small text files.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and how to fix it."""


@dataclass
class ModelConfig:
    """Shape and components of a decoder-only transformer.

    Letters used in shape comments across `lm`: B batch, T time, C = d_model, H = n_head,
    D = C // H (head dim), V = vocab_size.
    """

    vocab_size: int = 256
    block_size: int = 256  # the longest context the model is built for (T max)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int | None = None  # feed-forward width; None means 4 * d_model
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2 has them
    tie_weights: bool = True  # share the token embedding with the output head
    attention: str = "sdpa"  # "sdpa" (fused kernel) or "manual" (the teaching path)
    init: str = "gpt2"  # "gpt2" (normal 0.02, scaled residual projections) or "xavier_uniform"
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.validate()

    @property
    def ffn_width(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer.")
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff < 1):
            raise ConfigError(f"d_ff={self.d_ff!r} must be a positive integer or None (= 4 * d_model).")
        if self.d_model % self.n_head != 0:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                f"pick n_head from the divisors of d_model, e.g. {_divisors_near(self.d_model, self.n_head)}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1).")
        if self.attention not in ATTENTION_CHOICES:
            raise ConfigError(
                f"attention={self.attention!r} is unknown; choose one of {sorted(ATTENTION_CHOICES)}."
            )
        if self.init not in INIT_CHOICES:
            raise ConfigError(f"init={self.init!r} is unknown; choose one of {sorted(INIT_CHOICES)}.")

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


ATTENTION_CHOICES = {"sdpa", "manual"}
INIT_CHOICES = {"gpt2", "xavier_uniform"}


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise ConfigError(f"cannot tell the format of {str(path)!r}: use a .json, .yaml or .yml file name.")


def _divisors_near(n: int, target: int) -> list[int]:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divisors, key=lambda d: abs(d - target))[:3]
