"""Continuous batching (lm/serving.py): the engine gives every request exactly what
`model.generate` gives it alone, for every attention variant, while requests join and leave the
batch; the slot cache's per-row positions; stops, streaming, cancelling, bad prompts, a full
waiting line, and a failing step that fails only its own requests."""

from __future__ import annotations

import queue
import threading
import types

import pytest
import torch

import lm
from lm import GenerationConfig, ModelConfig
from lm.serving import Engine, EngineBusy, SlotCache

from helpers import sharp_model

TOKENIZER = lm.CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,!?\n")
WAIT = 60  # seconds before a request that never finishes fails the test (instead of hanging it)

VARIANTS = {
    "sdpa": dict(),
    "llama-like": dict(pos="rope", norm="rmsnorm", ffn="swiglu", bias=False, n_kv_heads=2),
    "sliding_window": dict(attention="sliding_window", window=5),
    "block_sparse": dict(attention="block_sparse", sparse_block=4, sparse_local=1, sparse_stride=2),
    "linear": dict(attention="linear"),
}


def build(name: str = "sdpa", block_size: int = 64) -> lm.GPT:
    torch.manual_seed(0)
    options = VARIANTS[name] if name in VARIANTS else dict(pos=name)  # a variant, or a kind of positions
    config = ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=block_size, n_layer=2, n_head=4, d_model=32,
                         **options)
    model = sharp_model(config)
    model.tokenizer = TOKENIZER
    return model


@pytest.fixture
def engines():
    """make(model, **options) -> Engine; every engine made is closed after the test."""
    made = []

    def make(model, **options):
        made.append(Engine(model, **options))
        return made[-1]

    yield make
    for engine in made:
        engine.close()


def drain(events: queue.Queue) -> tuple[list[str], lm.serving.Result]:
    """The text pieces of a request that reports into `events`, and its result."""
    pieces = []
    while True:
        kind, value = events.get(timeout=WAIT)
        if kind == "text":
            pieces.append(value)
        else:
            return pieces, value


def submit(engine, ids, config):
    events = queue.Queue()
    return engine.submit(ids, config, notify=events.put), events


class Gate:
    """A notify callback that holds the engine's thread at its request's first event until
    `open()`: whatever is submitted meanwhile waits, and joins the batch when slots free."""

    def __init__(self):
        self.events, self.entered, self.opened = queue.Queue(), threading.Event(), threading.Event()

    def __call__(self, event):
        self.entered.set()
        self.opened.wait(WAIT)
        self.events.put(event)

    def open(self):
        self.opened.set()


def run_together(engine, prompts, configs):
    """Submit all requests at once (held at the first one's first token); [(pieces, result, request)]."""
    gate = Gate()
    requests = [engine.submit(prompts[0], configs[0], notify=gate)]
    queues = [gate.events]
    for ids, config in zip(prompts[1:], configs[1:]):
        request, events = submit(engine, ids, config)
        requests.append(request)
        queues.append(events)
    gate.open()
    return [(*drain(events), request) for events, request in zip(queues, requests)]


def reference(model, ids, config) -> list[int]:
    """The new ids `model.generate` gives the prompt alone (a prompt of ids stops at no EOS)."""
    return model.generate(torch.tensor([ids]), config)[0, len(ids):].tolist()


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TOKENIZER.vocab_size, (n,), generator=g).tolist() for n in lengths]


# ---- the engine gives what generate gives ----------------------------------------------------------
LENGTHS = (1, 4, 9, 2, 17, 6, 30)


def configs_for(sampling: str) -> list[GenerationConfig]:
    out = []
    for i, n in enumerate(LENGTHS):
        new = min(8 + 5 * i, 64 - n)
        if sampling == "greedy":
            out.append(GenerationConfig(max_new_tokens=new, temperature=0, stop_at_eos=False))
        else:  # each request its own seed and settings, in the same batch: a greedy one, a penalty, top-k
            options = dict(temperature=0.9, seed=100 + i, top_k=10 if i % 2 else None)
            if i == 3:
                options = dict(temperature=0)
            if i == 5:
                options["repetition_penalty"] = 1.3
            out.append(GenerationConfig(max_new_tokens=new, stop_at_eos=False, **options))
    return out


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
@pytest.mark.parametrize("name", VARIANTS)
def test_batched_requests_get_what_generate_gives_each_alone(name, sampling, engines):
    model = build(name)
    engine = engines(model, max_batch=3)  # 7 requests through 3 slots: they join and leave mid-way
    prompts, configs = prompts_of(LENGTHS), configs_for(sampling)
    expected = [reference(model, ids, config) for ids, config in zip(prompts, configs)]
    done = run_together(engine, prompts, configs)
    for (pieces, result, request), want, config in zip(done, expected, configs):
        assert request.new_ids == want
        assert result.finish_reason == "length" and result.completion_tokens == config.max_new_tokens
        assert result.text == TOKENIZER.decode(want) == "".join(pieces)
    assert len({tuple(r.new_ids) for _, _, r in done}) == len(done)  # not one degenerate answer
    stats = engine.stats()
    assert stats["active"] == stats["waiting"] == 0 and stats["requests"] == len(LENGTHS)
    assert stats["tokens"] == sum(c.max_new_tokens for c in configs)
    if name == "linear":  # a running state per sequence, no keys: one request at a time
        assert stats["batched"] is False and stats["mean_batch"] == 1.0
    else:
        assert stats["batched"] is True and stats["mean_batch"] > 1


class Replayed:
    """Stands in for a CUDA graph on a CPU: `replay()` runs the captured step again into the same
    output buffer, so the engine's graphed path (static shapes, buckets, spare rows) runs as on a GPU."""

    captured: list = []

    def __init__(self, step, warmup=2, restore=(), pool=None):
        self.step = step
        self.out = step()
        Replayed.captured.append(self)

    def replay(self):
        self.out.copy_(self.step())

    @classmethod
    def capture(cls, step, warmup=2, restore=(), pool=None):
        graph = cls(step)
        return graph, graph.out


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "linear"])
def test_the_graphed_step_gives_what_generate_gives(name, engines, monkeypatch):
    """The step a GPU replays as a CUDA graph: positions read from a device buffer, every row's keys
    over the whole room under a mask, batches padded to a power of two with spare rows. Run here with
    the graph replaced by running the captured step again; tests/test_cuda_graph.py runs real graphs."""
    monkeypatch.setattr(lm.serving, "graph_unsupported", lambda model: None)
    monkeypatch.setattr(lm.serving, "capture", Replayed.capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    Replayed.captured = []
    model = build(name, block_size=300)
    engine = engines(model, max_batch=4, cuda_graph=True)  # 7 requests, buckets of 1, 2 and 4 rows
    lengths = (1, 4, 250, 9, 2, 17, 6)  # the third grows the slot cache past 256 positions
    prompts = prompts_of(lengths)
    configs = [GenerationConfig(max_new_tokens=12 + 3 * i, temperature=0, stop_at_eos=False) for i in range(7)]
    expected = [reference(model, ids, config) for ids, config in zip(prompts, configs)]
    done = run_together(engine, prompts, configs)
    assert [r.new_ids for _, _, r in done] == expected
    assert engine.cache.room == 300 and engine.stats()["mean_batch"] > 1
    assert set(engine.graphs) <= {1, 2, 4} and 4 in engine.graphs
    assert len(Replayed.captured) > len(engine.graphs)  # the growth made new graphs for the new buffers


def test_max_batch_one_serves_one_request_at_a_time_with_the_same_output(engines):
    model = build("sdpa")
    engine = engines(model, max_batch=1)
    prompts, configs = prompts_of(LENGTHS[:4]), configs_for("seeded")[:4]
    done = run_together(engine, prompts, configs)
    assert [r.new_ids for _, _, r in done] == [reference(model, p, c) for p, c in zip(prompts, configs)]
    assert engine.stats()["batched"] is False and engine.stats()["mean_batch"] == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("max_batch", [1, 3])
def test_seeded_requests_on_a_gpu_draw_what_generate_draws(engines, max_batch):
    """On a GPU generate draws with lm.fused_sampling's kernels, seeded by the config's seed; so does
    each seeded request, batched (its own Draw) or alone (through lm.Decoder, with its seed)."""
    model = build("sdpa").cuda()
    engine = engines(model, max_batch=max_batch)
    prompts, configs = prompts_of(LENGTHS[:5]), configs_for("seeded")[:5]
    done = run_together(engine, prompts, configs)
    assert [r.new_ids for _, _, r in done] == [reference(model, p, c) for p, c in zip(prompts, configs)]
    assert all(r.draw is not None for _, _, r in done if r.config.seed is not None and r.sampling.temperature > 0)


def test_engine_generate_waits_for_the_result(engines):
    model = build("sdpa")
    engine = engines(model, max_batch=4)
    ids = TOKENIZER.encode("the cat")
    result = engine.generate(ids, GenerationConfig(max_new_tokens=12, temperature=0))
    assert result.text == model.generate("the cat", max_new_tokens=12, temperature=0)
    assert result.prompt_tokens == len(ids) and 0 <= result.queued_s <= result.total_s


# ---- the slot cache ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "linear"] + ["sinusoidal"])
def test_slot_cache_rows_at_different_positions_give_the_full_forward_logits(name):
    model = build(name).double()  # float64: the two ways round alike to far below any tolerance
    lengths = (5, 12, 23)
    rows = prompts_of(lengths, seed=2)
    cache = SlotCache(model, slots=4)

    def full(ids):  # the plain forward's scores of the next token
        return model(torch.tensor([ids]))[0][0, -1]

    with torch.no_grad():
        for row, ids in enumerate(rows):  # prefills, one row each
            cache.use(row, 1)
            logits = model(torch.tensor([ids]), cache=cache)[0][0, -1]
            torch.testing.assert_close(logits, full(ids))
        assert cache.lengths == [5, 12, 23, 0]
        for step in range(3):  # every row decodes one token at its own position
            new = torch.randint(0, TOKENIZER.vocab_size, (3,)).tolist()
            rows = [ids + [t] for ids, t in zip(rows, new)]
            cache.use(0, 3)
            logits = model(torch.tensor(new)[:, None], cache=cache)[0][:, -1]
            torch.testing.assert_close(logits, torch.stack([full(ids) for ids in rows]))
        assert cache.lengths == [8, 15, 26, 0]
        cache.move(2, 0)  # row 0 leaves; the last row takes its place
        rows = [rows[2], rows[1]]
        assert cache.lengths == [26, 15, 0, 0]
        new = [3, 7]
        rows = [ids + [t] for ids, t in zip(rows, new)]
        cache.use(0, 2)
        logits = model(torch.tensor(new)[:, None], cache=cache)[0][:, -1]
        torch.testing.assert_close(logits, torch.stack([full(ids) for ids in rows]))


def test_slot_cache_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="max_batch=1"):
        SlotCache(build("linear"), slots=2)
    model = build("sdpa", block_size=16)
    cache = SlotCache(model, slots=2)
    with torch.no_grad():
        cache.use(0, 1)
        with pytest.raises(ValueError, match="attention_mask"):
            model(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 3, dtype=torch.bool), cache=cache)
        model(torch.ones(1, 15, dtype=torch.long), cache=cache)
        with pytest.raises(RuntimeError, match="a slot holds 16 positions; 15 are filled and 2 more"):
            model(torch.ones(1, 2, dtype=torch.long), cache=cache)
        cache.use(0, 2)
        with pytest.raises(ValueError, match="one row"):
            model(torch.ones(2, 2, dtype=torch.long), cache=cache)


def kv_bytes(cache: SlotCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.k, layer.v))


def test_slot_cache_grows_with_the_longest_row_and_keeps_what_it_holds():
    """The buffers start with `room` positions per slot and double as the longest row grows (up to
    block_size); rows keep their keys and values across the growth."""
    model = build("llama-like").double()
    cache = SlotCache(model, slots=3, room=8)
    per_position = 2 * 2 * 3 * 2 * 8 * 8  # layers, k and v, slots, kv heads, head dim, float64
    assert kv_bytes(cache) == cache.nbytes() == 8 * per_position
    rows = prompts_of((5, 7), seed=3)
    with torch.no_grad():
        for row, ids in enumerate(rows):
            cache.use(row, 1)
            model(torch.tensor([ids]), cache=cache)
        for step in range(12):  # the longer row passes 8 (room 16), then 16 (room 32)
            new = torch.randint(0, TOKENIZER.vocab_size, (2,)).tolist()
            rows = [ids + [t] for ids, t in zip(rows, new)]
            cache.use(0, 2)
            logits = model(torch.tensor(new)[:, None], cache=cache)[0][:, -1]
            torch.testing.assert_close(logits, torch.stack([model(torch.tensor([ids]))[0][0, -1] for ids in rows]))
    assert cache.lengths == [17, 19, 0] and cache.nbytes() == 32 * per_position
    big = build("sdpa", block_size=8192)
    engine = Engine(big, max_batch=16)
    try:  # 256 positions per slot to start with, not 8192
        assert engine.cache.nbytes() == 256 * 2 * 2 * 16 * 4 * 8 * 4
    finally:
        engine.close()


# ---- stopping and streaming --------------------------------------------------------------------------
PROMPT = "the cat sat on"


def test_request_text_decodes_each_token_a_bounded_number_of_times():
    """A request's streamed text and its stop strings must not re-decode everything per token
    (O(n^2)). n bytes 0xFF never form a character, the worst case for waiting on one; counted are
    the ids decoded, not seconds."""
    tok = lm.ByteBPETokenizer.train("abc abc", vocab_size=256 + 1, special_tokens=("<|endoftext|>",))
    decoded = [0]
    inner = tok.decode_bytes

    def decode_bytes(ids):
        ids = list(ids)
        decoded[0] += len(ids)
        return inner(ids)

    tok.decode_bytes = decode_bytes
    n = 300
    model = types.SimpleNamespace(tokenizer=tok, device=torch.device("cpu"))
    engine = types.SimpleNamespace(max_len=n + 8, model=model)  # what a Request reads of its engine
    events = []
    request = lm.serving.Request(engine, [65], GenerationConfig(max_new_tokens=n, stop=["zz"]), notify=events.append)
    done = [request.add(255) for _ in range(n)]
    assert done == [False] * (n - 1) + [True] and request.result.text == "\ufffd" * n
    assert [e[1] for e in events[:-1]] == ["\ufffd"] * n  # each shown as it comes
    assert decoded[0] <= 3 * n  # each token once, then the whole text once; before: about n^2 / 2


def test_a_stop_string_ends_the_text_before_it_as_generate_does(engines):
    model = build("sdpa")
    engine = engines(model, max_batch=4)
    full = model.generate(PROMPT, max_new_tokens=40, temperature=0)
    assert len(full) >= 16, full
    stop = full[10:12]
    expected = model.generate(PROMPT, max_new_tokens=40, temperature=0, stop=[stop])
    assert len(expected) < 12
    pieces, result = drain(submit(engine, TOKENIZER.encode(PROMPT),
                                  GenerationConfig(max_new_tokens=40, temperature=0, stop=("zzz", stop)))[1])
    assert result.finish_reason == "stop" and result.text == expected == "".join(pieces)
    assert not any(stop in piece for piece in pieces)


def test_a_stop_token_ends_the_request_without_it(engines):
    model = build("sdpa")
    engine = engines(model, max_batch=4)
    ids = TOKENIZER.encode(PROMPT)
    config = GenerationConfig(max_new_tokens=30, temperature=0, stop_at_eos=False)
    full = reference(model, ids, config)
    token = full[6]
    k = full.index(token)
    pieces, result = drain(submit(engine, ids, GenerationConfig.build(config, stop_tokens=(token,)))[1])
    assert result.finish_reason == "stop" and result.completion_tokens == k
    assert result.text == TOKENIZER.decode(full[:k]) == "".join(pieces)


def test_max_new_tokens_and_a_full_context_end_with_length(engines):
    model = build("sdpa")
    engine = engines(model, max_batch=4)
    ids = TOKENIZER.encode(PROMPT)
    pieces, result = drain(submit(engine, ids, GenerationConfig(max_new_tokens=7, temperature=0, stop_at_eos=False))[1])
    assert (result.finish_reason, result.completion_tokens) == ("length", 7)
    assert result.prompt_tokens == len(ids) and "".join(pieces) == result.text and len(result.text) == 7
    long = prompts_of([60])[0]  # 4 positions left in a context of 64
    config = GenerationConfig(max_new_tokens=100, temperature=0, stop_at_eos=False)
    pieces, result = drain(submit(engine, long, config)[1])
    assert (result.finish_reason, result.completion_tokens) == ("length", 4)
    assert result.text == TOKENIZER.decode(reference(model, long, GenerationConfig(max_new_tokens=4, temperature=0)))
    pieces, result = drain(submit(engine, ids, GenerationConfig(max_new_tokens=0))[1])
    assert (result.finish_reason, result.completion_tokens, result.text, pieces) == ("length", 0, "", [])


def test_iterating_a_request_streams_its_text(engines):
    model = build("sdpa")
    engine = engines(model, max_batch=4)
    config = GenerationConfig(max_new_tokens=20, temperature=0, stop=["\n"])
    request = engine.submit(TOKENIZER.encode(PROMPT), config)
    pieces = list(request)
    assert "".join(pieces) == request.result.text == model.generate(PROMPT, config)
    with pytest.raises(RuntimeError, match="notify"):
        list(submit(engine, [1, 2], config)[0])


# ---- cancelling -----------------------------------------------------------------------------------
@pytest.mark.parametrize("max_batch", [1, 2])
def test_cancel_frees_the_slot_and_the_others_finish_correctly(max_batch, engines):
    model = build("sdpa")
    engine = engines(model, max_batch=max_batch)
    prompts = prompts_of((3, 8, 5))
    config = GenerationConfig(max_new_tokens=30, temperature=0, stop_at_eos=False)
    expected = [reference(model, ids, config) for ids in prompts]
    seen, cancelled, count = queue.Queue(), {}, []

    def leave_after_two_pieces(event):  # the client goes away after reading two pieces
        seen.put(event)
        count.append(event)
        if len(count) == 2:
            cancelled["request"].cancel()

    gate = Gate()
    first = engine.submit(prompts[1], config, notify=gate)
    cancelled["request"] = engine.submit(prompts[0], config, notify=leave_after_two_pieces)
    others = [submit(engine, prompts[2], config)]
    gate.open()
    pieces, result = drain(seen)
    assert result.finish_reason == "cancelled" and result.completion_tokens == 2
    assert result.text == TOKENIZER.decode(expected[0][:2]) == "".join(pieces)
    assert drain(gate.events)[1].finish_reason == "length" and first.new_ids == expected[1]
    request, events = others[0]
    assert drain(events)[1].finish_reason == "length" and request.new_ids == expected[2]
    assert engine.stats()["active"] == 0 and engine.stats()["requests"] == 3
    first.cancel()  # cancelling a finished request changes nothing
    assert first.result.finish_reason == "length"


def test_a_request_cancelled_while_waiting_never_runs(engines):
    model = build("sdpa")
    engine = engines(model, max_batch=2)
    gate = Gate()
    engine.submit([1, 2, 3], GenerationConfig(max_new_tokens=5, temperature=0), notify=gate)
    assert gate.entered.wait(WAIT)
    request, events = submit(engine, [4, 5], GenerationConfig(max_new_tokens=5, temperature=0))
    request.cancel()
    gate.open()
    assert drain(events) == ([], request.result)
    assert (request.result.finish_reason, request.result.completion_tokens) == ("cancelled", 0)


@pytest.mark.parametrize("max_batch", [1, 2])
def test_close_cancels_what_is_running_and_waiting(max_batch):
    model = build("sdpa")
    engine = Engine(model, max_batch=max_batch)
    gate = Gate()
    config = GenerationConfig(max_new_tokens=50, stop_at_eos=False)
    running = engine.submit([1, 2, 3], config, notify=gate)
    assert gate.entered.wait(WAIT)
    request, events = submit(engine, [4, 5], config)
    closing = threading.Thread(target=engine.close)
    closing.start()
    gate.open()
    closing.join(WAIT)
    assert drain(events)[1].finish_reason == "cancelled"
    assert drain(gate.events)[1].finish_reason == "cancelled" and running.result.completion_tokens < 50
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([1], GenerationConfig())


# ---- refusals -------------------------------------------------------------------------------------
def test_bad_prompts_are_refused_with_clear_messages(engines):
    engine = engines(build("sdpa"), max_batch=2)
    V = TOKENIZER.vocab_size
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.submit([], GenerationConfig())
    with pytest.raises(ValueError, match="the prompt has 64 tokens and the model's context holds 64; shorten it "
                                         "to at most 63"):
        engine.submit([1] * 64, GenerationConfig())
    with pytest.raises(ValueError, match=rf"token ids must be in 0..{V - 1}; got 1..{V}"):
        engine.submit([1, V], GenerationConfig())
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.submit([-1, 2], GenerationConfig())
    assert engine.generate([1] * 63, GenerationConfig(max_new_tokens=5, temperature=0)).completion_tokens == 1
    assert engine.stats()["requests"] == 1  # the refused ones were never queued


def test_engine_settings_are_checked():
    model = build("sdpa")
    with pytest.raises(ValueError, match="max_batch=0"):
        Engine(model, max_batch=0)
    with pytest.raises(ValueError, match="CUDA graphs: CUDA graphs need the model on a CUDA device.*cuda_graph=False"):
        Engine(model, max_batch=2, cuda_graph=True)
    model.tokenizer = None
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model)


def test_a_full_waiting_line_raises_engine_busy(engines):
    engine = engines(build("sdpa"), max_batch=1, max_waiting=1)
    config = GenerationConfig(max_new_tokens=3, stop_at_eos=False)
    gate = Gate()
    engine.submit([1, 2, 3], config, notify=gate)
    assert gate.entered.wait(WAIT)  # running (held), so no longer waiting
    waiting, events = submit(engine, [4, 5], config)
    with pytest.raises(EngineBusy, match=r"1 requests are waiting already \(max_waiting=1\)"):
        engine.submit([6], config)
    gate.open()
    assert drain(gate.events)[1].finish_reason == "length"
    assert drain(events)[1].finish_reason == "length"
    assert engine.generate([6], config).completion_tokens == 3  # room again


# ---- a failing step ----------------------------------------------------------------------------------
def failing_forward(model, monkeypatch, when):
    """Make model.forward raise RuntimeError("boom") once, on the first call where when(idx) holds."""
    forward, state = model.forward, {"failed": False}

    def forward_or_fail(idx, *args, **kwargs):
        if not state["failed"] and when(idx):
            state["failed"] = True
            raise RuntimeError("boom")
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward_or_fail)
    return state


def test_a_failing_decoding_step_fails_its_requests_and_the_engine_goes_on(engines, monkeypatch):
    model = build("sdpa")
    engine = engines(model, max_batch=4)
    config = GenerationConfig(max_new_tokens=10, temperature=0, stop_at_eos=False)
    expected = reference(model, [7, 8, 9], config)
    state = failing_forward(model, monkeypatch, lambda idx: idx.shape == (2, 1))  # decoding two rows
    gate = Gate()
    engine.submit([1, 2, 3], config, notify=gate)
    request, events = submit(engine, [4, 5], config)
    gate.open()
    for result in (drain(gate.events)[1], drain(events)[1]):
        assert result.finish_reason == "error" and result.error == "RuntimeError: boom"
    assert state["failed"] and engine.stats()["active"] == 0
    again, events = submit(engine, [7, 8, 9], config)
    assert drain(events)[1].finish_reason == "length" and again.new_ids == expected


def test_a_failing_prefill_fails_only_its_request(engines, monkeypatch):
    model = build("sdpa")
    engine = engines(model, max_batch=4)
    config = GenerationConfig(max_new_tokens=20, temperature=0, stop_at_eos=False)
    expected = reference(model, [1, 2, 3], config)
    failing_forward(model, monkeypatch, lambda idx: idx.shape == (1, 7))  # the prefill of a 7-token prompt
    gate = Gate()
    running = engine.submit([1, 2, 3], config, notify=gate)
    bad, events = submit(engine, [4] * 7, config)
    gate.open()
    result = drain(events)[1]
    assert result.finish_reason == "error" and "boom" in result.error and bad.new_ids == []
    assert drain(gate.events)[1].finish_reason == "length" and running.new_ids == expected
    assert engine.stats()["active"] == 0


def test_a_failing_request_served_alone_fails_alone(engines, monkeypatch):
    model = build("sdpa")
    engine = engines(model, max_batch=1)
    config = GenerationConfig(max_new_tokens=6, temperature=0, stop_at_eos=False)
    expected = reference(model, [5, 6], config)
    failing_forward(model, monkeypatch, lambda idx: True)
    first, events = submit(engine, [5, 6], config)
    assert drain(events)[1].finish_reason == "error"
    second, events = submit(engine, [5, 6], config)
    assert drain(events)[1].finish_reason == "length" and second.new_ids == expected
