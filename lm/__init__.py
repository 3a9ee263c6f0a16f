"""lm: a small, readable GPT-style language model library, the code behind the book.

    import lm
    tok = lm.CharTokenizer.train(text)
    model = lm.GPT(lm.ModelConfig(vocab_size=tok.vocab_size), tokenizer=tok)
    history = lm.train(model, train_ids, val_ids, lm.TrainConfig(max_steps=300))
    print(model.generate("To be", max_new_tokens=100))
    model = lm.load_model("runs/x/best.pt", device="cpu")
"""

__version__ = "0.1.0"

from .checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from .config import ConfigError, ModelConfig
from .data import DataError, get_batch, load_corpus, train_val_split
from .device import auto_device, resolve_device
from .model import GPT
from .sampling import SamplingError, sample_next, top_k_filter
from .tokenizers import (
    ByteBPETokenizer, CharTokenizer, SentencePieceTokenizer, TiktokenTokenizer, TokenizerError, load_tokenizer,
)
from .training import TrainConfig, TrainHistory, TrainingError, lr_at, train

__all__ = [
    "ByteBPETokenizer", "CharTokenizer", "CheckpointError", "ConfigError", "DataError", "GPT", "ModelConfig", "SamplingError",
    "TokenizerError", "TrainConfig", "TrainHistory", "TrainingError", "auto_device", "get_batch",
    "load_checkpoint", "load_corpus", "load_model", "load_tokenizer", "lr_at", "resolve_device",
    "SentencePieceTokenizer", "TiktokenTokenizer", "sample_next", "save_checkpoint", "top_k_filter", "train", "train_val_split",
]
