"""The tokenizers `lm prep` builds by name, and how it encodes a corpus's documents with them."""

from __future__ import annotations

from ..data import pack_documents
from .bpe import ByteBPETokenizer
from .char import CharTokenizer
from .sentencepiece import SentencePieceTokenizer
from .tiktoken_gpt2 import TiktokenTokenizer

PREP_TOKENIZERS = ("char", "sentencepiece", "gpt2", "bpe")
VOCAB_DEFAULTS = {"sentencepiece": 8000, "bpe": 1024}  # the tokenizers trained on the corpus


def prep_tokenize(documents, name: str, vocab_size: int | None = None, separator: bool = True):
    """Build the tokenizer `name` (one of PREP_TOKENIZERS) on `documents` (a list of str, or one str),
    encode each document on its own and pack them: doc 1, sep, doc 2, sep, ..., doc n.

    The separator is the tokenizer's end-of-text id (`eos_id`); with `separator=False` the documents
    follow each other directly, so one document gives exactly the ids of its whole text. Special
    tokens written in a corpus stay ordinary text: a corpus is data, not a template.
    Returns the tokenizer, the ids (an int64 array) and the separator's id (None without one).
    """
    documents = [documents] if isinstance(documents, str) else list(documents)
    vocab_size = vocab_size if vocab_size is not None else VOCAB_DEFAULTS.get(name)
    if name == "char":  # the vocabulary: every character of every document
        tokenizer = CharTokenizer.train("".join(documents))
        encode = lambda doc: tokenizer.encode(doc, parse_special=False)  # noqa: E731
    elif name == "sentencepiece":  # one sentence per line, as for a single text
        tokenizer = SentencePieceTokenizer.train("\n".join(documents), vocab_size)
        encode = tokenizer.encode
    elif name == "gpt2":
        tokenizer = TiktokenTokenizer("gpt2")
        encode = lambda doc: tokenizer.encode(doc, allowed_special="none")  # noqa: E731
    elif name == "bpe":  # no merge spans two documents
        tokenizer = ByteBPETokenizer.train(documents, vocab_size, special_tokens=("<|endoftext|>",))
        encode = lambda doc: tokenizer.encode(doc, allowed_special="none")  # noqa: E731
    else:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {PREP_TOKENIZERS}.")
    separator_id = tokenizer.eos_id if separator else None
    if separator and separator_id is None:
        raise ValueError(f"the {name} tokenizer has no end-of-text token to put between documents; "
                         f"pass --no_separator.")
    return tokenizer, pack_documents((encode(doc) for doc in documents), separator_id), separator_id
