"""Instruction and chat data: the file formats people write it in, chat templates, and encoding
a conversation into ids with a loss mask.

    examples = lm.load_examples("chat.jsonl")            # any of the formats below, one object per line
    template = lm.chat_template("human")                 # or "special"
    encoded = template.encode(examples[0], tokenizer)    # ids, and which of them are trained on
    x, y = encoded.inputs_and_targets()                  # y is -100 on prompt tokens

Every example becomes a conversation: a list of messages `{"role": "system" | "user" |
"assistant", "content": str}`, the shape the OpenAI chat API uses. The formats (found from the
keys of each line; `format=` can insist on one):

    chat      {"user": ..., "assistant": ...}                          seed 001's chat_history.jsonl
    messages  {"messages": [{"role": ..., "content": ...}, ...]}       multi-turn
    alpaca    {"instruction": ..., "input"/"context": ..., "output"/"response": ...}   Alpaca, Dolly
    qa        {"question": ..., "answer": ...}                          plain Q&A

A few metadata keys may ride along (`METADATA_KEYS`, e.g. Dolly's "category"); any other key is
an error that names the line, so a typo is not silently trained on. An example whose last
assistant message is empty is skipped and counted (`Examples.skipped`).

A chat template turns a conversation into text, marking which parts are the model's own turns.
Only those are trained on (prompt masking); the same template builds the prompt at generation
time, so training, evaluation, chat and serving all see the same layout:

    "human"    Human: {user}\\nAssistant: {assistant}\\n\\n      (seed 001; stops at a blank line)
    "special"  <BOS>{user}<SEP>{assistant}<EOS>                 (seed 000's special tokens; stops at <EOS>)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .registry import Registry

ROLES = ("system", "user", "assistant")
METADATA_KEYS = frozenset({"id", "category", "source", "topic", "split", "timestamp", "model", "metadata"})
FORMATS = {  # name -> (required keys, optional keys)
    "chat": ({"user", "assistant"}, set()),
    "messages": ({"messages"}, set()),
    "alpaca": ({"instruction"}, {"input", "context", "output", "response"}),
    "qa": ({"question", "answer"}, set()),
}
MAX_LINE_BYTES = 1 << 20  # a longer line is refused, not read into memory whole


class DataFormatError(ValueError):
    """An instruction/chat example that cannot be read; the message names the line and the fix."""


# ---- reading examples ------------------------------------------------------------------------
class Examples(list):
    """A list of conversations, with what was skipped on the way (reason -> count)."""

    def __init__(self, conversations=(), skipped: dict[str, int] | None = None, formats: dict[str, int] | None = None):
        super().__init__(conversations)
        self.skipped = dict(skipped or {})
        self.formats = dict(formats or {})

    def __repr__(self) -> str:
        skipped = f", skipped={self.skipped}" if self.skipped else ""
        return f"Examples({len(self)} conversations, formats={self.formats}{skipped})"


def detect_format(record: dict) -> str:
    """Which of FORMATS a record is in, from its keys."""
    keys = set(record) - METADATA_KEYS
    for name, (required, optional) in FORMATS.items():
        if required <= keys and keys <= required | optional:
            return name
    raise DataFormatError(
        f"keys {sorted(keys)} match no format; expected one of: "
        + "; ".join(f"{n}: {sorted(r)}" + (f" (+ optional {sorted(o)})" if o else "") for n, (r, o) in FORMATS.items())
        + f" (metadata keys {sorted(METADATA_KEYS)} are allowed too).")


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: {key!r} must be a string, got {type(value).__name__}.")
    return value


def to_conversation(record: dict, format: str = "auto", where: str = "example") -> list[dict]:
    """One record of any format as a list of messages (role, content)."""
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    try:
        found = detect_format(record)
    except DataFormatError as e:
        raise DataFormatError(f"{where}: {e}") from None
    if format != "auto" and found != format:
        raise DataFormatError(f"{where}: this record is in the {found!r} format, not {format!r}.")
    if found == "chat":
        return [{"role": "user", "content": _text(record, "user", where)},
                {"role": "assistant", "content": _text(record, "assistant", where)}]
    if found == "qa":
        return [{"role": "user", "content": _text(record, "question", where)},
                {"role": "assistant", "content": _text(record, "answer", where)}]
    if found == "alpaca":
        if "input" in record and "context" in record or "output" in record and "response" in record:
            raise DataFormatError(f"{where}: give either 'input' or 'context', and either 'output' or 'response'.")
        instruction = _text(record, "instruction", where).strip()
        context = _text(record, "input" if "input" in record else "context", where).strip()
        answer = _text(record, "output" if "output" in record else "response", where)
        user = f"{instruction}\n\n{context}" if context else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return check_messages(record["messages"], where)


def check_messages(messages, where: str = "messages") -> list[dict]:
    """Messages as a list of {"role", "content"} dicts: roles known, user and assistant taking turns
    after an optional system message."""
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m:
            raise DataFormatError(f"{where}: message {i} must be an object with 'role' and 'content', got {m!r:.80}.")
        if m["role"] not in ROLES:
            raise DataFormatError(f"{where}: message {i} has role {m['role']!r}; roles are {ROLES}.")
        content = m.get("content", "")
        if not isinstance(content, str):
            raise DataFormatError(f"{where}: message {i}'s content must be a string, got {type(content).__name__}.")
        out.append({"role": m["role"], "content": content})
    turns = [m["role"] for m in out if m["role"] != "system"]
    if any(m["role"] == "system" for m in out[1:]):
        raise DataFormatError(f"{where}: a system message may only come first.")
    if any(role != ("user", "assistant")[i % 2] for i, role in enumerate(turns)):
        raise DataFormatError(f"{where}: user and assistant messages must alternate, starting with the user; "
                              f"got {turns}.")
    return out


def _records(source) -> Iterable[tuple[str, object]]:
    """(where, record) pairs from a JSONL file, a JSON list file, or an iterable of records."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise DataFormatError(f"{str(path)!r} does not exist; give a .jsonl file with one example per line.")
        with open(path, "rb") as f:
            head = f.read(1)
            f.seek(0)
            if head == b"[":  # a JSON array of records
                try:
                    records = json.loads(f.read().decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise DataFormatError(f"{path}: not valid JSON ({e}).") from None
                if not isinstance(records, list):
                    raise DataFormatError(f"{path}: expected a list of examples.")
                yield from ((f"{path} item {i}", r) for i, r in enumerate(records))
                return
            for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
                where = f"{path}:{n}"
                if len(raw) > MAX_LINE_BYTES:
                    raise DataFormatError(f"{where}: the line is longer than {MAX_LINE_BYTES} bytes; "
                                          f"is this a JSONL file of examples?")
                if not raw.strip():
                    continue
                try:
                    yield where, json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise DataFormatError(f"{where}: not valid JSON ({e}); each line must be one JSON object.") from None
    else:
        if isinstance(source, dict):
            raise DataFormatError("give a list of examples (or a path), not a single dict.")
        for i, r in enumerate(source):
            yield f"example {i}", r


def load_examples(source, format: str = "auto") -> Examples:
    """Conversations from a JSONL (or JSON list) file, or from an iterable of records or of message
    lists. Examples whose final answer is empty are skipped and counted; anything malformed raises
    a DataFormatError naming the line."""
    if format != "auto" and format not in FORMATS:
        raise DataFormatError(f"format={format!r} is not one of {['auto', *FORMATS]}.")
    conversations, skipped, formats = [], {}, {}
    for where, record in _records(source):
        if isinstance(record, list):  # already a list of messages
            conversation, found = check_messages(record, where), "messages"
        else:
            conversation = to_conversation(record, format, where)
            found = detect_format(record)
        if conversation[-1]["role"] != "assistant":
            raise DataFormatError(f"{where}: the conversation must end with an assistant message to learn from.")
        if not conversation[-1]["content"].strip():
            skipped["empty answer"] = skipped.get("empty answer", 0) + 1
            continue
        formats[found] = formats.get(found, 0) + 1
        conversations.append(conversation)
    return Examples(conversations, skipped, formats)


# ---- templates -------------------------------------------------------------------------------
TEMPLATES = Registry("chat template")


@dataclass(frozen=True)
class Encoded:
    """One conversation as ids, with `trained[i]` True where ids[i] is the model's own turn."""

    ids: list[int]
    trained: list[bool]

    def __len__(self) -> int:
        return len(self.ids)

    def inputs_and_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x = ids[:-1], y = ids[1:] with -100 wherever the target is not a trained token."""
        ids = torch.tensor(self.ids, dtype=torch.long)
        keep = torch.tensor(self.trained[1:], dtype=torch.bool)
        return ids[:-1], torch.where(keep, ids[1:], torch.full_like(ids[1:], -100))


def encode_plain(tokenizer, text: str) -> list[int]:
    """Ids of `text` with any special-token names in it read as ordinary text, so a user cannot
    write "<EOS>" into a message and end a turn."""
    kind = getattr(tokenizer, "kind", None)
    if kind == "char":
        return tokenizer.encode(text, parse_special=False)
    if kind in ("bpe", "tiktoken"):
        return tokenizer.encode(text, allowed_special="none")
    return tokenizer.encode(text)


class ChatTemplate:
    """Lays a conversation out as text pieces, each trained on or not.

    Subclasses implement `pieces(messages)` -> [(text, trained, special)], where `special` marks a
    piece that must be one special token of the tokenizer. `stop` (strings) and `stop_tokens`
    (special-token names) end an assistant turn at generation time."""

    name = ""
    stop: tuple[str, ...] = ()
    stop_tokens: tuple[str, ...] = ()

    def pieces(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool, bool]]:
        raise NotImplementedError

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as one string (what a reader sees; special tokens by name)."""
        return "".join(text for text, _, _ in self.pieces(messages, add_generation_prompt))

    def prompt(self, messages: list[dict]) -> str:
        """The text that asks for the next assistant turn: the conversation so far plus the cue."""
        return self.render(_without_last_answer(messages), add_generation_prompt=True)

    def check(self, tokenizer) -> None:
        """Raise if the tokenizer lacks a special token this template needs."""
        specials = getattr(tokenizer, "special_tokens", {}) or {}
        missing = [s for s in self.special_names() if s not in specials]
        if missing:
            raise DataFormatError(
                f"the {self.name!r} template needs the special tokens {missing}, which this tokenizer "
                f"({type(tokenizer).__name__}) does not have (it has {sorted(specials)}); use template='human', "
                f"or a tokenizer trained with them (e.g. ByteBPETokenizer.train(..., special_tokens=[...])).")

    def special_names(self) -> list[str]:
        return []

    def _encode_pieces(self, pieces, tokenizer) -> Encoded:
        ids, trained = [], []
        specials = getattr(tokenizer, "special_tokens", {}) or {}
        run, run_trained = "", None

        def flush():
            nonlocal run
            if run:
                new = encode_plain(tokenizer, run)
                ids.extend(new)
                trained.extend([run_trained] * len(new))
            run = ""

        for text, is_trained, special in pieces:
            if special:
                flush()
                ids.append(specials[text])
                trained.append(is_trained)
            else:
                if is_trained != run_trained:  # text of one kind is encoded in one go
                    flush()
                run_trained = is_trained
                run += text
        flush()
        return Encoded(ids, trained)

    def encode(self, messages: list[dict], tokenizer) -> Encoded:
        """Ids of the whole conversation, and which are the assistant's (trained on)."""
        self.check(tokenizer)
        return self._encode_pieces(self.pieces(check_messages(messages)), tokenizer)

    def encode_prompt(self, messages: list[dict], tokenizer) -> list[int]:
        """Ids of `prompt(messages)`, encoded exactly as in training (the cue included)."""
        self.check(tokenizer)
        return self._encode_pieces(self.pieces(_without_last_answer(messages), add_generation_prompt=True),
                                   tokenizer).ids

    def generation_options(self, tokenizer) -> dict:
        """Stop settings for GenerationConfig: the template's stop strings, and its stop tokens'
        ids together with the tokenizer's end-of-text id (a prompt of ids does not stop there by
        itself)."""
        specials = getattr(tokenizer, "special_tokens", {}) or {}
        ids = [specials[s] for s in self.stop_tokens]
        eos = getattr(tokenizer, "eos_id", None)
        return {"stop": self.stop, "stop_tokens": tuple(dict.fromkeys(ids + ([eos] if eos is not None else [])))}

    def cut(self, text: str) -> str:
        """A generated answer up to the template's first stop string, without surrounding spaces."""
        for s in self.stop:
            if s in text:
                text = text[: text.index(s)]
        return text.strip()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _without_last_answer(messages: list[dict]) -> list[dict]:
    messages = check_messages(messages) if messages and messages[-1]["role"] == "assistant" else messages
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else list(messages)


@TEMPLATES.register("human")
class HumanAssistantTemplate(ChatTemplate):
    """Seed 001's layout, plain text that any tokenizer can encode:

        {system}\\n\\n              (when there is a system message)
        Human: {user}\\n
        Assistant: {assistant}\\n\\n

    Trained on: " {assistant}\\n\\n" (the blank line is how the model learns to end its turn)."""

    name = "human"
    stop = ("\n\n", "\nHuman:")

    def pieces(self, messages, add_generation_prompt=False):
        out = []
        for m in messages:
            if m["role"] == "system":
                out.append((m["content"].strip() + "\n\n", False, False))
            elif m["role"] == "user":
                out.append((f"Human: {m['content'].strip()}\nAssistant:", False, False))
            else:
                out.append((f" {m['content'].strip()}\n\n", True, False))
        return out


@TEMPLATES.register("special")
class SpecialTokenTemplate(ChatTemplate):
    """Special tokens around each turn (seed 000's `<BOS>`, `<SEP>`, `<EOS>`):

        <BOS>{system}\\n{user}<SEP>{assistant}<EOS><BOS>{user}<SEP>...

    Trained on: "{assistant}<EOS>". The markers are single special ids, so a message that
    contains the text "<EOS>" cannot end a turn. CharTokenizer has these tokens; for a BPE
    tokenizer train it with them (or name others: SpecialTokenTemplate(bos="<|user|>", ...))."""

    name = "special"

    def __init__(self, bos: str = "<BOS>", sep: str = "<SEP>", eos: str = "<EOS>"):
        self.bos, self.sep, self.eos = bos, sep, eos
        self.stop_tokens = (eos,)

    def special_names(self) -> list[str]:
        return [self.bos, self.sep, self.eos]

    def pieces(self, messages, add_generation_prompt=False):
        out, system = [], ""
        for m in messages:
            if m["role"] == "system":
                system = m["content"].strip() + "\n"
            elif m["role"] == "user":
                out += [(self.bos, False, True), (system + m["content"].strip(), False, False), (self.sep, False, True)]
                system = ""
            else:
                out += [(m["content"].strip(), True, False), (self.eos, True, True)]
        return out

    def __repr__(self) -> str:
        return f"SpecialTokenTemplate(bos={self.bos!r}, sep={self.sep!r}, eos={self.eos!r})"


def chat_template(template="human") -> ChatTemplate:
    """A template by name ("human", "special"), or the ChatTemplate given."""
    if isinstance(template, ChatTemplate):
        return template
    try:
        return TEMPLATES.get(template)()
    except Exception as e:  # RegistryError names the known ones
        raise DataFormatError(str(e)) from None


__all__ = [
    "ChatTemplate", "DataFormatError", "Encoded", "Examples", "FORMATS", "HumanAssistantTemplate", "METADATA_KEYS",
    "ROLES", "SpecialTokenTemplate", "TEMPLATES", "chat_template", "check_messages", "detect_format", "encode_plain",
    "load_examples", "to_conversation",
]
