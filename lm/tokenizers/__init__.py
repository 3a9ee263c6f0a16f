"""Tokenizers: text to integer ids and back, all behind one interface (see `base.Tokenizer`).

- `CharTokenizer`: one id per character, with special tokens (`char.py`).
"""

from .base import TOKENIZERS, Tokenizer, TokenizerError, load_tokenizer, register, tokenizer_from_dict
from .char import SPECIAL_TOKENS, UNKNOWN_POLICIES, CharTokenizer

__all__ = [
    "SPECIAL_TOKENS", "TOKENIZERS", "UNKNOWN_POLICIES", "CharTokenizer", "Tokenizer", "TokenizerError",
    "load_tokenizer", "register", "tokenizer_from_dict",
]
