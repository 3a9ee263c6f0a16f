"""The generation loop behind `GPT.generate` and `GPT.stream`.

    prompt ids -> [model over the prompt] -> logits of the last position -> choose a token
               -> append it -> [model over that one token, with the KV cache] -> ...

One `Generation` holds the state of one call: the token buffer (preallocated for prompt plus
max_new_tokens), the padding mask of batched prompts, the KV cache, which rows have stopped, and
the log-probabilities of the chosen tokens. `steps()` advances one token at a time, so `generate`
runs it to the end and `stream` yields text as it goes.

On CUDA the one-token steps replay a CUDA graph (`lm.cuda_graph`) unless `cuda_graph=False`; the
loop itself never waits for the GPU unless something must be read back (stop tokens or strings,
streaming), so Python can queue the next step while the GPU runs this one.
"""

from __future__ import annotations

import torch

from .cuda_graph import decoder_for, graph_unsupported
from .kv_cache import KVCache
from .sampling import SamplingConfig, SamplingError, choose_next


class IncrementalText:
    """The text of a growing list of token ids, decoding only the last few tokens per update.

    Re-decoding all ids at every step costs O(n) per token, O(n^2) per generation. Instead keep two
    marks: `prefix` (where the last decoded piece started) and `read` (how far text was taken). The
    new text is decode(ids[prefix:]) minus decode(ids[prefix:read]): decoding from a token boundary
    a little before the new ids keeps what tokenizers do at the start of a text (SentencePiece drops
    a leading space) out of the difference. A piece that ends in U+FFFD is an incomplete UTF-8
    character (its remaining bytes are in tokens still to come) and waits."""

    def __init__(self, tokenizer):
        self.tokenizer, self.text, self.prefix, self.read = tokenizer, "", 0, 0

    def update(self, ids: list[int]) -> str:
        """`ids`: all ids so far (the earlier ones unchanged); returns the text they add."""
        before = self.tokenizer.decode(ids[self.prefix:self.read])
        now = self.tokenizer.decode(ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        piece = now[len(before):]
        self.text += piece
        self.prefix, self.read = self.read, len(ids)
        return piece


def showable(pending: str, stops: list[str]) -> int:
    """How many leading characters of `pending` (text not shown yet) a stream may show now:
    everything before a stop string, and never an ending that could still grow into one."""
    hits = [pending.find(s) for s in stops if s in pending]
    if hits:
        return min(hits)
    for k in range(min(len(pending), max(map(len, stops), default=1) - 1), 0, -1):
        if any(s.startswith(pending[-k:]) for s in stops):
            return len(pending) - k
    return len(pending)


def stream_text(run: "Generation"):
    """Yield the text of row 0 of `run` piece by piece as its steps run (see `GPT.stream`)."""
    text, shown = IncrementalText(run.tokenizer), 0
    for _ in run.steps():
        text.update(run.new_ids(0))
        ready = shown + showable(text.text[shown:], run.stop_strings)
        if ready > shown:
            yield text.text[shown:ready]
            shown = ready
    final = run.texts()[0]  # decoded whole and cut at a stop string, as generate returns it
    if len(final) > shown:
        yield final[shown:]


class Generation:
    def __init__(self, model, prompt, *, max_new_tokens: int = 100, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, seed: int | None = None,
                 stop_at_eos: bool = True, stop=None, stop_tokens=None, use_cache: bool = True,
                 attention_mask: torch.Tensor | None = None, cuda_graph: bool | None = None, compile: bool = False):
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise SamplingError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer.")
        self.model, self.max_new_tokens, self.use_cache = model, max_new_tokens, use_cache
        self.config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                     repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
        self.tokenizer = model.tokenizer
        self.kind = "ids" if isinstance(prompt, torch.Tensor) else "texts" if isinstance(prompt, (list, tuple)) else "text"
        rows, mask = self._prompt_ids(prompt, attention_mask)
        B, T0 = rows.shape
        device = model.device
        self.ids = torch.full((B, T0 + max_new_tokens), self._pad_id(), dtype=torch.long, device=device)
        self.ids[:, :T0] = rows.to(device)
        self.mask = None
        if mask is not None and not bool(mask.all()):
            self.mask = torch.ones(B, T0 + max_new_tokens, dtype=torch.bool, device=device)
            self.mask[:, :T0] = mask.to(device).bool()
        self.start = self.length = T0
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.logprobs: list[torch.Tensor] = []
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        stop_ids = set(int(i) for i in (stop_tokens or []))
        eos = getattr(self.tokenizer, "eos_id", None)
        if self.kind != "ids" and stop_at_eos and eos is not None:
            stop_ids.add(eos)
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        self.stop_strings = [stop] if isinstance(stop, str) else list(stop or [])
        if self.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the text; pass stop_tokens (ids) instead.")
        self.cache = None
        self.cuda_graph, self.compile, self.graph = self._use_graph(cuda_graph, compile), compile, None
        self.stop_texts = [IncrementalText(self.tokenizer) for _ in range(B)] if self.stop_strings else None

    def _use_graph(self, cuda_graph, compile) -> bool:
        """None: on CUDA whenever the model allows it. True: always (a clear error where it cannot)."""
        reason = graph_unsupported(self.model) if self.use_cache else "use_cache=False decodes without a cache"
        if cuda_graph and reason is not None:
            raise ValueError(f"cuda_graph=True: {reason}; pass cuda_graph=None to choose automatically.")
        if compile and not (cuda_graph or cuda_graph is None and reason is None):
            raise ValueError(f"compile=True compiles the CUDA-graph decoding step, which is off here "
                             f"({reason or 'cuda_graph=False'}).")
        return reason is None if cuda_graph is None else bool(cuda_graph)

    # ---- prompt --------------------------------------------------------------------------------
    def _prompt_ids(self, prompt, attention_mask):
        if self.kind == "ids":
            if prompt.dim() != 2 or prompt.size(1) == 0:
                raise ValueError("prompt must be a str, a list of str, or a non-empty (B, T) tensor of token ids.")
            return prompt.long(), attention_mask
        texts = [prompt] if self.kind == "text" else list(prompt)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("prompt must be a str, a non-empty list of str, or a (B, T) tensor of token ids.")
        if self.tokenizer is None:
            raise ValueError("generate() got a text prompt but the model has no tokenizer; "
                             "set model.tokenizer = ... or pass a (B, T) tensor of ids.")
        encoded = [self.tokenizer.encode(t) or [self._start_id()] for t in texts]
        T = max(len(e) for e in encoded)
        rows = torch.full((len(encoded), T), self._pad_id(), dtype=torch.long)
        mask = torch.zeros(len(encoded), T, dtype=torch.bool)
        for i, e in enumerate(encoded):  # left padding: every row's last token is at the same place
            rows[i, T - len(e):] = torch.tensor(e)
            mask[i, T - len(e):] = True
        return rows, mask

    def _start_id(self) -> int:
        """An empty prompt starts from <BOS>, or from GPT-2's <|endoftext|> where there is no BOS."""
        for i in (getattr(self.tokenizer, "bos_id", None), getattr(self.tokenizer, "eos_id", None)):
            if i is not None:
                return i
        raise ValueError("the prompt is empty and the tokenizer has no BOS or EOS token to start from; "
                         "give a non-empty prompt.")

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for i in (getattr(tok, "pad_id", None), getattr(tok, "eos_id", None)):
            if i is not None:
                return i
        return 0

    # ---- the loop ------------------------------------------------------------------------------
    def _logits(self) -> torch.Tensor:
        model, L, block = self.model, self.length, self.model.config.block_size
        mask = self.mask
        if not self.use_cache:
            lo = max(0, L - block)
            return model(self.ids[:, lo:L], attention_mask=None if mask is None else mask[:, lo:L])[0]
        if self.cache is None and self.cuda_graph:
            self.cache, self.graph = decoder_for(model, self.ids.size(0), block, self.compile)
        elif self.cache is None:
            self.cache = KVCache(model, self.ids.size(0), max_len=block)
        cache = self.cache
        if cache.length == 0 or cache.length + 1 > block:  # prefill, or the cache is full: start afresh
            keep = min(L, block) if cache.length == 0 else (3 * block) // 4
            cache.reset()
            return model(self.ids[:, L - keep:L], attention_mask=None if mask is None else mask[:, L - keep:L],
                         cache=cache)[0]
        if self.cuda_graph:  # the prompt's padding is in the cache's mask already; new tokens are real
            return self.graph(self.ids[:, L - 1:L])
        return model(self.ids[:, L - 1:L], attention_mask=None if mask is None else mask[:, :L], cache=cache)[0]

    def steps(self):
        """Generate one token per iteration (all rows at once) until done; yields the step number."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            for step in range(self.max_new_tokens):
                logits = self._logits()[:, -1, :]
                L = self.length
                history_mask = None if self.mask is None else self.mask[:, :L]
                next_ids, logp = choose_next(logits, self.ids[:, :L], self.config, self.generator, mask=history_mask)
                next_ids = next_ids.squeeze(1).masked_fill(self.finished, self._pad_id())
                self.ids[:, L] = next_ids
                self.logprobs.append(logp.squeeze(1).masked_fill(self.finished, 0.0))
                self.length = L + 1
                if self.stop_ids.numel():
                    self.finished |= torch.isin(next_ids, self.stop_ids)
                if self.stop_strings:
                    self._check_stop_strings()
                yield step
                # reading `finished` waits for the GPU: only when something can stop a row early
                if (self.stop_ids.numel() or self.stop_strings) and bool(self.finished.all()):
                    break
        finally:
            model.train(was_training)

    def _check_stop_strings(self) -> None:
        """Stop a row once its text holds a stop string; only the newly decoded end is searched."""
        longest = max(len(s) for s in self.stop_strings)
        for row, text in enumerate(self.stop_texts):
            piece = text.update(self.new_ids(row))
            tail = text.text[-(len(piece) + longest - 1):] if piece else ""
            if any(s in tail for s in self.stop_strings):
                self.finished[row] = True

    # ---- results -------------------------------------------------------------------------------
    def new_ids(self, row: int) -> list[int]:
        """The tokens generated for `row`, up to (not including) a stop token."""
        ids = self.ids[row, self.start:self.length].tolist()
        stops = set(self.stop_ids.tolist())
        for i, t in enumerate(ids):
            if t in stops:
                return ids[:i]
        return ids

    def texts(self, cut: bool = True) -> list[str]:
        out = []
        for row in range(self.ids.size(0)):
            text = self.tokenizer.decode(self.new_ids(row))
            if cut:
                hits = [text.index(s) for s in self.stop_strings if s in text]
                text = text[: min(hits)] if hits else text
            out.append(text)
        return out

    def result(self, return_logprobs: bool = False):
        logprobs = torch.stack(self.logprobs, dim=1) if self.logprobs else torch.zeros(self.ids.size(0), 0)
        if self.kind == "ids":
            out = self.ids[:, :self.length]
            return (out, logprobs) if return_logprobs else out
        texts = self.texts()
        per_row = [logprobs[row, : len(self.new_ids(row))].tolist() for row in range(len(texts))]
        if self.kind == "text":
            return (texts[0], per_row[0]) if return_logprobs else texts[0]
        return (texts, per_row) if return_logprobs else texts
