"""Multi-turn chat with a fine-tuned model: `lm chat --ckpt CKPT` in a terminal, `lm.chat.Chat` in Python.

    chat = lm.chat.Chat(model, template="human", config=lm.GenerationConfig(temperature=0.7))
    for piece in chat.ask("What is a KV cache?"):     # streamed as it is generated
        print(piece, end="")
    chat.messages                                     # the conversation so far

Each turn lays the whole conversation out with the chat template the model was fine-tuned with
and generates until the template's end of turn (a blank line or "Human:" for "human", <EOS>
for "special"). When the conversation no longer fits the model's context with room for the
answer, the oldest exchanges are dropped (`Chat.dropped` counts them, and `lm chat` says so).
With a retriever (RAG-lite, `lm.retrieval`), passages retrieved for each question go into a system
message for that turn only.

Terminal commands: /temperature X, /top_p X, /top_k N, /max_new_tokens N, /reset, /help, /quit.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator

import torch

from .generation import Decoder, Generation, GenerationConfig, stream_text
from .instructions import chat_template
from .sampling import SamplingError

HELP = ("commands: /temperature X, /top_p X, /top_k N, /max_new_tokens N (sampling settings), /reset (forget "
        "the conversation), /help, /quit (or Ctrl-D)")
SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int}


class Chat:
    """A conversation with `model`: `ask(text)` streams the reply and keeps both turns."""

    def __init__(self, model, template="human", config: GenerationConfig | None = None, system: str | None = None,
                 retriever=None, rag_k: int = 3, rag_budget: int | None = None):
        if model.tokenizer is None:
            raise ValueError("chat needs the model's tokenizer; load the model with lm.load_model.")
        self.model, self.template = model, chat_template(template)
        self.template.check(model.tokenizer)
        self.config = config or GenerationConfig(max_new_tokens=150, temperature=0.8, top_k=200)
        self.system, self.retriever, self.rag_k = system, retriever, rag_k
        self.rag_budget = rag_budget or model.config.block_size // 2
        self.decoder = Decoder(model)
        self.messages: list[dict] = []
        self.dropped = 0  # exchanges dropped so far to stay within the context

    def reset(self) -> None:
        self.messages, self.dropped = [], 0

    def set(self, name: str, value) -> None:
        """Change one generation setting (checked by GenerationConfig)."""
        self.config = GenerationConfig.build(self.config, **{name: value})

    def _prompt_ids(self, question: str) -> tuple[list[int], int]:
        """The prompt's ids for the conversation plus `question`, and how many of the oldest
        exchanges had to be left out for it to fit with room for max_new_tokens. Without history to
        drop, retrieved context goes next; only then is the prompt cut from the left."""
        tokenizer, block = self.model.tokenizer, self.model.config.block_size
        room = block - min(self.config.max_new_tokens, block // 2)
        question_turn = [{"role": "user", "content": question}]
        context = self.retriever.context(question, self.rag_k, tokenizer, self.rag_budget) if self.retriever else ""

        def head(*parts):
            system = "\n\n".join(p for p in parts if p)
            return [{"role": "system", "content": system}] if system else []

        for dropped in range(len(self.messages) // 2 + 1):
            ids = self.template.encode_prompt(head(context, self.system) + self.messages[2 * dropped:] + question_turn,
                                              tokenizer)
            if len(ids) <= room:
                return ids, dropped
        ids = self.template.encode_prompt(head(self.system) + question_turn, tokenizer)
        return ids[-room:], len(self.messages) // 2

    def ask(self, question: str) -> Iterator[str]:
        """Stream the reply to `question`; when it ends, both turns join `messages`."""
        ids, dropped = self._prompt_ids(question)
        if dropped:
            self.messages = self.messages[2 * dropped:]
            self.dropped += dropped
        tokenizer = self.model.tokenizer
        max_new = min(self.config.max_new_tokens, self.model.config.block_size - len(ids))
        config = GenerationConfig.build(self.config, max_new_tokens=max(1, max_new),
                                        **self.template.generation_options(tokenizer))
        prompt = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        reply = []
        for piece in stream_text(Generation(self.decoder, prompt, config, None)):
            reply.append(piece)
            yield piece
        self.messages += [{"role": "user", "content": question},
                          {"role": "assistant", "content": self.template.cut("".join(reply))}]


def command(chat: Chat, line: str) -> str | None:
    """Carry out a /command; returns what to print (None for /quit)."""
    name, _, value = line[1:].strip().partition(" ")
    if name in ("quit", "exit"):
        return None
    if name == "reset":
        chat.reset()
        return "(conversation reset)"
    if name == "help" or not name:
        return HELP
    if name not in SETTINGS:
        return f"unknown command /{name}; {HELP}"
    try:
        chat.set(name, SETTINGS[name](value))
    except (ValueError, SamplingError) as err:
        return f"/{name} {value!r}: {err}"
    return f"({name} = {getattr(chat.config, name)})"


def run(chat: Chat, read: Callable[[str], str] = input, out=None) -> int:
    """The terminal loop: read a line, answer it streaming, until /quit or end of input."""
    out = out or sys.stdout
    print(f"chatting with the {chat.template.name!r} template; {HELP}", file=out)
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return 0
        if not line:
            continue
        if line.startswith("/"):
            said = command(chat, line)
            if said is None:
                return 0
            print(said, file=out)
            continue
        dropped = chat.dropped
        print("model> ", end="", file=out, flush=True)
        try:
            for piece in chat.ask(line):
                print(piece, end="", file=out, flush=True)
        except ValueError as err:  # e.g. a character the tokenizer cannot encode: say so, keep chatting
            print(f"(error: {err})", end="", file=out)
        print(file=out)
        if chat.dropped > dropped:
            print(f"(the conversation outgrew the {chat.model.config.block_size}-token context: the oldest "
                  f"{chat.dropped - dropped} exchange(s) were dropped)", file=out)


__all__ = ["Chat", "HELP", "command", "run"]
