"""lm: a small, readable GPT-style language model library, the code behind the book.

    import lm
    tok = lm.CharTokenizer.train(text)
    model = lm.GPT(lm.ModelConfig(vocab_size=tok.vocab_size), tokenizer=tok)
    model = lm.GPT(lm.preset("rscalm-138m", n_layer=2))   # a seed's architecture, from lm.PRESETS
    history = lm.train(model, train_ids, val_ids, lm.TrainConfig(max_steps=300))
    lm.finetune(model, "chat.jsonl", lm.FinetuneConfig(lora_rank=8))   # answers only, early stopping
    print(lm.evaluate(model, lm.glossary.examples("test")).table())   # exact match, token accuracy
    print(model.generate("To be", max_new_tokens=100))
    model = lm.load_model("runs/x/best.pt", device="cpu")
"""

from .version import __version__  # noqa: E402  (isort: skip)

# Component modules register their classes (lm.registry) on import; the model looks them up by name.
from . import attention, feedforward, norms, positions  # noqa: F401  (isort: skip)
from . import quantize  # noqa: F401  (lm.quantize.quantize_int8, as the README shows)
from .checkpoint import (
    CheckpointError, CheckpointSaveError, convert_checkpoint, load_checkpoint, load_model, save_checkpoint,
)
from .config import ConfigError, ModelConfig
from .corpora import load_corpus, load_documents
from .data import DataError, get_batch, train_val_split
from . import assets, glossary, instructions  # noqa: F401  (lm.assets.path(name), lm.glossary.examples("train"), ...)
from .evaluation import EvalResult, evaluate, normalize_answer
from .finetuning import FinetuneConfig, finetune
from .instructions import ChatTemplate, DataFormatError, Examples, chat_template, load_examples
from . import chat, classify, lora, retrieval, serving  # noqa: F401  (lm.lora.merge_lora, lm.chat.Chat, ...)
from .classify import SequenceClassifier, classification_task, train_classifier
from .lora import LoRAConfig, LoRAError, apply_lora, load_adapters, merge_lora, save_adapters, unmerge_lora
from .retrieval import Retriever
from .device import auto_device, resolve_device
from .memory import find_batch_size, training_memory
from .generation import Decoder, GenerationConfig
from .kv_cache import KVCache
from .losses import linear_cross_entropy
from .speculative import SpeculativeStats, speculative_generate
from .model import GPT
from .hf import ConversionError, export_hf, from_hf
from .presets import PRESETS, count_params, param_breakdown, param_formula_rscalm, param_formula_seed000, preset
from .registry import ATTENTION, FEEDFORWARD, NORMS, POSITIONS, Registry, RegistryError
from .sampling import (
    SamplingConfig, SamplingError, choose_next, min_p_filter, process_logits, sample_next, top_k_filter, top_p_filter,
)
from .tokenizers import (
    ByteBPETokenizer, CharTokenizer, SentencePieceTokenizer, TiktokenTokenizer, TokenizerError, load_tokenizer,
)
from .optim import lr_at
from .trainer import TrainConfig, TrainHistory, TrainingError, TrainingInterrupted
from .training import train

__all__ = [
    "ATTENTION", "FEEDFORWARD", "NORMS", "POSITIONS", "PRESETS", "Registry", "RegistryError",
    "count_params", "param_breakdown", "param_formula_rscalm", "param_formula_seed000", "preset",
    "Decoder", "GenerationConfig", "KVCache", "ByteBPETokenizer", "CharTokenizer", "CheckpointError", "CheckpointSaveError", "ConfigError", "DataError", "GPT", "ModelConfig", "SamplingError",
    "TokenizerError", "TrainConfig", "TrainHistory", "TrainingError", "TrainingInterrupted", "auto_device", "get_batch",
    "load_checkpoint", "load_corpus", "load_model", "load_tokenizer", "lr_at", "resolve_device",
    "SentencePieceTokenizer", "TiktokenTokenizer", "sample_next", "save_checkpoint", "top_k_filter", "train", "train_val_split",
    "find_batch_size", "load_documents", "training_memory",
    "SamplingConfig", "choose_next", "min_p_filter", "process_logits", "top_p_filter",
    "ChatTemplate", "DataFormatError", "EvalResult", "Examples", "FinetuneConfig", "chat_template", "evaluate",
    "finetune", "load_examples", "normalize_answer",
    "LoRAConfig", "LoRAError", "apply_lora", "load_adapters", "merge_lora", "save_adapters", "unmerge_lora",
    "SequenceClassifier", "classification_task", "train_classifier", "Retriever",
    "ConversionError", "convert_checkpoint", "export_hf", "from_hf",
    "SpeculativeStats", "speculative_generate", "linear_cross_entropy",
]
