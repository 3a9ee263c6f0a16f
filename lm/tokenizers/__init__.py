"""Tokenizers: text to integer ids and back, all behind one interface (see `base.Tokenizer`).

- `CharTokenizer`: one id per character, with special tokens (`char.py`).
- `ByteBPETokenizer`: byte-level BPE trained from scratch, or loaded with GPT-2's ranks (`bpe.py`).
- `SentencePieceTokenizer`: a trained sentencepiece BPE / unigram model (`sentencepiece.py`).
- `TiktokenTokenizer`: GPT-2's tokenizer through tiktoken, offline (`tiktoken_gpt2.py`).
- GPT-2's merge ranks, fetched offline through pip (`gpt2_ranks.py`).
- The plain BPE that `ByteBPETokenizer`'s trainer is tested against (`naive_bpe.py`).
- Hugging Face tokenizer files, written and read (`hf.py`).
"""

from .base import TOKENIZERS, Tokenizer, TokenizerError, load_tokenizer, tokenizer_from_dict
from .bpe import GPT4_PATTERN, ByteBPETokenizer
from .char import SPECIAL_TOKENS, UNKNOWN_POLICIES, CharTokenizer
from .gpt2_ranks import GPT2_PATTERN, GPT2_SPECIAL_TOKENS, gpt2_ranks_path, load_gpt2_ranks
from .hf import load_hf_tokenizer, save_hf_tokenizer
from .prep import PREP_TOKENIZERS, VOCAB_DEFAULTS, prep_tokenize
from .sentencepiece import SentencePieceTokenizer
from .tiktoken_gpt2 import TiktokenTokenizer

__all__ = [
    "GPT2_PATTERN", "GPT2_SPECIAL_TOKENS", "GPT4_PATTERN", "SPECIAL_TOKENS", "TOKENIZERS", "UNKNOWN_POLICIES",
    "ByteBPETokenizer", "CharTokenizer", "SentencePieceTokenizer", "TiktokenTokenizer", "Tokenizer",
    "PREP_TOKENIZERS", "VOCAB_DEFAULTS", "TokenizerError", "gpt2_ranks_path", "load_gpt2_ranks", "load_tokenizer",
    "prep_tokenize", "tokenizer_from_dict", "load_hf_tokenizer", "save_hf_tokenizer",
]
