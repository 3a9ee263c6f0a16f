"""CUDA graphs of generation: the prompt's bucket padding, the cache positions it moves, refills,
captures at the cache's end and speculative decoding's graphed windows give the ids and logits of
the ordinary forward. Each test runs twice: on CUDA with real graphs (skipped without a GPU), and
on a CPU with capture emulated (a "replay" runs the recorded step again and copies its result into
the buffers the capture returned), so CI, which has no GPU, runs all the bookkeeping around the
graphs. What only real graphs show (kernels frozen into a graph, PDL) is in test_cuda_graph.py
and test_fused_decode.py."""

from __future__ import annotations

import pytest
import torch

import lm
import lm.cuda_graph
import lm.generation
import lm.speculative

from test_generation import VARIANTS, build


class EmulatedGraph:
    def __init__(self, step, output):
        self.step, self.output = step, output

    def replay(self):
        result = self.step()
        pairs = zip(self.output, result) if isinstance(self.output, tuple) else [(self.output, result)]
        for buffer, value in pairs:
            buffer.copy_(value)


def emulated_capture(step, warmup: int = 2, restore=(), pool=None, prepare=None, generators=()):
    saved = [(t, t.clone()) for t in restore]
    for _ in range(warmup):
        if prepare is not None:
            prepare()
        step()
    if prepare is not None:
        prepare()
    output = step()  # the buffers a real capture would hand back
    for tensor, copy in saved:  # ... without running the step
        tensor.copy_(copy)
    return EmulatedGraph(step, output), output


@pytest.fixture(params=["emulated", "cuda"])
def device(request, monkeypatch) -> str:
    """Where the graphs run: "cuda" (real ones), or "cpu" with capture emulated."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        return "cuda"
    monkeypatch.setattr(lm.cuda_graph, "capture", emulated_capture)
    for module in (lm.cuda_graph, lm.generation, lm.speculative):
        monkeypatch.setattr(module, "graph_unsupported", lambda model: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    return "cpu"


@pytest.mark.parametrize("name", VARIANTS)
def test_prompts_replay_a_graph_from_the_second_of_a_length_bucket(device, name):
    """The prompt's forward is graphed per bucket of lengths (a power of two, padded on the right;
    the exact length where padding would be seen: rolling windows, linear attention), captured the
    second time a bucket comes; the ids stay eager's, for prompts of several lengths in one bucket,
    with left padding, and through refills of a full cache."""
    model = build(name, block_size=48).to(device)
    decoder = lm.Decoder(model)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 50, (2, T), device=device) for T in (5, 7, 9, 20)]
    for prompt in prompts * 2:
        graphed = decoder.generate(prompt, max_new_tokens=12, temperature=0, cuda_graph=True)
        assert torch.equal(graphed, model.generate(prompt, max_new_tokens=12, temperature=0, cuda_graph=False))
    prefill = decoder._kept[-1].prefill
    padded = name not in ("sliding_window", "sliding_window+rope+gqa", "linear")
    assert set(prefill.graphs) == ({(16, False, False), (32, False, False)} if padded else
                                  {(T, False, False) for T in (5, 7, 9, 20)})
    assert (prefill.bucket(5), prefill.bucket(20)) == ((16, 32) if padded else (5, 20))
    mask = torch.ones(2, 9, dtype=torch.bool, device=device)
    mask[1, :3] = False
    for _ in range(2):  # left padding, and refills of the full cache (60 new tokens, block 48)
        graphed = decoder.generate(prompts[2], max_new_tokens=60, attention_mask=mask, temperature=0, cuda_graph=True)
        assert torch.equal(graphed, model.generate(prompts[2], max_new_tokens=60, attention_mask=mask, temperature=0,
                                                   cuda_graph=False))
    assert (prefill.bucket(9), True, False) in prefill.graphs


def test_a_graphed_prefill_gives_the_forwards_logits_and_position(device):
    model = build("llama-like").to(device)
    cache = lm.KVCache(model, 2, max_len=40, static=True)
    step = lm.cuda_graph.GraphedStep(model, cache)
    prompt = torch.randint(0, 50, (2, 11), device=device)
    eager, _ = model(prompt, cache=cache)
    following = step(prompt[:, -1:]).clone()
    for _ in range(3):  # eager, captured, replayed
        cache.reset()
        logits = step.prefill(prompt)
        assert cache.length == 11 and logits.shape == (2, 1, 50)
        torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(step(prompt[:, -1:]), following, rtol=1e-4, atol=1e-4)
    assert list(step.prefill.graphs) == [(16, False, False)]
    long = torch.randint(0, 50, (2, 39), device=device)
    for _ in range(2):  # a prompt after cached positions, into the captured bucket-16 graph
        cache.reset()
        model(long[:, :20], cache=cache)
        torch.testing.assert_close(step.prefill(long[:, 20:30], start=20), model(long[:, :30])[0][:, -1:],
                                   rtol=1e-4, atol=1e-4)
        assert cache.length == 30
    cache.reset()
    model(long[:, :30], cache=cache)
    near_end = step.prefill(long[:, 30:], start=30)  # 30 + its bucket (16) > 40: the ordinary forward
    assert cache.length == 39
    torch.testing.assert_close(near_end, model(long)[0][:, -1:], rtol=1e-4, atol=1e-4)


def test_a_step_captured_at_the_caches_last_slot(device):
    """Capturing runs the step a few times first; from the cache's last slot those runs would pass
    its end (and block_size), so they run from position 0 and the cache is put back."""
    model = build("mha", block_size=16).to(device)
    prompt = torch.randint(0, 50, (1, 16), device=device)
    cache = lm.KVCache(model, 1, max_len=16, static=True)
    model(prompt[:, :15], cache=cache)
    logits = lm.cuda_graph.GraphedStep(model, cache)(prompt[:, 15:])
    assert cache.length == 16
    torch.testing.assert_close(logits, model(prompt)[0][:, -1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_draft", [1, 3, 5])
def test_graphed_speculative_decoding_keeps_the_targets_tokens(device, num_draft):
    """Both models through graphs (the draft's guesses as back-to-back replays, the target's check of
    k+1 positions as a graph of its own): the same tokens as eager speculative decoding and as the
    target's greedy `generate`, past block_size too; sampling stays seeded; the windows are kept in
    the target's decoder and freed with it."""
    from test_speculative import model as small, nudged

    target = small(0).to(device)
    draft = nudged(target, 0.15)
    generator = torch.Generator().manual_seed(num_draft)
    for length, new in [(1, 60), (5, 37), (23, 60)]:
        prompt = torch.randint(0, 50, (1, length), generator=generator).to(device)
        expected = target.generate(prompt, max_new_tokens=new, temperature=0, cuda_graph=False)
        out, stats = lm.speculative_generate(target, draft, prompt, new, num_draft=num_draft, return_stats=True,
                                             cuda_graph=True)
        eager = lm.speculative_generate(target, draft, prompt, new, num_draft=num_draft, cuda_graph=False)
        assert torch.equal(out, expected) and torch.equal(eager, expected), (num_draft, length)
        assert stats.new_tokens == new == stats.accepted + stats.steps
    assert target.decoder.speculative is not None  # kept for the next call with this draft
    sampled = [lm.speculative_generate(target, draft, prompt, 30, num_draft=num_draft, temperature=1.0, seed=4,
                                       cuda_graph=True) for _ in range(2)]
    assert torch.equal(*sampled)
    target.decoder.release()
    assert target.decoder.speculative is None


# ---- tokens chosen in the graph: draws, and stops watched without the host ----------------------------
CHOICES = {
    "greedy": dict(temperature=0),
    "sampled": dict(temperature=0.9, seed=5),
    "top_k": dict(temperature=1.3, top_k=7, seed=1),
    "top_p": dict(temperature=0.8, top_p=0.9, seed=2),
    "min_p": dict(temperature=1.0, min_p=0.1, seed=3),
}


@pytest.mark.parametrize("choice", CHOICES)
def test_graphs_choose_and_stop_as_the_eager_steps_do(device, choice, monkeypatch):
    """The graph chooses each token itself: the argmax, or a draw from its own generator, seeded as
    the eager path's; with stop ids it also pads finished rows and runs steps back to back until
    every row has finished. The ids equal eager's, for rows that stop at different steps, across
    refills of the full cache, and with log-probabilities asked for (one step at a time); the host
    draws only the tokens after a prompt."""
    sampling = CHOICES[choice]
    model = build("mha", block_size=24).to(device)
    decoder = lm.Decoder(model)
    prompt = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(0)).to(device)
    free = model.generate(prompt, max_new_tokens=40, cuda_graph=False, **sampling)
    drawn = []
    counted = lm.generation.choose_next
    monkeypatch.setattr(lm.generation, "choose_next", lambda *a, **k: drawn.append(1) or counted(*a, **k))
    assert torch.equal(decoder.generate(prompt, max_new_tokens=40, cuda_graph=True, **sampling), free)
    # the host drew the prompt's token and the refills' (24 slots: every 6 tokens once full), the graph the rest
    assert len(drawn) <= 5
    stops = [int(free[0, 5 + 3]), int(free[1, 5 + 11]), int(free[2, 5 + 30])]  # each row stops by then
    eager = model.generate(prompt, max_new_tokens=40, cuda_graph=False, stop_tokens=stops, **sampling)
    assert eager.size(1) < 45
    for _ in range(2):
        graphed = decoder.generate(prompt, max_new_tokens=40, cuda_graph=True, stop_tokens=stops, **sampling)
        assert torch.equal(graphed, eager)
    assert decoder._kept[-1].finished is not None
    eager, eager_logp = model.generate(prompt, max_new_tokens=40, cuda_graph=False, stop_tokens=stops,
                                       return_logprobs=True, **sampling)
    graphed, graphed_logp = decoder.generate(prompt, max_new_tokens=40, cuda_graph=True, stop_tokens=stops,
                                             return_logprobs=True, **sampling)
    assert torch.equal(graphed, eager)
    torch.testing.assert_close(graphed_logp, eager_logp, rtol=1e-4, atol=1e-4)


def test_run_until_stops_soon_after_every_row_has_finished(device):
    """`GraphedStep.run_until` pads each row after its stop token and makes at most lag + 1 steps
    after the last row's stop; without a stop it makes all n."""
    model = build("mha", block_size=64).to(device)
    prompt = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(1)).to(device)
    cache = lm.KVCache(model, 2, max_len=64, static=True)
    plain = lm.cuda_graph.GraphedStep(model, cache, greedy=True)
    model(prompt[:, :-1], cache=cache)
    ids = plain.run(prompt[:, -1:], 40, position=3).clone()
    stops = {int(ids[0, 6]), int(ids[1, 9])}
    firsts = [next(j for j, t in enumerate(row) if t in stops) for row in ids.tolist()]
    step = lm.cuda_graph.GraphedStep(model, cache, greedy=True, stops=True)
    for lag in (0, 2, 5):
        cache.reset()
        model(prompt[:, :-1], cache=cache)
        finished = step.watch(stops, pad=49)
        made = step.run_until(prompt[:, -1:], 40, position=3, lag=lag)
        assert max(firsts) < made.size(1) <= max(firsts) + lag + 2
        assert bool(finished.all())
        for row, first in enumerate(firsts):
            assert torch.equal(made[row, :first + 1], ids[row, :first + 1])
            assert (made[row, first + 1:] == 49).all()
    cache.reset()
    model(prompt[:, :-1], cache=cache)
    step.watch([], pad=49)
    assert torch.equal(step.run_until(prompt[:, -1:], 40, position=3), ids)


def test_a_decoder_keeps_its_cache_for_another_choice_and_seeds_each_draw(device):
    """Another temperature gets a new graphed step over the kept cache; without a seed the graph's
    draws follow torch.manual_seed, the first call (which captures) as the later ones."""
    model = build("llama-like", block_size=32).to(device)
    decoder = lm.Decoder(model)
    prompt = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(2)).to(device)
    runs = []
    for temperature in (1.0, 1.0, 0.7, 1.0):
        torch.manual_seed(11)
        runs.append(decoder.generate(prompt, max_new_tokens=20, temperature=temperature, cuda_graph=True))
        if temperature == 0.7:
            assert decoder._kept[1] is cache and decoder._kept[-1] is not step
        cache, step = decoder._kept[1], decoder._kept[-1]
        assert step.sampling.temperature == temperature
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[3])
    assert not torch.equal(runs[0], runs[2])
    with pytest.raises(ValueError, match="penalty"):
        lm.cuda_graph.GraphedStep(model, cache, sampling=lm.SamplingConfig(temperature=1.0, repetition_penalty=1.2))
    with pytest.raises(ValueError, match="stops=True needs"):
        lm.cuda_graph.GraphedStep(model, cache, stops=True)
    with pytest.raises(ValueError, match="at most 16"):
        lm.cuda_graph.GraphedStep(model, cache, greedy=True, stops=True).watch(range(20), pad=0)
    many = list(range(20, 50))  # more stop ids than a graph holds: the host checks them, the same ids
    eager = model.generate(prompt, max_new_tokens=20, temperature=0.9, seed=4, stop_tokens=many, cuda_graph=False)
    graphed = decoder.generate(prompt, max_new_tokens=20, temperature=0.9, seed=4, stop_tokens=many, cuda_graph=True)
    assert torch.equal(graphed, eager) and decoder._kept[-1].finished is None
