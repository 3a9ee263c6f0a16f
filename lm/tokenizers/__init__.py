"""Tokenizers: text to integer ids and back, all behind one interface (see `base.Tokenizer`).

- `CharTokenizer`: one id per character, with special tokens (`char.py`).
- GPT-2's merge ranks, fetched offline through pip (`gpt2_ranks.py`).
"""

from .base import TOKENIZERS, Tokenizer, TokenizerError, load_tokenizer, register, tokenizer_from_dict
from .char import SPECIAL_TOKENS, UNKNOWN_POLICIES, CharTokenizer
from .gpt2_ranks import GPT2_PATTERN, GPT2_SPECIAL_TOKENS, gpt2_ranks_path, load_gpt2_ranks

__all__ = [
    "GPT2_PATTERN", "GPT2_SPECIAL_TOKENS", "SPECIAL_TOKENS", "TOKENIZERS", "UNKNOWN_POLICIES", "CharTokenizer",
    "Tokenizer", "TokenizerError", "gpt2_ranks_path", "load_gpt2_ranks", "load_tokenizer", "register",
    "tokenizer_from_dict",
]
