"""The fused decoding step (`lm.fused_decode`): Triton kernels for the norm + matrix-vector products
and for one query's attention over the cache. Checked against the module path on CUDA (logits to a
tolerance, greedy ids exactly in float32), and on the CPU through Triton's interpreter when Triton
is installed (a CPU-only PyTorch has none: those tests skip)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lm
from lm.fused_decode import FusedStep

from test_generation import VARIANTS, build

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
has_triton = importlib.util.find_spec("triton") is not None
FUSED = ["mha", "manual", "gqa", "mqa+rope", "llama-like"]  # the variants the fused step takes
OTHERS = ["sliding_window", "linear", "block_sparse", "sinusoidal+post-norm"]


def test_unsupported_models_are_named_with_the_reason():
    model = build("mha")
    reason = FusedStep.unsupported(model)
    assert reason is not None and ("CUDA" in reason or "Triton" in reason)
    with pytest.raises(ValueError, match="FusedStep cannot run this model"):
        FusedStep(model, lm.KVCache(model, 1, static=True))


def check_fused_step(name: str, B: int, device: str, dtype=torch.float32, steps: int = 4, prompt: int = 6,
                     max_len: int = 32) -> None:
    """FusedStep's logits against `model(token, cache=cache)` step by step, from a prompt whose last
    row is left-padded; and, greedy, the argmax its head kernel finds against torch.argmax."""
    model = build(name, block_size=max(max_len, 40)).to(device, dtype)
    ids = torch.randint(0, 50, (B, prompt), device=device)
    mask = torch.ones(B, prompt, dtype=torch.bool, device=device)
    mask[B - 1, :3] = False
    ref_cache, cache = (lm.KVCache(model, B, max_len=max_len, static=True) for _ in range(2))
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=ref_cache)
        model(ids, attention_mask=mask, cache=cache)
        step = FusedStep(model, cache, greedy=True)
        token = ids[:, -1:]
        for _ in range(steps):
            want = model(token, cache=ref_cache)[0]
            got, chosen = step(token)
            tol = 1e-4 if dtype == torch.float32 else 0.05 * want.float().abs().max().item()
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol)
            assert torch.equal(chosen, got[:, -1].argmax(-1, keepdim=True))  # ties: the first, as torch
            assert int(cache.cursor.position) == int(ref_cache.cursor.position)
            token = want[:, -1].argmax(-1, keepdim=True)


def reference_attention(q, keys, values, pos: int, H: int, real=None):
    """One new query per row and head over keys 0..pos, written out in float32 (GQA: heads share K/V)."""
    B, H_kv, S, D = keys.shape
    heads = q[:, :H * D].view(B, H, 1, D).float()
    k = keys[:, :, :pos + 1].float().repeat_interleave(H // H_kv, 1)
    v = values[:, :, :pos + 1].float().repeat_interleave(H // H_kv, 1)
    scores = heads @ k.transpose(-1, -2) / D ** 0.5
    if real is not None:  # padding hidden, except the query's own position
        seen = real[:, :pos + 1].clone()
        seen[:, pos] = True
        scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).reshape(B, H * D)


def check_split_attention(device: str, dtype=torch.float32) -> None:
    """decode_attention with the keys split over programs in several ways (one block each, two blocks
    each, one program per head, the default) against the reference: positions at, before and after a
    split's first key, with and without padding, GQA; and the counts are back at 0 after every call."""
    from lm import fused_decode as fd
    torch.manual_seed(0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    for B, H, H_kv, S, D in [(1, 4, 4, 40, 16), (2, 4, 2, 70, 32)]:
        keys, values = (torch.randn(B, H_kv, S, D, device=device, dtype=dtype) for _ in range(2))
        q = torch.randn(B, (H + 2 * H_kv) * D, device=device, dtype=dtype)
        real = torch.rand(B, S, device=device) > 0.3
        configs = [dict(BS=16, NB=1, SPLITS=-(-S // 16)), dict(BS=16, NB=2, SPLITS=-(-S // 32)),
                   dict(BS=16, NB=-(-S // 16), SPLITS=1), fd.attention_config(D, S)]
        for config in configs:
            config.setdefault("num_warps", 4)
            scratch = fd.attention_scratch(B, H, D, config["SPLITS"], device)
            for pos in (0, 5, 15, 16, 17, 33, S - 1):
                for mask in (None, real):
                    got = fd.decode_attention(q, keys, values, torch.tensor(pos, device=device), H, mask, config,
                                              scratch)
                    torch.testing.assert_close(got.float(), reference_attention(q, keys, values, pos, H, mask), **tol)
                    assert not scratch["count"].any()  # the last program of each head reset its count
        with pytest.raises(ValueError, match=f"covers 32 of the cache's {S} slots"):
            fd.decode_attention(q, keys, values, torch.tensor(0, device=device), H, config=dict(BS=16, NB=1, SPLITS=2))


@pytest.mark.skipif(not has_triton or torch.cuda.is_available(),
                    reason="needs Triton and no GPU (its interpreter runs the kernels on the CPU; with a GPU the CUDA "
                           "tests below run them)")
def test_the_kernels_match_the_modules_in_triton_interpreter():
    # the interpreter must be chosen before triton is first imported: a fresh process
    code = textwrap.dedent("""
        from test_fused_decode import check_fused_step, check_split_attention
        for name, B in [("mha", 1), ("llama-like", 2), ("mqa+rope", 2)]:
            check_fused_step(name, B, "cpu")
        check_split_attention("cpu")
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(__file__))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@cuda
@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 2])
def test_fused_logits_match_the_module_step(name, dtype, B):
    check_fused_step(name, B, "cuda", dtype, steps=8)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_split_over_programs_matches_the_reference(dtype):
    check_split_attention("cuda", dtype)


@cuda
@pytest.mark.parametrize("name", ["mha", "gqa", "llama-like"])
def test_fused_step_over_a_long_cache_read_by_several_programs_per_head(name):
    from lm import fused_decode as fd
    assert fd.attention_config(8, 512)["SPLITS"] > 1  # the test models: d_model 32, 4 heads of 8
    check_fused_step(name, 2, "cuda", steps=6, prompt=300, max_len=512)  # positions 300-305 of 512


@cuda
@pytest.mark.parametrize("name", ["mha", "mqa+rope"])
def test_fused_step_with_small_splits_and_with_none(name, monkeypatch):
    from lm import fused_decode as fd
    monkeypatch.setattr(fd, "attention_config", lambda D, S: dict(BS=16, NB=1, SPLITS=S // 16, num_warps=4))
    check_fused_step(name, 2, "cuda", steps=12)  # positions 6-17: the keys cross a split
    monkeypatch.setattr(fd, "attention_config", lambda D, S: dict(BS=16, NB=S // 16, SPLITS=1, num_warps=4))
    check_fused_step(name, 2, "cuda", steps=12)


@cuda
@pytest.mark.parametrize("name", FUSED + OTHERS)
def test_the_graph_takes_the_fused_step_where_it_can(name):
    model = build(name).cuda()
    cache = lm.KVCache(model, 2, max_len=32, static=True)
    from lm.cuda_graph import GraphedStep
    assert GraphedStep(model, cache).fused == (name in FUSED)
    assert not GraphedStep(model, cache, compile=True).fused
    if name in FUSED:
        big = lm.KVCache(model, 3, max_len=32, static=True)  # more rows: cuBLAS's matrix products are faster
        assert "batch size 3" in FusedStep.unsupported(model, big)


@cuda
@pytest.mark.parametrize("name", FUSED)
def test_fused_greedy_generation_gives_the_eager_ids_and_logprobs(name):
    model = build(name, block_size=24).cuda()
    prompt = torch.randint(0, 50, (2, 6), device="cuda")
    eager, eager_lp = model.generate(prompt, max_new_tokens=40, temperature=0, cuda_graph=False,
                                     return_logprobs=True)  # refills past block_size 24
    fused, fused_lp = model.generate(prompt, max_new_tokens=40, temperature=0, return_logprobs=True)
    assert torch.equal(fused, eager)
    torch.testing.assert_close(fused_lp, eager_lp, rtol=1e-4, atol=1e-4)
    decoder = lm.Decoder(model)
    decoder.generate(prompt, max_new_tokens=4, temperature=0)
    assert decoder._kept[-1].fused and decoder._kept[-1].greedy  # the argmax is in the graph
    sampled = [model.generate(prompt, max_new_tokens=30, temperature=0.9, top_k=20, seed=4, stop_tokens=[7],
                              cuda_graph=graph) for graph in (False, True)]
    assert torch.equal(*sampled)
    decoder.generate(prompt, max_new_tokens=4, temperature=0.9, stop_tokens=[7])
    step = decoder._kept[-1]  # the fused step, then the draw and the stops in the same graph
    assert step.fused and step.sampling.top_k is None and step.finished is not None


@cuda
@pytest.mark.parametrize("name", ["mha", "sliding_window"])  # the fused graph, and the module graph
def test_run_makes_greedy_steps_with_replays_only(name):
    from lm.cuda_graph import GraphedStep
    model = build(name).cuda()
    prompt = torch.randint(0, 50, (2, 5), device="cuda")
    eager = model.generate(prompt, max_new_tokens=30, temperature=0, cuda_graph=False)
    cache = lm.KVCache(model, 2, max_len=40, static=True)
    with torch.no_grad():
        model(prompt, cache=cache)
        step = GraphedStep(model, cache, greedy=True)
        assert torch.equal(step.run(eager[:, 5:6], 20, position=5), eager[:, 6:26])
        assert torch.equal(step.run(eager[:, 25:26], 9), eager[:, 26:35])  # the position read from the device
        with pytest.raises(ValueError, match="do not fit"):
            step.run(eager[:, 34:35], 10)


# ---- the draw: Gumbel-max in two Triton kernels (lm.fused_sampling) ---------------------------------
def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of `samples` (ids) against `probs`, the classes expected fewer than 5
    times pooled into one; and its degrees of freedom."""
    n = samples.numel()
    counts = torch.bincount(samples.flatten().cpu(), minlength=probs.numel()).double()
    expected = probs.double().cpu() * n
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    wanted = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = wanted > 0
    stat = float(((observed[keep] - wanted[keep]) ** 2 / wanted[keep]).sum())
    return stat, int(keep.sum()) - 1


@cuda
def test_the_draw_follows_the_softmax_at_the_temperature():
    """20,480 draws from one (1000-class) row of logits at temperature 0.7 fit softmax(logits / 0.7)
    (chi-square within 6 standard deviations of its mean), and clearly do not fit temperature 1."""
    from lm.fused_sampling import Draw

    torch.manual_seed(0)
    logits = torch.randn(1000, device="cuda") * 2
    rows = 2048
    draw = Draw(rows, "cuda")
    draw.reseed(1)
    samples = torch.cat([draw(logits.expand(rows, -1), 0.7).clone() for _ in range(10)])
    stat, df = chi_square(samples, torch.softmax(logits / 0.7, dim=0))
    assert stat < df + 6 * (2 * df) ** 0.5
    wrong, df = chi_square(samples, torch.softmax(logits, dim=0))
    assert wrong > df + 20 * (2 * df) ** 0.5
    assert int(draw.count) == 10  # each draw counted


@cuda
def test_the_draw_is_seeded_filtered_and_feeds_and_watches_rows():
    from lm.fused_sampling import Draw

    torch.manual_seed(0)
    B, V = 3, 5000
    logits = torch.randn(B, V, device="cuda", dtype=torch.bfloat16)
    draw = Draw(B, "cuda")
    runs = []
    for _ in range(2):  # the same seed, the same draws; the draws after it differ
        draw.reseed(7)
        runs.append(torch.cat([draw(logits, 1.0).clone() for _ in range(4)], dim=1))
    assert torch.equal(runs[0], runs[1])
    assert len({tuple(column.tolist()) for column in runs[0].T}) > 1
    same = logits[:1].expand(64, -1)  # identical rows draw apart (the noise is per row)
    assert Draw(64, "cuda")(same, 1.0).unique().numel() > 1
    kept = torch.full((B, V), float("-inf"), device="cuda")
    kept[:, 10:13] = 0.0  # only three columns left: the draw never leaves them
    picks = torch.cat([draw(kept, 2.0).clone() for _ in range(50)])
    assert ((picks >= 10) & (picks < 13)).all() and picks.unique().numel() == 3
    # feed and watch: row 1 has finished (gets the padding 99); row 0 draws a stop id, row 2 not
    token = torch.zeros(B, 1, dtype=torch.long, device="cuda")
    history = torch.zeros(B, 8, dtype=torch.long, device="cuda")
    position = torch.tensor(5, device="cuda")
    finished = torch.tensor([False, True, False], device="cuda")
    only = torch.full((B, V), float("-inf"), device="cuda")
    only[0, 42], only[1, 43], only[2, 44] = 0.0, 0.0, 0.0
    stops = torch.tensor([42, 43, -1, -1], device="cuda")
    out = draw(only, 1.0, feed=(token, history, position), watch=(finished, stops, torch.tensor(99, device="cuda")))
    assert out.flatten().tolist() == [42, 99, 44] and token.flatten().tolist() == [42, 99, 44]
    assert history[:, 5].tolist() == [42, 99, 44] and finished.tolist() == [True, True, False]
    with pytest.raises(ValueError, match="power of two"):
        draw(only, 1.0, watch=(finished, stops[:3], torch.tensor(99, device="cuda")))


@cuda
def test_nearby_seeds_and_counts_draw_apart():
    """Seed s and seed s+1 do not share their noise shifted by a draw (a key of seed + count would):
    the second draw from seed 3 is not the first draw from seed 4."""
    from lm.fused_sampling import Draw

    logits = torch.zeros(1, 50_000, device="cuda")  # uniform: the draw is the noise's argmax
    draw = Draw(1, "cuda")
    draw.reseed(3)
    first, second = int(draw(logits, 1.0)), int(draw(logits, 1.0))
    draw.reseed(4)
    assert int(draw(logits, 1.0)) not in (first, second)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_top_k_threshold_is_torch_topks_kth_value(dtype):
    """lm.fused_topk's k-th largest (block candidates, then one program per row) is exactly
    torch.topk's k-th value of logits / T: widths that are not multiples of the block, bf16 rows
    full of ties, k of 1, of a power of two, larger than the row; a k too large for the kernels
    gives None (torch.topk's turn). top_k_filter on the GPU keeps what it keeps on the CPU, and
    every pick of the draw with top_k is one of the kept columns."""
    from lm.fused_sampling import Draw
    from lm.fused_topk import kth_largest, top_k_plan
    from lm.sampling import top_k_filter

    torch.manual_seed(0)
    T = 0.8
    for N in (50_304, 50_257, 3_000, 128_256):
        x = torch.randn(3, N, device="cuda") * 3
        x = x.round().to(dtype) if dtype == torch.bfloat16 else x.to(dtype)  # integers: many ties
        scaled = x.float() * (1 / T)
        for k in (1, 7, 50, 64, 200, 1000, 5000, N + 5):  # 5,000 of 50,304: too many for the kernels
            kth = torch.topk(scaled, min(k, N), dim=-1).values[:, -1]
            found = kth_largest(x, k, 1 / T)
            assert (found is None) == (top_k_plan(N, k) is None)
            if found is not None:
                assert torch.equal(found, kth), (N, k)
            assert torch.equal(top_k_filter(scaled, k), top_k_filter(scaled.cpu(), k).cuda()), (N, k)
            draw = Draw(3, "cuda")
            draw.reseed(k)
            picks = torch.cat([draw(x, T, top_k=k).clone() for _ in range(8)], dim=1)
            assert (scaled.gather(1, picks) >= kth[:, None]).all(), (N, k)
            if k == 1 and dtype == torch.float32:  # one token kept: the argmax every time
                assert torch.equal(picks, x.argmax(dim=1, keepdim=True).expand(-1, 8))
    assert top_k_plan(50_304, 5_000) is None


@cuda
def test_the_top_k_draw_follows_the_filtered_softmax():
    """20,480 draws with top_k=40 from one (1000-class) row fit softmax(top_k_filter(logits / 0.7))
    and never leave its 40 columns."""
    from lm.fused_sampling import Draw
    from lm.sampling import top_k_filter

    torch.manual_seed(1)
    logits = torch.randn(1000, device="cuda")
    rows = 2048
    draw = Draw(rows, "cuda")
    draw.reseed(2)
    samples = torch.cat([draw(logits.expand(rows, -1), 0.7, top_k=40).clone() for _ in range(10)])
    want = torch.softmax(top_k_filter(logits[None] / 0.7, 40)[0], dim=0)
    assert bool((want[samples] > 0).all())
    stat, df = chi_square(samples, want)
    assert stat < df + 6 * (2 * df) ** 0.5


@pytest.mark.parametrize("k", [0, -3, 2.5, True, "50"])
def test_a_draw_with_a_bad_top_k_names_it(k):
    """Draw(..., top_k=k) checks k before it launches anything, so this runs without a GPU too."""
    from lm.fused_sampling import Draw

    with pytest.raises(ValueError, match=f"top_k={k!r} must be a positive integer"):
        Draw(1, "cpu")(torch.zeros(1, 100), 1.0, top_k=k)


def test_the_top_k_plan_widens_blocks_until_the_candidates_fit_one_program():
    from lm.fused_topk import BLOCK_COLUMNS, MAX_CANDIDATES, kth_largest, top_k_plan

    assert top_k_plan(50_304, 50) == (BLOCK_COLUMNS, 64)  # 25 blocks of 2,048 keep 64 each: 1,600 candidates
    assert top_k_plan(50_304, 1) == (BLOCK_COLUMNS, 2)  # tl.topk keeps two at least
    width, kept = top_k_plan(50_304, 1000)
    assert kept == 1024 and -(-50_304 // width) * kept <= MAX_CANDIDATES
    assert top_k_plan(128, 50) == (BLOCK_COLUMNS, 64)  # one block holds the whole row
    assert top_k_plan(50_304, 1025) is None  # more than 1,024 kept per block: torch.topk's filter
    assert kth_largest(torch.zeros(2, 100), 5) is None  # on a CPU: torch.topk's filter
