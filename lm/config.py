"""Model configuration: one dataclass that says everything needed to build a model.

A config is plain data. It round-trips through dicts, YAML and JSON so that a checkpoint can store
a snapshot of it and a reader can keep experiments in small text files.

Every value is checked here, once, when a config is made; the modules that build components from
it trust it. Component names are checked against `lm.registry`, the only part of `lm` this module
imports: the components import the config, never the other way round.

The seed projects name many settings differently (`n_embd`, `dim`, `num_heads`, `max_len`,
`attention_type: flash_attention`, ...). `ALIASES` is the one table that translates their names and
values into lm's, for both configs (model and training); `from_dict` of either accepts them, and
`alias_table()` prints the table in markdown for the docs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
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


class ConfigWarning(UserWarning):
    """A setting in a config that lm does not use there; the message says where it belongs instead."""


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
    # ---- feed-forward: "gelu" | "gelu_tanh" (GPT-2's approximate GELU) | "swiglu" | "moe"
    ffn: str = "gelu"
    n_experts: int = 8  # moe: experts per layer
    moe_top_k: int = 2  # moe: experts each token is sent to
    moe_expert: str = "gelu"  # moe: the kind of each expert, "gelu", "gelu_tanh" or "swiglu"
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
        """A config from lm's field names, or the seeds' (`ALIASES`: n_embd, num_heads, ...)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a mapping, got {type(data).__name__}.")
        data = canonical_settings(data, "model")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields are {sorted(known)}, and the "
                              f"other names in lm.config.ALIASES (lm.config.alias_table() lists them).")
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


# ---- the seeds' names for lm's settings ------------------------------------------------------------
@dataclass(frozen=True)
class Alias:
    """Another project's name for one of lm's settings.

    section: the config the setting belongs to: "model" (ModelConfig) or "train" (TrainConfig).
    field: lm's name for it; None for a setting that lm takes from somewhere else, which a config
        may hold but lm ignores, with a ConfigWarning that says where it belongs (`note`).
    values: the seed's value -> lm's, where they differ. lm's own values are accepted as they are;
        anything else is a ConfigError that lists both.
    seeds: the seed write-ups (000-004) that use the name.
    note: shown in the table, and in the error or warning about the setting.
    """

    section: str
    field: str | None
    values: dict[str, str] = dataclasses.field(default_factory=dict)
    seeds: str = ""
    note: str = ""


# Both lm's names and these work. Two names for one setting in the same config must agree: that is how
# a `*_class` key is checked, since it names the class of the component its `*_type` key names.
ALIASES: dict[str, Alias] = {
    # ---- model: sizes
    "n_embd": Alias("model", "d_model", seeds="001, 003"),  # nanoGPT's GPTConfig, the modular GPT's YAML
    "dim": Alias("model", "d_model", seeds="004"),  # Optimus Prime's ModelConfig
    "n_layers": Alias("model", "n_layer", seeds="000, 003"),
    "depth": Alias("model", "n_layer", seeds="004"),
    "n_heads": Alias("model", "n_head", seeds="000"),
    "num_heads": Alias("model", "n_head", seeds="003, 004"),
    "num_kv_heads": Alias("model", "n_kv_heads", seeds="004"),
    "max_len": Alias("model", "block_size", seeds="000"),
    "checkpointing": Alias("model", "gradient_checkpointing", seeds="004"),
    # ---- model: components
    "pos_encoding": Alias("model", "pos", seeds="000"),
    "pos_type": Alias("model", "pos", seeds="003"),
    "layer_norm": Alias("model", "norm_position", seeds="000",
                        note="seed 000's layer_norm says where the norm sits, pre or post; the kind of norm is "
                             "lm's `norm`"),
    "norm_type": Alias("model", "norm", seeds="003"),
    "norm_class": Alias("model", "norm", {"LayerNorm": "layernorm", "RMSNorm": "rmsnorm", "ScaleNorm": "scalenorm"},
                        seeds="003"),
    "attention_type": Alias("model", "attention", {"flash_attention": "sdpa", "linear_attention": "linear",
                                                   "local_window": "sliding_window"}, seeds="003",
                            note="local_window also needs `window`: the keys each query sees"),
    "attention_class": Alias("model", "attention", {"FlashAttention": "sdpa", "LinearAttention": "linear",
                                                    "LocalWindowAttention": "sliding_window"}, seeds="003"),
    "ffn_type": Alias("model", "ffn", {"ff_swiglu": "swiglu"}, seeds="003"),
    "ffn_class": Alias("model", "ffn", {"GatedFeedForward": "swiglu"}, seeds="003"),
    # ---- model: what lm takes from elsewhere
    "vocab": Alias("model", None, seeds="000",
                   note="the tokenizer is not part of the model's config: `lm prep --tokenizer char` makes it, "
                        "lm train takes it from --data_dir (and checks it against this value)"),
    # ---- training
    "learning_rate": Alias("train", "lr", seeds="001, 004"),
    "max_iters": Alias("train", "max_steps", seeds="001"),
    "num_epochs": Alias("train", "epochs", seeds="004"),
    "max_length": Alias("train", "seq_len", seeds="004"),
    "gradient_clip_val": Alias("train", "grad_clip", seeds="004"),
    "checkpoint_dir": Alias("train", "out_dir", seeds="004", note="lm train's --out_dir comes first"),
    # ---- training: what lm takes from elsewhere
    "train_val_split": Alias("train", None, seeds="004",
                             note="the split is made once, by `lm prep --val_fraction` (the share held out: "
                                  "1 - train_val_split)"),
    "dataset_name": Alias("train", None, seeds="004",
                          note="lm downloads nothing: lm train reads the token files in --data_dir (`lm prep "
                               "--corpus FILE`), and instruction data such as Dolly's goes to `lm finetune "
                               "--data FILE.jsonl`"),
    "dataset_size": Alias("train", None, seeds="004",
                          note="shorten the data itself: the corpus given to `lm prep`, or the JSONL given to "
                               "`lm finetune --data`"),
    "num_workers": Alias("train", None, seeds="004",
                         note="lm needs no loader processes: batches are cut from the memory-mapped token file"),
    "tensorboard_dir": Alias("train", None, seeds="004",
                             note="with `tensorboard: true` lm logs to `out_dir/tensorboard`"),
}


def canonical_settings(settings: dict, section: str = "model") -> dict:
    """`settings` (of `section`, "model" or "train") in lm's names: each alias replaced by its lm
    field, with its value translated (`ALIASES`). Other names pass unchanged, for ModelConfig and
    TrainConfig to check.

    - Two names for one field must give the same value, or it is a ConfigError naming both.
    - A setting lm takes from elsewhere (field None) is left out, with a ConfigWarning saying where.
    - A setting of the other section is a ConfigError saying where it goes.
    """
    other = {"model": "train", "train": "model"}[section]
    model_fields = {f.name for f in fields(ModelConfig)}
    result: dict = {}
    given_as: dict[str, str] = {}  # lm field -> the name it was first given under
    for name, value in settings.items():
        alias = ALIASES.get(name) if isinstance(name, str) else None
        if (alias is not None and alias.section == other) or (section == "train" and name in model_fields):
            lm_name = alias.field if alias is not None else name
            raise ConfigError(f"{name!r} is a {other} setting (lm's {lm_name}), not a {section} one; put it in "
                              f"the '{other}' section.")
        if alias is not None and alias.field is None:
            warnings.warn(f"{name}={value!r} is ignored: {alias.note}.", ConfigWarning, stacklevel=3)
            continue
        field = alias.field if alias is not None else name
        if alias is not None:
            value = _translate(name, value, alias)
        if field in result and result[field] != value:
            first = given_as[field]
            raise ConfigError(f"{first}={settings[first]!r} and {name}={settings[name]!r} disagree: both set lm's "
                              f"{field} ({result[field]!r} and {value!r}). Give the same setting, or only one of them.")
        result[field] = value
        given_as.setdefault(field, name)
    return result


def _translate(name: str, value: Any, alias: Alias) -> Any:
    """The lm value of `value`, given under the alias `name`."""
    known = ModelConfig.component_choices().get(alias.field, []) if alias.section == "model" else []
    if isinstance(value, str) and value in alias.values:
        return alias.values[value]
    if not alias.values and not known:
        return value  # a plain rename: the config checks the value
    if isinstance(value, str) and value in known:
        return value
    seeds = f"{', '.join(alias.values)} (the seed's names) or " if alias.values else ""
    note = f" Note: {alias.note}." if alias.note else ""
    raise ConfigError(f"{name}={value!r} cannot be translated to lm's {alias.field}: give {seeds}"
                      f"{', '.join(known)} (lm's).{note}")


def alias_table() -> str:
    """`ALIASES` as a markdown table for the docs: each name, the seeds that use it, lm's setting, and
    how its values translate."""
    rows = ["| name | seeds | lm setting | values, notes |", "|---|---|---|---|"]
    for name, alias in ALIASES.items():
        setting = f"`{alias.section}.{alias.field}`" if alias.field else "ignored, with a warning"
        values = ", ".join(f"`{seed}` → `{ours}`" for seed, ours in alias.values.items())
        rows.append(f"| `{name}` | {alias.seeds} | {setting} | {'; '.join(filter(None, [values, alias.note]))} |")
    return "\n".join(rows)


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
