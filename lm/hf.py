"""Hugging Face interoperability: GPT-2 and LLaMA weights into `lm` and back out.

    model = lm.from_hf("path/to/hf_folder")              # config.json + model.safetensors (+ tokenizer)
    model = lm.from_hf(transformers_model)                 # a GPT2LMHeadModel or LlamaForCausalLM object
    lm.export_hf(model, "out/")                            # AutoModelForCausalLM.from_pretrained("out/") loads it
    model = lm.GPT.from_pretrained("gpt2")                 # OpenAI's weights, when the hub is reachable

Two architectures of the transformers library are the same networks as two `lm` configurations:

    transformers       lm configuration
    GPT2LMHeadModel    pos="learned", norm="layernorm", ffn="gelu_tanh" (or "gelu"), pre-norm, full causal attention
    LlamaForCausalLM   pos="rope", norm="rmsnorm", ffn="swiglu", pre-norm, full causal attention, any n_kv_heads

Converting is renaming, with three twists:
- GPT-2's linear layers are `Conv1D` modules that store their weight as (in, out), the transpose of
  `nn.Linear`'s (out, in); every one of them is transposed on the way in and out.
- `lm` computes queries, keys and values with one fused matrix `attn.qkv` (rows: q, then k, then v);
  LLaMA has three (`q_proj`, `k_proj`, `v_proj`), so the fused one is cut into three and glued back.
- RoPE has two layouts. Meta's original LLaMA checkpoints rotate interleaved pairs of channels
  (0,1), (2,3), ...; transformers (and `lm`) rotate the two halves (0, D/2), (1, D/2+1), ...
  Hugging Face's conversion script permutes the rows of q_proj and k_proj once so that the halves
  layout gives the same attention, which is why weights in a Hugging Face folder copy over as they
  are. `meta_to_halves` is that permutation, for weights taken from a Meta-format file.

Anything else in an `lm` configuration (sinusoidal positions, ScaleNorm, post-norm, MoE, sliding-window,
linear or block-sparse attention) has no transformers class that computes the same function;
`hf_architecture` names the field that stops it. The file this module writes also records the
`lm` configuration in config.json (under "lm"), so lm -> Hugging Face -> lm gives back the same
configuration (dropout, init, ...), not only the same weights.

Reading never runs code from the files: safetensors, or `torch.load(weights_only=True)` for
`pytorch_model.bin`, and the configuration is checked against the tensors' shapes before anything
is allocated. Nothing here opens a network connection except `from_pretrained` given a hub name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from .config import ModelConfig
from .model import GPT
from .registry import PRETRAINED
from .version import __version__

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
MAX_JSON_BYTES = 16 * 2**20  # config.json and index files: far above any real one
IGNORED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # buffers older transformers saved
GPT2_TANH = ("gelu_new", "gelu_pytorch_tanh")  # transformers' names for GELU's tanh approximation
HUB_NAMES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
             "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}


class ConversionError(ValueError):
    """Weights or a configuration cannot be converted; the message names what and what to do."""


# ---- which configurations map ---------------------------------------------------------------------
def hf_architecture(config: ModelConfig, architecture: str = "auto") -> str:
    """"gpt2" or "llama": the transformers architecture that computes the same function as
    `GPT(config)`. `architecture="auto"` picks from the position encoding; naming one checks it.
    Raises ConversionError naming each field that has no counterpart."""
    if architecture not in ("auto", *ARCHITECTURES):
        raise ConversionError(f"architecture={architecture!r} is unknown; choose 'auto', 'gpt2' or 'llama'.")
    if architecture == "auto":
        architecture = "llama" if config.pos == "rope" else "gpt2"
    wanted = {"gpt2": dict(pos="learned", norm="layernorm", ffn=("gelu", "gelu_tanh"), n_kv_heads=(None, config.n_head)),
              "llama": dict(pos="rope", norm="rmsnorm", ffn=("swiglu",))}[architecture]
    wanted.update(norm_position="pre", attention=("sdpa", "manual"))
    wrong = []
    for name, allowed in wanted.items():
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if getattr(config, name) not in allowed:
            wrong.append(f"{name}={getattr(config, name)!r} (needs {' or '.join(map(repr, allowed))})")
    if wrong:
        raise ConversionError(f"this model has no {ARCHITECTURES[architecture]} counterpart: {'; '.join(wrong)}. "
                              f"The table in `lm.hf`'s docstring lists the configurations that convert; train one "
                              f"of those to export it.")
    return architecture


def hf_config(config: ModelConfig, architecture: str = "auto", eos_id: int | None = None,
              bos_id: int | None = None) -> dict[str, Any]:
    """The config.json of the transformers model equal to `GPT(config)`."""
    architecture = hf_architecture(config, architecture)
    common = dict(architectures=[ARCHITECTURES[architecture]], model_type=architecture, vocab_size=config.vocab_size,
                  tie_word_embeddings=config.tie_weights, bos_token_id=bos_id, eos_token_id=eos_id, dtype="float32",
                  lm={"config": config.to_dict()})
    if architecture == "gpt2":
        return dict(common, n_positions=config.block_size, n_embd=config.d_model, n_layer=config.n_layer,
                    n_head=config.n_head, n_inner=config.ffn_width,
                    activation_function="gelu_new" if config.ffn == "gelu_tanh" else "gelu",
                    layer_norm_epsilon=config.norm_eps, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
                    attn_pdrop=config.dropout, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                    reorder_and_upcast_attn=False, initializer_range=0.02)
    return dict(common, hidden_size=config.d_model, intermediate_size=config.ffn_width,
                num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                num_key_value_heads=config.kv_heads, head_dim=config.head_dim, hidden_act="silu",
                max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
                rope_theta=config.rope_base, rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
                rope_scaling=None, attention_bias=config.bias, mlp_bias=config.bias,
                attention_dropout=config.dropout, initializer_range=0.02, pretraining_tp=1)


def lm_config(hf: dict[str, Any]) -> ModelConfig:
    """The `lm` configuration of a transformers config.json (a dict). GPT-2 and LLaMA (and Mistral
    without a sliding window) convert; a setting that changes the function raises ConversionError."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        return _gpt2_config(hf)
    if kind in ("llama", "mistral"):
        return _llama_config(hf)
    raise ConversionError(f"model_type={kind!r} is not supported: lm reads GPT-2 ('gpt2') and LLaMA ('llama') "
                          f"models. Convert the weights of another architecture yourself with `lm.hf.weight_map` "
                          f"as a guide, or use transformers for it.")


def _refuse(hf: dict, name: str, value: Any, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConversionError(f"{hf.get('model_type')} config has {name}={value!r}; lm computes only "
                              f"{' or '.join(map(repr, allowed))}, so the logits would differ.")


def _gpt2_config(hf: dict) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    _refuse(hf, "activation_function", act, GPT2_TANH + ("gelu",))
    _refuse(hf, "scale_attn_weights", hf.get("scale_attn_weights", True), (True,))
    _refuse(hf, "scale_attn_by_inverse_layer_idx", hf.get("scale_attn_by_inverse_layer_idx", False), (False,))
    _refuse(hf, "add_cross_attention", hf.get("add_cross_attention", False), (False,))
    return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024), n_layer=hf["n_layer"],
                       n_head=hf["n_head"], d_model=hf["n_embd"], d_ff=hf.get("n_inner"), bias=True,
                       tie_weights=hf.get("tie_word_embeddings", True), pos="learned", norm="layernorm",
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), ffn="gelu" if act == "gelu" else "gelu_tanh")


def _llama_config(hf: dict) -> ModelConfig:
    _refuse(hf, "hidden_act", hf.get("hidden_act", "silu"), ("silu",))
    if hf.get("model_type") == "mistral":
        _refuse(hf, "sliding_window", hf.get("sliding_window"), (None,))
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    _refuse(hf, "rope type", rope.get("rope_type", rope.get("type", "default")), ("default",))
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, C // H):
        _refuse(hf, "head_dim", hf["head_dim"], (C // H,))
    bias = hf.get("attention_bias", False)
    _refuse(hf, "mlp_bias", hf.get("mlp_bias", False), (bias,))  # lm has one bias flag for every Linear
    kv = hf.get("num_key_value_heads") or H
    return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                       n_layer=hf["num_hidden_layers"], n_head=H, n_kv_heads=None if kv == H else kv, d_model=C,
                       d_ff=hf["intermediate_size"], bias=bias, tie_weights=hf.get("tie_word_embeddings", False),
                       pos="rope", rope_base=float(theta), norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
                       ffn="swiglu")


def _with_recorded_config(derived: ModelConfig, hf: dict) -> ModelConfig:
    """The configuration config.json recorded under "lm" when lm wrote it, if it describes the same
    network as the one derived from the transformers fields (it may differ in what transformers does
    not keep: dropout, init, d_ff given as None, bias=False in GPT-2, attention "manual"); else the derived one."""
    recorded = (hf.get("lm") or {}).get("config") if isinstance(hf.get("lm"), dict) else None
    if not isinstance(recorded, dict):
        return derived
    try:
        config = ModelConfig.from_dict(recorded)
    except Exception:
        return derived
    same = ("vocab_size", "block_size", "n_layer", "n_head", "kv_heads", "d_model", "ffn_width", "tie_weights",
            "pos", "norm", "ffn", "norm_eps", "norm_position")
    if config.pos == "rope":
        same += ("rope_base", "bias")
    return config if all(getattr(config, f) == getattr(derived, f) for f in same) else derived


# ---- which tensors map ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """One `lm` tensor and the transformers tensor(s) holding it: several are stacked along rows
    (LLaMA's q, k, v), `rows` says how many each holds; `transpose` for GPT-2's Conv1D."""

    lm: str
    hf: tuple[str, ...]
    rows: tuple[int, ...] = ()
    transpose: bool = False


def weight_map(config: ModelConfig, architecture: str = "auto") -> list[Link]:
    """Every tensor of `GPT(config)` and its transformers name(s), without the "transformer." /
    "model." prefix. The book's widget shows this table."""
    architecture = hf_architecture(config, architecture)
    links = []
    if architecture == "gpt2":
        links += [Link("tok_emb.weight", ("wte.weight",)), Link("pos_emb.weight", ("wpe.weight",))]
        for i in range(config.n_layer):
            lm, hf = f"blocks.{i}.", f"h.{i}."
            for ours, theirs, conv in [("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                                       ("attn.proj", "attn.c_proj", True), ("norm2", "ln_2", False),
                                       ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)]:
                links.append(Link(lm + ours + ".weight", (hf + theirs + ".weight",), transpose=conv))
                links.append(Link(lm + ours + ".bias", (hf + theirs + ".bias",)))
        links += [Link("norm_f.weight", ("ln_f.weight",)), Link("norm_f.bias", ("ln_f.bias",))]
    else:
        C, KV = config.d_model, config.kv_heads * config.head_dim
        links.append(Link("tok_emb.weight", ("embed_tokens.weight",)))
        parts = ("weight", "bias") if config.bias else ("weight",)
        for i in range(config.n_layer):
            lm, hf = f"blocks.{i}.", f"layers.{i}."
            links += [Link(lm + "norm1.weight", (hf + "input_layernorm.weight",)),
                      Link(lm + "norm2.weight", (hf + "post_attention_layernorm.weight",))]
            for p in parts:
                links.append(Link(f"{lm}attn.qkv.{p}", tuple(f"{hf}self_attn.{x}_proj.{p}" for x in "qkv"), (C, KV, KV)))
                for ours, theirs in [("attn.proj", "self_attn.o_proj"), ("mlp.w1", "mlp.gate_proj"),
                                     ("mlp.w2", "mlp.up_proj"), ("mlp.w3", "mlp.down_proj")]:
                    links.append(Link(f"{lm}{ours}.{p}", (f"{hf}{theirs}.{p}",)))
        links.append(Link("norm_f.weight", ("norm.weight",)))
    if not config.tie_weights:
        links.append(Link("lm_head.weight", ("lm_head.weight",)))
    return links


PREFIXES = {"gpt2": "transformer.", "llama": "model."}


def to_hf_state_dict(model: GPT, architecture: str = "auto") -> dict[str, torch.Tensor]:
    """`model`'s weights under transformers' names (prefixed as `save_pretrained` writes them).
    A GPT-2-shaped model without biases gets zero biases: GPT-2's layers always have them."""
    config = model.config
    architecture = hf_architecture(config, architecture)
    ours = model.state_dict()
    out = {}
    for link in weight_map(config, architecture):
        tensor = ours.get(link.lm)
        if tensor is None:  # a bias GPT-2 has and this model does not
            weight = ours[link.lm.rsplit(".", 1)[0] + ".weight"]
            tensor = weight.new_zeros(weight.shape[0] if link.lm.endswith(".bias") else weight.shape)
        tensor = tensor.detach()
        pieces = tensor.split(list(link.rows)) if link.rows else (tensor,)
        for name, piece in zip(link.hf, pieces):
            piece = piece.t() if link.transpose else piece
            out[_prefixed(name, architecture)] = piece.contiguous().clone()
    return out


def _prefixed(name: str, architecture: str) -> str:
    return name if name == "lm_head.weight" else PREFIXES[architecture] + name


def from_hf_state_dict(config: ModelConfig, weights: dict[str, torch.Tensor], architecture: str = "auto"
                       ) -> dict[str, torch.Tensor]:
    """An `lm` state dict from transformers-named tensors (with or without their prefixes).
    Raises ConversionError naming the missing and the unexpected tensors. Zero biases of a GPT-2 file
    are dropped when `config.bias` is False (the file was exported from a bias-free lm model)."""
    architecture = hf_architecture(config, architecture)
    prefix = PREFIXES[architecture]
    theirs = {}
    for name, tensor in weights.items():
        name = name[len(prefix):] if name.startswith(prefix) else name
        if not name.endswith(IGNORED):
            theirs[name] = tensor
    out, used = {}, set()
    for link in weight_map(config, architecture):
        missing = [n for n in link.hf if n not in theirs]
        if missing:
            if link.lm == "lm_head.weight" or missing == list(link.hf) and link.lm.endswith(".bias") and not config.bias:
                continue
            raise ConversionError(f"the weights have no {missing[0]!r} (needed for lm's {link.lm!r}); "
                                  f"they are not a complete {ARCHITECTURES[architecture]} of this configuration.")
        pieces = [theirs[n].t() if link.transpose else theirs[n] for n in link.hf]
        used.update(link.hf)
        tensor = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if link.lm.endswith(".bias") and not config.bias and architecture == "gpt2":
            if tensor.any():
                raise ConversionError(f"{link.hf[0]!r} is not zero but the recorded lm config has bias=False; "
                                      f"the file was changed after lm exported it. Remove its 'lm' entry from config.json.")
            continue
        out[link.lm] = tensor.contiguous()
    if not config.tie_weights and "lm_head.weight" not in out:
        raise ConversionError("the config says the output head is not tied to the embedding "
                              "(tie_word_embeddings=false), but the weights have no 'lm_head.weight'.")
    unexpected = sorted(set(theirs) - used - {"lm_head.weight"})
    if unexpected:
        raise ConversionError(f"tensors {unexpected[:5]} have no place in lm's model: the file holds more than "
                              f"a {ARCHITECTURES[architecture]} of this configuration (another head, or another model).")
    return out


# ---- reading and writing folders -------------------------------------------------------------------
def read_json(path: Path) -> dict:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ConversionError(f"{str(path)!r} is {path.stat().st_size:,} bytes; a config of that size is not a "
                              f"transformers config. It was not read.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConversionError(f"{str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConversionError(f"{str(path)!r} holds a {type(data).__name__}, not a JSON object.")
    return data


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a transformers folder: model.safetensors, its shards (model.safetensors.index.json),
    or pytorch_model.bin (read with weights_only=True). No code in the files runs."""
    single, index, legacy = folder / "model.safetensors", folder / "model.safetensors.index.json", folder / "pytorch_model.bin"
    if single.is_file():
        files = [single]
    elif index.is_file():
        shards = read_json(index).get("weight_map", {})
        names = sorted({str(v) for v in shards.values()})
        if not names or any(Path(n).name != n for n in names):
            raise ConversionError(f"{str(index)!r} names no shards, or shards outside its folder: {names[:3]}.")
        files = [folder / n for n in names]
    elif legacy.is_file():
        return read_torch_file(legacy)
    else:
        raise ConversionError(f"{str(folder)!r} has no model.safetensors, model.safetensors.index.json or "
                              f"pytorch_model.bin; is it a transformers model folder?")
    from safetensors.torch import load_file

    weights = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except Exception as err:
            raise ConversionError(f"cannot read {str(file)!r} as safetensors: {err}") from err
    return weights


def read_torch_file(path: Path) -> dict:
    """A torch.save'd dict (pytorch_model.bin, a nanoGPT or seed 002 checkpoint), read the way lm reads its
    own checkpoints: zip bombs refused first, only tensors and plain data (weights_only=True), no tensor
    larger than the bytes the file stores for it."""
    from .checkpoint import check_archive, check_storage_sizes

    check_archive(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ConversionError(f"cannot read {str(path)!r} safely (only tensors and plain data are allowed; a file "
                              f"holding pickled classes cannot be read): {err}") from err
    if not isinstance(data, dict):
        raise ConversionError(f"{str(path)!r} holds a {type(data).__name__}, not a dict.")
    check_storage_sizes(data, repr(str(path)))
    return data


def _check_shapes(config: ModelConfig, weights: dict[str, torch.Tensor], where: str) -> None:
    """Compare every tensor with the shape the configuration gives it, on the meta device (which
    allocates nothing): a crafted config.json cannot make us build a model larger than its weights."""
    from .checkpoint import CheckpointError, check_config_fits_weights

    try:
        check_config_fits_weights(config, weights, None)
    except CheckpointError as err:
        raise ConversionError(f"{where}: {str(err).replace('checkpoint', 'model')}") from err


def from_hf(source: Any, tokenizer: Any = "auto", device: str | torch.device | None = None,
            dtype: torch.dtype | None = None) -> GPT:
    """An `lm.GPT` equal to a transformers GPT-2 or LLaMA model.

    source: a folder written by `save_pretrained` (or by `export_hf`), or a transformers model object.
    tokenizer: "auto" reads the folder's tokenizer files (tokenizer.json, tokenizer.model) when there
    are any; None attaches none; or an lm tokenizer, a transformers tokenizer, or a folder to read one from.
    dtype: cast the weights (default: keep the stored dtype; a bfloat16 folder stays bfloat16).
    device: where the model goes (None: cuda, then mps, then cpu). The model is returned in eval mode."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise ConversionError(f"{str(folder)!r} has no config.json; give a folder written by save_pretrained "
                                  f"or lm.export_hf (for a hub name use lm.GPT.from_pretrained).")
        hf = read_json(folder / "config.json")
        weights = read_weights(folder)
        where = repr(str(folder))
        if isinstance(tokenizer, str) and tokenizer == "auto":
            tokenizer = _folder_tokenizer(folder)
    elif hasattr(source, "config") and hasattr(source, "state_dict"):
        hf = source.config.to_dict()
        weights = source.state_dict()
        where = type(source).__name__
        if isinstance(tokenizer, str) and tokenizer == "auto":
            tokenizer = None
    else:
        raise ConversionError(f"from_hf takes a folder or a transformers model, not {type(source).__name__}.")
    if tokenizer is not None and not _is_lm_tokenizer(tokenizer):  # a transformers tokenizer, or a folder
        from .tokenizers.hf import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(tokenizer)
    config = _with_recorded_config(lm_config(hf), hf)
    state = from_hf_state_dict(config, weights)
    _check_shapes(config, state, where)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size}; "
                              f"they do not belong together.")
    model = model_from_state(config, state, where)
    model.tokenizer = tokenizer
    if dtype is not None:
        model = model.to(dtype)
    from .device import resolve_device

    return model.to(resolve_device(device)).eval()


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], where: str) -> GPT:
    """`GPT(config)` holding `state` (lm's names; the tied head may be left out), built on the meta device:
    no memory and no time spent on a random initialisation that the weights replace."""
    with torch.device("meta"):
        model = GPT(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_weights)]
    if missing or result.unexpected_keys:
        raise ConversionError(f"{where} does not fit its config: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}.")
    if config.tie_weights:
        model.lm_head.weight = model.tok_emb.weight
    if model.rope is not None:  # RoPE's cos/sin tables are computed, not stored
        from .positions import RotaryEmbedding

        model.rope = RotaryEmbedding.from_config(config)
    return model


def _is_lm_tokenizer(tokenizer: Any) -> bool:
    from .tokenizers.base import Tokenizer

    return isinstance(tokenizer, Tokenizer)


def _folder_tokenizer(folder: Path):
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return None
    from .tokenizers.hf import load_hf_tokenizer

    return load_hf_tokenizer(folder)


def export_hf(model: GPT | str | os.PathLike, out_dir: str | os.PathLike, architecture: str = "auto",
              dtype: torch.dtype | None = None, tokenizer: bool = True) -> Path:
    """Write `model` (or the checkpoint at that path) as a transformers folder: config.json,
    generation_config.json, model.safetensors and the tokenizer's files, which
    `AutoModelForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)` load
    offline. `architecture`: "auto", "gpt2" or "llama" (ConversionError when the model has no such
    counterpart). `dtype` casts the weights (e.g. torch.bfloat16 halves the file). Returns out_dir."""
    from safetensors.torch import save

    from . import files

    if isinstance(model, (str, os.PathLike)):
        from .checkpoint import load_model

        model = load_model(model, device="cpu")
    architecture = hf_architecture(model.config, architecture)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = to_hf_state_dict(model, architecture)
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    tok = model.tokenizer if tokenizer else None
    eos = getattr(tok, "eos_id", None)
    bos = (getattr(tok, "special_tokens", None) or {}).get("<BOS>") if tok is not None else None
    config = hf_config(model.config, architecture, eos_id=eos, bos_id=bos)
    config["lm"]["version"] = __version__
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos, "do_sample": False}
    files.write_atomically(out / "model.safetensors",
                           lambda f: f.write(save(weights, metadata={"format": "pt"})), suffix=".partial")
    for name, data in (("config.json", config), ("generation_config.json", generation)):
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        files.write_atomically(out / name, lambda f, text=text: f.write(text.encode()), suffix=".partial")
    if tok is not None:
        from .tokenizers.hf import save_hf_tokenizer

        save_hf_tokenizer(tok, out)
    return out


# ---- the hub (optional) ----------------------------------------------------------------------------
@PRETRAINED.register("huggingface")
def from_pretrained(name: str, cache_dir: str | os.PathLike | None = None, device: str | torch.device | None = None,
                    local_files_only: bool | None = None) -> GPT:
    """GPT-2's weights from the Hugging Face hub ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", or any
    repository of a GPT-2 or LLaMA model), through the hub's local cache: a second call reads the
    cache and opens no connection. A local folder works too. Offline (no network, or HF_HUB_OFFLINE=1)
    and not cached: ConversionError saying so, after no more than the hub library's own timeout."""
    if Path(name).is_dir():
        return from_hf(name, device=device)
    repo = HUB_NAMES.get(name, name)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ConversionError("downloading from the hub needs the huggingface_hub package: "
                              "pip install huggingface_hub (transformers brings it).") from err
    patterns = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                "merges.txt", "tokenizer.model", "generation_config.json"]
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        folder = snapshot_download(repo, allow_patterns=patterns, cache_dir=cache_dir,
                                   local_files_only=bool(local_files_only) or offline)
    except Exception as err:
        raise ConversionError(f"could not get {repo!r} from the Hugging Face hub ({type(err).__name__}): it is not "
                              f"in the local cache and the hub cannot be reached{' (HF_HUB_OFFLINE is set)' if offline else ''}. "
                              f"Download it where there is a network (huggingface-cli download {repo}) and pass "
                              f"the folder, or use lm.from_hf on a local copy.") from err
    return from_hf(folder, device=device)


# ---- other checkpoints: nanoGPT's and seed 002's ------------------------------------------------------
def from_nanogpt(state: dict[str, torch.Tensor], model_args: dict[str, Any]) -> tuple[ModelConfig, dict]:
    """nanoGPT's `ckpt.pt` ('model' state dict, 'model_args') as an lm config and state dict.
    nanoGPT is GPT-2 written with nn.Linear (no transpose), exact GELU, optional biases; a compiled
    model's keys start with "_orig_mod.", which is removed."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    state = {k.removeprefix("transformer."): v for k, v in state.items() if not k.endswith(IGNORED)}
    try:
        config = ModelConfig(vocab_size=model_args["vocab_size"], block_size=model_args["block_size"],
                             n_layer=model_args["n_layer"], n_head=model_args["n_head"], d_model=model_args["n_embd"],
                             bias=bool(model_args.get("bias", True)), dropout=float(model_args.get("dropout", 0.0)),
                             tie_weights=True, pos="learned", norm="layernorm", ffn="gelu")
    except KeyError as err:
        raise ConversionError(f"nanoGPT's model_args has no {err}; it needs vocab_size, block_size, n_layer, "
                              f"n_head and n_embd.") from err
    if "lm_head.weight" in state and "wte.weight" in state and not torch.equal(state["lm_head.weight"], state["wte.weight"]):
        config.tie_weights = False
        config.validate()
    links = weight_map(config, "gpt2")
    # nanoGPT's layers are nn.Linear: the same names as GPT-2's, without Conv1D's transpose
    links = [Link(link.lm, link.hf) for link in links]
    out = {}
    for link in links:
        if link.hf[0] in state:
            out[link.lm] = state[link.hf[0]]
        elif not (link.lm.endswith(".bias") and not config.bias):
            raise ConversionError(f"nanoGPT checkpoint has no {link.hf[0]!r} (needed for lm's {link.lm!r}).")
    unexpected = sorted(set(state) - {link.hf[0] for link in links} - {"lm_head.weight"})
    if unexpected:
        raise ConversionError(f"nanoGPT checkpoint has tensors lm does not know: {unexpected[:5]}.")
    return config, out


def from_seed002(state: dict[str, torch.Tensor], settings: dict[str, Any]) -> tuple[ModelConfig, dict]:
    """Seed 002's (RSCaLM's) checkpoint: lm's own names but `norm.weight` for the final RMSNorm; the
    sizes come from the tensors, the heads and context from its saved settings (n_head, seq_len)."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    state = {("norm_f.weight" if k == "norm.weight" else k): v for k, v in state.items()}
    if "tok_emb.weight" not in state or "blocks.0.mlp.w1.weight" not in state:
        raise ConversionError("not a seed 002 checkpoint: it needs tok_emb.weight and blocks.N.mlp.w1/w2/w3 tensors.")
    V, C = state["tok_emb.weight"].shape
    n_head = settings.get("n_head")
    if not isinstance(n_head, int):
        raise ConversionError("seed 002's checkpoint does not say n_head (its 'config' entry); pass n_head=... "
                              "(the --n_head it was trained with).")
    layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    F_ = state["blocks.0.mlp.w1.weight"].shape[0]
    qkv_rows = state["blocks.0.attn.qkv.weight"].shape[0]
    kv = (qkv_rows - C) // 2 // (C // n_head)
    tied = "lm_head.weight" not in state or torch.equal(state["lm_head.weight"], state["tok_emb.weight"])
    config = ModelConfig(vocab_size=V, block_size=int(settings.get("seq_len", settings.get("block_size", 1024))),
                         n_layer=layers, n_head=n_head, n_kv_heads=None if kv == n_head else kv, d_model=C,
                         d_ff=None if F_ == 4 * C else F_,
                         bias=any(k.endswith(".bias") for k in state), tie_weights=tied, pos="rope",
                         norm="rmsnorm", norm_eps=float(settings.get("norm_eps", 1e-6)), ffn="swiglu",
                         rope_base=float(settings.get("rope_base", settings.get("rope_theta", 10000.0))))
    if tied:
        state.pop("lm_head.weight", None)
    return config, state


def meta_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection for RoPE on interleaved pairs (Meta's LLaMA files) reordered for
    RoPE on halves (transformers, lm): within each head, channels 0,2,4,... then 1,3,5,..."""
    rows, cols = weight.shape
    D = rows // n_heads
    return weight.view(n_heads, D // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_meta(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `meta_to_halves`."""
    rows, cols = weight.shape
    D = rows // n_heads
    return weight.view(n_heads, 2, D // 2, cols).transpose(1, 2).reshape(rows, cols)


def describe(config: ModelConfig, architecture: str = "auto") -> list[tuple[str, str, str]]:
    """(lm name, transformers name(s), how) rows of `weight_map`, for reading and for the book's widget."""
    architecture = hf_architecture(config, architecture)
    rows = []
    for link in weight_map(config, architecture):
        how = "transposed (Conv1D)" if link.transpose else ("rows split " + "/".join(map(str, link.rows))
                                                              if link.rows else "copied")
        rows.append((link.lm, ", ".join(_prefixed(h, architecture) for h in link.hf), how))
    return rows



# ---- one entry point for `lm import` --------------------------------------------------------------
def import_model(source: str | os.PathLike, n_head: int | None = None, tokenizer: Any = "auto") -> GPT:
    """An lm model from whatever `source` is, detected by content: a transformers folder (config.json),
    a nanoGPT `ckpt.pt` ('model_args'), seed 002's checkpoint ('model' with a final `norm.weight`), or
    lm's own checkpoint. Files are read with weights_only=True. `n_head` fills in what seed 002's file
    may not say."""
    path = Path(source)
    if path.is_dir():
        return from_hf(path, tokenizer=tokenizer)
    if not path.is_file():
        raise ConversionError(f"{str(path)!r} does not exist; give a transformers folder or a checkpoint file.")
    from .checkpoint import FORMAT, load_model

    ckpt = read_torch_file(path)
    if ckpt.get("format") == FORMAT:
        return load_model(path, device="cpu")
    state = ckpt.get("model") or ckpt.get("model_state_dict") or ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise ConversionError(f"{str(path)!r} has no 'model' state dict; its entries are {sorted(ckpt)[:10]}.")
    if isinstance(ckpt.get("model_args"), dict):
        config, weights = from_nanogpt(state, ckpt["model_args"])
        kind = "nanoGPT"
    elif any(k.removeprefix("_orig_mod.") == "norm.weight" for k in state):
        settings = dict(ckpt.get("config") or {}) if isinstance(ckpt.get("config"), dict) else {}
        if n_head is not None:
            settings["n_head"] = n_head
        config, weights = from_seed002(state, settings)
        kind = "seed 002"
    else:
        raise ConversionError(f"{str(path)!r} is not a checkpoint lm knows: not lm's, nanoGPT's (model_args) or "
                              f"seed 002's (norm.weight); its first tensors are {sorted(state)[:5]}.")
    where = f"{kind} checkpoint {str(path)!r}"
    _check_shapes(config, weights, where)
    model = model_from_state(config, weights, where)
    if tokenizer is not None and not (isinstance(tokenizer, str) and tokenizer == "auto"):
        model.tokenizer = tokenizer
    return model.eval()
