"""The fused head and loss (`lm.losses.linear_cross_entropy`) against `F.cross_entropy` of the full logits:
loss and gradients in float32 and float64 (gradcheck) and under bfloat16 autocast, ignored rows, chunk
sizes, shapes, no-grad and frozen inputs, torch.compile, errors, that no (N, V) tensor is ever made, and
`GPT.forward(..., return_logits=False)` with the trainer that uses it."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lm
from lm.losses import CHUNK_NUMBERS, default_chunk_rows, linear_cross_entropy

N, C, V = 37, 16, 29


def inputs(shape=(N,), dtype=torch.float32, ignored=(3, 10, 11)):
    """hidden (*shape, C) and weight (V, C) that require grad, and targets (*shape) with a few ignored."""
    hidden = torch.randn(*shape, C, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, C, dtype=dtype) / C ** 0.5).requires_grad_()
    targets = torch.randint(V, shape)
    targets.view(-1)[list(ignored)] = -100
    return hidden, weight, targets


def reference(hidden, weight, targets, ignore_index=-100):
    """Loss and gradients the plain way: every logit, in float32."""
    loss = F.cross_entropy((hidden @ weight.T).float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index)
    return (loss, *torch.autograd.grad(loss, (hidden, weight)))


def fused(hidden, weight, targets, **options):
    loss = linear_cross_entropy(hidden, weight, targets, **options)
    return (loss, *torch.autograd.grad(loss, (hidden, weight)))


class Ops(TorchDispatchMode):
    """Every aten op that runs while it is on, with the shapes of what it returns."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else [out]
        self.calls.append((str(func.overloadpacket), [tuple(t.shape) for t in outputs if isinstance(t, torch.Tensor)]))
        return out

    def count(self, name: str) -> int:
        return sum(op == name for op, _ in self.calls)


# ---- against F.cross_entropy ---------------------------------------------------------------------
@pytest.mark.parametrize("chunk_rows", [1, 5, 7, None, N, 1000])
@pytest.mark.parametrize("shape", [(N,), (4, 9)])
def test_loss_and_gradients_match_the_full_logits_in_float32(shape, chunk_rows):
    hidden, weight, targets = inputs(shape)
    loss, grad_hidden, grad_weight = fused(hidden, weight, targets, chunk_rows=chunk_rows)
    want, want_hidden, want_weight = reference(hidden, weight, targets)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad_hidden.shape == hidden.shape and grad_weight.shape == weight.shape
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_hidden, want_hidden, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_weight, want_weight, rtol=1e-5, atol=1e-7)


def test_gradients_are_exact_in_float64():
    hidden, weight, targets = inputs((7,), dtype=torch.float64, ignored=(2,))
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, targets, chunk_rows=3), (hidden, weight))
    assert linear_cross_entropy(hidden, weight, targets).dtype == torch.float64


def test_another_ignore_index_and_the_incoming_gradient():
    hidden, weight, targets = inputs(ignored=())
    targets[:5] = 0  # class 0 stands for "no target" here
    loss, grad_hidden, grad_weight = fused(hidden, weight, targets, ignore_index=0, chunk_rows=4)
    want, want_hidden, want_weight = reference(hidden, weight, targets, ignore_index=0)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_hidden, want_hidden, rtol=1e-5, atol=1e-7)
    # backward scales by what comes in (1/k for k micro-batches, a scaler's factor), and twice gives the same
    loss = linear_cross_entropy(hidden, weight, targets, ignore_index=0, chunk_rows=4)
    (3 * loss).backward(retain_graph=True)
    torch.testing.assert_close(weight.grad, 3 * want_weight, rtol=1e-5, atol=1e-7)
    weight.grad = None
    (3 * loss).backward()
    torch.testing.assert_close(weight.grad, 3 * want_weight, rtol=1e-5, atol=1e-7)


def test_ignored_rows_get_no_gradient():
    hidden, weight, targets = inputs(ignored=(0, 4, 5))
    _, grad_hidden, _ = fused(hidden, weight, targets, chunk_rows=2)
    assert grad_hidden[[0, 4, 5]].abs().max() == 0 and grad_hidden[1].abs().max() > 0


def test_every_target_ignored_gives_what_cross_entropy_gives():
    hidden, weight, _ = inputs()
    targets = torch.full((N,), -100)
    loss, grad_hidden, grad_weight = fused(hidden, weight, targets, chunk_rows=8)
    want, want_hidden, want_weight = reference(hidden, weight, targets)
    assert torch.isnan(loss) and torch.isnan(want)  # 0 / 0
    assert torch.equal(grad_hidden, want_hidden) and torch.equal(grad_weight, want_weight)  # zeros
    assert grad_hidden.abs().max() == 0


def test_bfloat16_autocast_matches_a_linear_layer_under_autocast():
    hidden, weight, targets = inputs((4, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
        want = F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), targets.flatten())
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    want_hidden, want_weight = torch.autograd.grad(want, (hidden, weight))
    assert loss.dtype == torch.float32  # the loss is float32 under autocast too, as the plain path's
    assert grad_hidden.dtype == grad_weight.dtype == torch.float32  # the inputs' dtype, as autograd casts back
    torch.testing.assert_close(loss, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad_hidden, want_hidden, rtol=0.02, atol=1e-3)
    torch.testing.assert_close(grad_weight, want_weight, rtol=0.02, atol=1e-3)


def test_products_in_bfloat16_under_autocast():
    hidden, weight, targets = inputs()
    dtypes = []

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                dtypes.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16), Dtypes():
        linear_cross_entropy(hidden, weight, targets, chunk_rows=10)
    assert len(dtypes) == 4 * 3 and all(d == {torch.bfloat16} for d in dtypes)  # 4 chunks, 3 products each


# ---- what is computed, and what is not -----------------------------------------------------------
def test_the_full_logits_are_never_made():
    hidden, weight, targets = inputs((4, 9))
    with Ops() as ops:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=5)
    loss.backward()
    shapes = [shape for _, outputs in ops.calls for shape in outputs]
    assert (5, V) in shapes  # a chunk's logits
    # no more rows of V scores than a chunk has ((C, V) is the weight, transposed as a view)
    assert all(shape[-1] != V or shape[0] <= 5 or shape == (C, V) for shape in shapes if len(shape) == 2)
    assert max(torch.Size(shape).numel() for shape in shapes) < 36 * V  # the largest: hidden (36, C)


class ChunkLogits(TorchDispatchMode):
    """Counts, each time a product makes a chunk's (rows, V) scores, how many earlier ones (or copies) are alive."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows
        self.made: list[weakref.ref] = []
        self.alive_at_each_chunk: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dim() == 2 and out.size(1) == V and out.size(0) <= self.rows:
            if str(func.overloadpacket) in ("aten.mm", "aten.addmm"):
                self.alive_at_each_chunk.append(sum(ref() is not None for ref in self.made))
            self.made.append(weakref.ref(out))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_one_chunk_of_scores_is_alive_at_a_time(dtype):
    hidden, weight, targets = inputs((4, 9), dtype=dtype)
    with ChunkLogits(rows=5) as mode:
        linear_cross_entropy(hidden, weight, targets, chunk_rows=5)
    assert mode.alive_at_each_chunk == [0] * 8  # 36 rows, 8 chunks: each made after the last one's were let go


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, targets = inputs()
    want = reference(hidden, weight, targets)[0]
    with torch.no_grad(), Ops() as ops:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=10)
    assert loss.grad_fn is None and ops.count("aten.mm") + ops.count("aten.addmm") == 4  # one product per chunk
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    with Ops() as ops:  # nothing requires grad
        loss = linear_cross_entropy(hidden.detach(), weight.detach(), targets, chunk_rows=10)
    assert loss.grad_fn is None and ops.count("aten.mm") + ops.count("aten.addmm") == 4
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)


def test_a_frozen_weight_gets_no_gradient_and_costs_no_product():
    hidden, weight, targets = inputs()
    weight.requires_grad_(False)
    with Ops() as ops:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=10)
    assert ops.count("aten.mm") + ops.count("aten.addmm") == 4 * 2  # logits and grad_hidden, no grad_weight
    (grad_hidden,) = torch.autograd.grad(loss, hidden)
    weight.requires_grad_(True)
    torch.testing.assert_close(grad_hidden, reference(hidden, weight, targets)[1], rtol=1e-5, atol=1e-7)


def test_default_chunk_rows():
    assert default_chunk_rows(50304) == 1280  # GPT-2's padded vocabulary: 1334 rows, down to a multiple of 64
    assert default_chunk_rows(50304) * 50304 <= CHUNK_NUMBERS
    assert default_chunk_rows(65) == CHUNK_NUMBERS // 65 // 64 * 64
    assert default_chunk_rows(CHUNK_NUMBERS // 10) == 10 and default_chunk_rows(2 * CHUNK_NUMBERS) == 1


# ---- torch.compile -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled(backend):
    torch._dynamo.reset()
    hidden, weight, targets = inputs((4, 9))
    compiled = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=8), backend=backend,
                             fullgraph=True)
    loss = compiled(hidden, weight, targets)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    want, want_hidden, want_weight = reference(hidden, weight, targets)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_hidden, want_hidden, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_weight, want_weight, rtol=1e-5, atol=1e-7)


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda h, w, t: (h[0], w, t[0]), r"hidden must be .* shape \(16,\)"),
    (lambda h, w, t: (h, w[:, :5], t), r"weight must be .*C = hidden's last size 16.*\(29, 5\)"),
    (lambda h, w, t: (h, w[:0], t), r"at least one class"),
    (lambda h, w, t: (h, w, t[:-1]), r"targets has shape \(36,\).*must be \(37,\)"),
    (lambda h, w, t: (h, w, t.float()), r"integer class ids, got torch.float32"),
    (lambda h, w, t: (h, w.double(), t), r"hidden is torch.float32 and weight torch.float64"),
    (lambda h, w, t: (h, w, torch.where(t == 7, V, t)), rf"targets\[\d+\] .* is {V}, outside \[0, {V}\)"),
    (lambda h, w, t: (h, w, torch.where(t == 7, -1, t)), r"is -1, outside"),
])
def test_bad_inputs_are_named(change, message):
    hidden, weight, targets = inputs()
    targets[0] = 7
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(*change(hidden, weight, targets))


@pytest.mark.parametrize("options, message", [
    ({"chunk_rows": 0}, r"chunk_rows=0 must be a positive int"),
    ({"chunk_rows": 2.5}, r"chunk_rows=2.5"),
    ({"ignore_index": None}, r"ignore_index=None must be an int"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(*inputs(), **options)


# ---- in the model --------------------------------------------------------------------------------
def tiny(**changes) -> lm.GPT:
    config = lm.ModelConfig(vocab_size=48, block_size=16, n_layer=2, n_head=4, d_model=32, dropout=0.0)
    return lm.GPT(lm.ModelConfig(**{**config.to_dict(), **changes}))


def batch(B=3, T=16):
    x, y = torch.randint(48, (B, T)), torch.randint(48, (B, T))
    y[0, :5] = -100
    return x, y


def counted(calls: list):
    """linear_cross_entropy, noting each call in `calls`."""
    return lambda *args, **options: calls.append(1) or linear_cross_entropy(*args, **options)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_gpt_without_logits_takes_the_same_optimizer_step(tie_weights):
    plain = tiny(tie_weights=tie_weights)
    fused_model = copy.deepcopy(plain)
    x, y = batch()
    steps = []
    for model, options in ((plain, {}), (fused_model, {"return_logits": False})):
        # eps well above float32 noise: the key bias's true gradient is 0 (softmax ignores a shift), and
        # AdamW with the usual eps=1e-8 would blow rounding noise there up to a full step of either sign
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
        logits, loss = model(x, y, **options)
        loss.backward()
        steps.append((logits, loss, {name: p.grad.clone() for name, p in model.named_parameters()}))
        optimizer.step()
    (logits, want, want_grads), (none, loss, grads) = steps
    assert logits.shape == (3, 16, 48) and none is None
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    assert grads.keys() == want_grads.keys()  # a tied weight is one parameter, with one gradient
    for name in grads:  # float32 rounding: within a millionth of each gradient's largest entry
        scale = want_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-5, atol=1e-6 * scale)
    for p, q in zip(fused_model.parameters(), plain.parameters()):  # steps of about lr = 1e-3, equal to 0.1%
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    if tie_weights:
        assert fused_model.lm_head.weight is fused_model.tok_emb.weight


def test_gpt_without_logits_under_bfloat16_autocast():
    model = tiny()
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, want = model(x, y)
        _, loss = model(x, y, return_logits=False)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=2e-3, atol=0)


def test_gpt_without_logits_adds_the_moe_loss_in_training_only():
    model = tiny(ffn="moe", n_experts=2).train()
    x, y = batch()
    _, want = model(x, y)
    _, loss = model(x, y, return_logits=False)
    assert model.aux_loss is not None and model.aux_loss > 0
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    model.eval()
    _, plain = model(x, y, return_logits=False)
    torch.testing.assert_close(plain, loss - model.config.moe_aux_loss_coef * model.aux_loss, rtol=1e-5, atol=0)


def test_gpt_compiled_without_logits():
    torch._dynamo.reset()
    model = tiny()
    x, y = batch()
    _, want = model(x, y)
    want_grad = torch.autograd.grad(want, model.tok_emb.weight)[0]
    _, loss = torch.compile(model, backend="aot_eager")(x, y, return_logits=False)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss, model.tok_emb.weight)[0], want_grad, rtol=1e-5, atol=1e-7)


def test_gpt_needs_targets_to_leave_out_the_logits():
    with pytest.raises(ValueError, match="return_logits=False leaves only the loss"):
        tiny()(batch()[0], return_logits=False)


def test_a_head_that_is_not_a_plain_linear_gets_the_plain_loss(monkeypatch):
    calls = []
    monkeypatch.setattr(lm.model, "linear_cross_entropy", counted(calls))
    x, y = batch()
    model = tiny(tie_weights=False)
    lm.apply_lora(model, lm.LoRAConfig(rank=2, targets=("lm_head",)))
    with torch.no_grad():
        model.lm_head.lora_B.normal_()
    logits, loss = model(x, y, return_logits=False)
    assert logits is None and not calls and loss.item() == pytest.approx(model(x, y)[1].item(), rel=1e-6)
    model = tiny()
    seen = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    logits, loss = model(x, y, return_logits=False)
    assert logits is None and not calls and seen == [(3, 16, 48)]  # the hook ran: the head was called
    handle.remove()
    model(x, y, return_logits=False)
    assert calls == [1]


def test_the_trainer_asks_for_the_loss_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(lm.model, "linear_cross_entropy", counted(calls))
    model = tiny()
    tokens = torch.randint(48, (400,))
    config = lm.TrainConfig(max_steps=1, batch_size=2, seq_len=16, grad_accum_steps=2, warmup_steps=0,
                            eval_iters=1, progress=False)
    trainer = lm.trainer.Trainer(model, tokens, tokens, config)
    assert trainer.loss_options == {"return_logits": False}
    trainer.train_step()
    assert len(calls) == 2  # one per micro-batch
    lm.trainer.estimate_loss(model, tokens, 2, 16, iters=1)
    assert len(calls) == 3


def test_a_model_whose_forward_lacks_the_keyword_is_called_as_before():
    class OwnForward(lm.GPT):
        def forward(self, idx, targets=None, *, attention_mask=None):
            return super().forward(idx, targets, attention_mask=attention_mask)

    model = OwnForward(tiny().config)
    assert lm.trainer.loss_only(model) == {} and lm.trainer.loss_only(torch.compile(tiny())) == {"return_logits": False}
    tokens = torch.randint(48, (400,))
    config = lm.TrainConfig(max_steps=1, batch_size=2, seq_len=16, warmup_steps=0, progress=False)
    assert lm.trainer.Trainer(model, tokens, tokens, config).train_step()["loss"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is measured on a CUDA GPU")
def test_the_fused_loss_needs_far_less_memory_on_a_gpu():
    torch.manual_seed(0)
    n, c, v = 8192, 256, 32768  # (n, v) float32 logits: 1 GiB
    hidden = torch.randn(n, c, device="cuda", requires_grad=True)
    weight = (torch.randn(v, c, device="cuda") / c ** 0.5).requires_grad_()
    targets = torch.randint(v, (n,), device="cuda")
    peaks = []
    plain, fused_loss = (lambda: F.cross_entropy(hidden @ weight.T, targets),
                         lambda: linear_cross_entropy(hidden, weight, targets))
    for loss_of in (plain, fused_loss):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss_of().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - start)
    logits_bytes = n * v * 4
    assert peaks[0] > 2 * logits_bytes  # the logits and their log-softmax
    assert peaks[1] < logits_bytes / 2  # a chunk's logits (256 MiB) and the gradients
