"""The bookkeeping around CUDA graphs, checked on a CPU: capture is emulated (a "replay" runs the
recorded step again and copies its result into the buffers the capture returned), so the prompt's
bucket padding, the cache positions it moves, the greedy history and speculative decoding's graphed
windows run here exactly as they are called on a GPU. What only a GPU shows (kernels frozen into a
graph, PDL) is tested on CUDA in test_cuda_graph.py and test_fused_decode.py."""

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


def emulated_capture(step, warmup: int = 2, restore=(), pool=None, prepare=None):
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


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    monkeypatch.setattr(lm.cuda_graph, "capture", emulated_capture)
    for module in (lm.cuda_graph, lm.generation, lm.speculative):
        monkeypatch.setattr(module, "graph_unsupported", lambda model: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)


@pytest.mark.parametrize("name", VARIANTS)
def test_graphed_prompts_and_steps_give_the_plain_ids(graphs_on_cpu, name):
    model = build(name, block_size=48)
    decoder = lm.Decoder(model)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 50, (2, T)) for T in (5, 7, 9, 20)]
    for prompt in prompts * 2:
        graphed = decoder.generate(prompt, max_new_tokens=12, temperature=0, cuda_graph=True)
        assert torch.equal(graphed, model.generate(prompt, max_new_tokens=12, temperature=0, cuda_graph=False))
    prefill = decoder._kept[2].prefill
    padded = name not in ("sliding_window", "sliding_window+rope+gqa", "linear")
    assert set(prefill.graphs) == ({(16, False, False), (32, False, False)} if padded else
                                  {(T, False, False) for T in (5, 7, 9, 20)})
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False
    for _ in range(2):  # left padding, and refills of the full cache (60 new tokens, block 48)
        graphed = decoder.generate(prompts[2], max_new_tokens=60, attention_mask=mask, temperature=0, cuda_graph=True)
        assert torch.equal(graphed, model.generate(prompts[2], max_new_tokens=60, attention_mask=mask, temperature=0,
                                                   cuda_graph=False))


def test_a_prompt_whose_padding_would_not_fit_runs_the_plain_forward(graphs_on_cpu):
    model = build("llama-like")
    cache = lm.KVCache(model, 1, max_len=40, static=True)
    prefill = lm.cuda_graph.GraphedStep(model, cache).prefill
    ids = torch.randint(0, 50, (1, 39))
    expected = model(ids)[0][:, -1:]
    for _ in range(3):  # bucket 16: met, captured, replayed
        cache.reset()
        model(ids[:, :20], cache=cache)
        torch.testing.assert_close(prefill(ids[:, 20:30], start=20), model(ids[:, :30])[0][:, -1:])
        assert cache.length == 30
    cache.reset()
    model(ids[:, :30], cache=cache)
    torch.testing.assert_close(prefill(ids[:, 30:], start=30), expected)  # 30 + 16 > 40: not the graph
    assert cache.length == 39


@pytest.mark.parametrize("num_draft", [1, 3, 5])
def test_graphed_speculative_decoding_keeps_the_targets_tokens(graphs_on_cpu, num_draft):
    from test_speculative import model as small, nudged

    target = small(0)
    draft = nudged(target, 0.15)
    generator = torch.Generator().manual_seed(num_draft)
    for length, new in [(1, 60), (5, 37), (23, 60)]:
        prompt = torch.randint(0, 50, (1, length), generator=generator)
        expected = target.generate(prompt, max_new_tokens=new, temperature=0, cuda_graph=False)
        out, stats = lm.speculative_generate(target, draft, prompt, new, num_draft=num_draft, return_stats=True,
                                             cuda_graph=True)
        assert torch.equal(out, expected) and stats.new_tokens == new
    assert target.decoder.speculative is not None  # kept for the next call with this draft
    sampled = [lm.speculative_generate(target, draft, prompt, 30, num_draft=num_draft, temperature=1.0, seed=4,
                                       cuda_graph=True) for _ in range(2)]
    assert torch.equal(*sampled)
    target.decoder.release()
    assert target.decoder.speculative is None
