"""Supervised fine-tuning (lm/finetuning.py): prompt masking, padding, packing, the run itself."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import lm
from lm.finetuning import FinetuneConfig, SupervisedData, encode_examples, finetune, split_examples
from lm.instructions import chat_template

WORDS = ["cat", "dog", "bird", "fish", "horse", "mouse", "tiger", "lion", "bear", "wolf", "fox", "owl", "eel", "ant"]
QA = [{"question": f"What is {w}?", "answer": f"{w} has {len(w)} letters."} for w in WORDS]


@pytest.fixture
def tok():
    text = "".join(q["question"] + q["answer"] for q in QA) + "HumanAssistant:\n0123456789"
    return lm.CharTokenizer.train(text)


def llama_like(tok, block_size=64, **changes):
    config = dict(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, d_model=32, bias=False,
                  pos="rope", norm="rmsnorm", norm_eps=1e-6, ffn="swiglu", d_ff=64, rope_base=500.0)
    config.update(changes)
    return lm.GPT(lm.ModelConfig(**config), tokenizer=tok).eval()


def quiet_config(**changes):
    return FinetuneConfig(**{"progress": False, "eval_interval": 10, "eval_iters": 2, **changes})


def test_loss_counts_answer_tokens_only_as_hugging_face_labels_do(tok):
    """lm's loss on (x, y with -100 on the prompt) equals LlamaForCausalLM's loss with the prompt's
    labels set to -100: the same masking convention as transformers' fine-tuning."""
    pytest.importorskip("transformers")
    from hf_convert import llama_from_lm

    model = llama_like(tok)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.3)
    encoded = chat_template("human").encode([{"role": "user", "content": "What is cat?"},
                                             {"role": "assistant", "content": "cat has 3 letters."}], tok)
    ids = torch.tensor([encoded.ids])
    labels = torch.where(torch.tensor([encoded.trained]), ids, torch.full_like(ids, -100))
    x, y = encoded.inputs_and_targets()
    hf = llama_from_lm(model)
    with torch.no_grad():
        ours = model(x[None], y[None])[1]
        theirs = hf(ids, labels=labels).loss
        everything = model(x[None], ids[:, 1:])[1]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert abs(ours.item() - everything.item()) > 1e-3  # masking the prompt changes the loss


def test_prompt_tokens_get_no_gradient_signal(tok):
    """Changing a prompt token's target changes nothing; the loss only sees answer positions."""
    model = llama_like(tok)
    data = SupervisedData(encode_examples([[{"role": "user", "content": q["question"]},
                                            {"role": "assistant", "content": q["answer"]}] for q in QA[:3]],
                                          tok, "human", 65)[0], 64, tok.pad_id)
    x, y, mask = data.collate(data.items)
    logits = model(x, attention_mask=mask)[0]
    keep = y != -100
    manual = F.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(model(x, y, attention_mask=mask)[1], manual)
    prompt_len = (y[0] != -100).nonzero()[0].item()
    assert prompt_len > 10 and (y[0, :prompt_len] == -100).all()


def test_padded_examples_score_as_they_would_alone(tok):
    model = llama_like(tok, pos="learned")
    encoded, _ = encode_examples(lm.load_examples(QA[:4]), tok, "human", 65)
    data = SupervisedData(encoded, 64, tok.pad_id)
    x, y, mask = data.collate(data.items)
    assert mask.shape == x.shape and (~mask).any()  # lengths differ, so there is padding
    batch_logits = model(x, attention_mask=mask)[0]
    for b, e in enumerate(encoded):
        xi, _ = e.inputs_and_targets()
        alone = model(xi[None])[0][0]
        torch.testing.assert_close(batch_logits[b, : len(xi)], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "manual", "sliding_window"])
def test_packed_examples_see_only_themselves(tok, attention):
    """With RoPE, each example packed into a row gives the logits it gives alone: the document mask
    keeps the examples apart and relative positions do not care where it sits."""
    model = llama_like(tok, block_size=128, attention=attention, window=16)
    encoded, _ = encode_examples(lm.load_examples(QA[:6]), tok, "human", 129)
    data = SupervisedData(encoded, 128, tok.pad_id, packing=True)
    assert len(data) < len(encoded)  # several examples share a row
    x, y, mask = data.collate(data.items)
    assert mask.shape == (x.size(0), x.size(1), x.size(1))
    logits = model(x, attention_mask=mask)[0]
    seen = 0
    for b, row in enumerate(data.items):
        at = 0
        for xi, yi in row:
            alone = model(xi[None])[0][0]
            torch.testing.assert_close(logits[b, at : at + len(xi)], alone, rtol=1e-4, atol=1e-4)
            assert torch.equal(y[b, at : at + len(xi)], yi)
            at += len(xi)
            seen += 1
    assert seen == len(encoded)


def test_packing_is_refused_by_linear_attention(tok):
    model = llama_like(tok, attention="linear")
    encoded, _ = encode_examples(lm.load_examples(QA[:4]), tok, "human", 65)
    data = SupervisedData(encoded, 64, tok.pad_id, packing=True)
    x, _, mask = data.collate(data.items)
    with pytest.raises(ValueError, match="fine-tune it without packing"):
        model(x, attention_mask=mask)


def test_finetune_learns_the_answers(tok):
    model = llama_like(tok)
    before = lm.evaluate(model, QA, batch_size=8)
    history = finetune(model, QA, quiet_config(max_steps=120, lr=3e-3, patience=None), val_examples=QA)
    after = lm.evaluate(model, QA, batch_size=8)
    assert history.val_loss[-1] < history.val_loss[0] / 3
    assert after.token_accuracy > 0.8 > before.token_accuracy
    assert after.loss < before.loss


def test_finetune_trains_on_whole_examples_and_counts_real_tokens(tok):
    model = llama_like(tok)
    history = finetune(model, QA, quiet_config(max_steps=3, batch_size=4, patience=None))
    lengths = [len(e) - 1 for e in encode_examples(split_examples(lm.load_examples(QA), 0.1, 1337)[0], tok,
                                                    "human", 65)[0]]
    assert min(lengths) * 4 * 3 <= history.tokens <= max(lengths) * 4 * 3  # real tokens, not padding


def test_few_examples_warn_and_skips_are_counted(tok):
    model = llama_like(tok, block_size=64)
    with pytest.warns(UserWarning) as caught:
        finetune(model, QA[:4] + [{"question": "x" * 80, "answer": "too long"}], quiet_config(max_steps=2),
                 val_examples=QA[:2])
    messages = " ".join(str(w.message) for w in caught)
    assert "only 4 training examples" in messages or "only 5 training examples" in messages
    assert "longer than 65 tokens" in messages


def test_nothing_to_train_on_is_a_clear_error(tok):
    model = llama_like(tok, block_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(lm.TrainingError, match="no examples to train on"):
            finetune(model, QA, quiet_config(max_steps=2))


def test_epochs_count_examples_seed_004s_num_epochs(tok):
    """FinetuneConfig(epochs=2): every training example twice, in steps of batch_size examples."""
    assert FinetuneConfig().max_steps == 300
    history = finetune(llama_like(tok), QA, quiet_config(epochs=2, batch_size=4, val_fraction=0.25, patience=None))
    train_examples = len(QA) - round(0.25 * len(QA))
    assert len(history.step) == -(-2 * train_examples // 4)  # ceil(2 * examples / 4) steps
    with pytest.raises(lm.TrainingError, match="both"):
        FinetuneConfig(epochs=1, max_steps=10)


def test_early_stopping_uses_seed_001_defaults(tok):
    config = FinetuneConfig()
    assert (config.patience, config.min_delta, config.eval_interval, config.lr) == (5, 0.001, 50, 3e-4)
    model = llama_like(tok)
    history = finetune(model, QA, quiet_config(max_steps=400, lr=1e-7, warmup_steps=0, eval_interval=5, patience=2,
                                               min_delta=0.01))
    assert history.stopped_early and len(history.val_loss) == 3  # the first evaluation, then 2 without progress


def test_a_finished_run_is_not_trained_again(tok, tmp_path):
    model = llama_like(tok)
    config = quiet_config(max_steps=10, patience=None, lr=3e-3, out_dir=str(tmp_path))
    history = finetune(model, QA, config)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 10
    again = llama_like(tok)
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    repeat = finetune(again, QA, config, resume="auto")  # already at max_steps: loads, trains nothing
    assert repeat.loss == history.loss
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_interrupted_run_resumes_to_the_same_weights(tok, tmp_path):
    model = llama_like(tok)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, QA, quiet_config(max_steps=20, patience=None, lr=3e-3))
    first = llama_like(tok)
    first.load_state_dict(state)
    config = quiet_config(max_steps=20, patience=None, lr=3e-3, out_dir=str(tmp_path))
    stop_after = {"evals": 0}

    def interrupt(history):
        stop_after["evals"] += 1
        if stop_after["evals"] == 1:  # after step 10's checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(first, QA, config, callback=interrupt)
    second = llama_like(tok)
    finetune(second, QA, config, resume="auto")
    for (name, a), b in zip(model.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_config_errors_name_the_value():
    with pytest.raises(lm.TrainingError, match="template='chatml'"):
        FinetuneConfig(template="chatml")
    with pytest.raises(lm.TrainingError, match="lora_rank=0"):
        FinetuneConfig(lora_rank=0)
    with pytest.raises(lm.TrainingError, match="val_fraction=1.5"):
        FinetuneConfig(val_fraction=1.5)
    with pytest.raises(lm.TrainingError, match="FinetuneConfig"):
        finetune(lm.GPT(lm.ModelConfig(vocab_size=10)), QA, lm.TrainConfig())


def test_split_holds_out_a_fraction_without_overlap():
    train, val = split_examples(list(range(50)), 0.1, seed=3)
    assert len(val) == 5 and not set(train) & set(val) and sorted(train + val) == list(range(50))
    assert split_examples(list(range(50)), 0.1, seed=3) == (train, val)


def test_train_on_prompt_learns_every_token_but_is_scored_on_answers(tok):
    masked, plain = llama_like(tok), llama_like(tok)
    plain.load_state_dict(masked.state_dict())
    a = finetune(masked, QA, quiet_config(max_steps=10, patience=None, lr=3e-3), val_examples=QA)
    b = finetune(plain, QA, quiet_config(max_steps=10, patience=None, lr=3e-3, train_on_prompt=True),
                 val_examples=QA)
    assert b.tokens == a.tokens  # same rows ...
    assert a.loss[0] != pytest.approx(b.loss[0])  # ... but the loss covers different tokens
    encoded, _ = encode_examples(lm.load_examples(QA[:1]), tok, "human", 65, train_on_prompt=True)
    assert (encoded[0].inputs_and_targets()[1] != -100).all()


def test_lora_finetune_trains_adapters_only_and_its_checkpoint_loads(tok, tmp_path):
    """With lora_rank only the adapters move; best.pt loads back with its adapters (lm.load_model),
    and adapters.safetensors alone, put on the untouched base, gives the same logits."""
    model = llama_like(tok)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = quiet_config(max_steps=30, lr=1e-2, patience=None, lora_rank=4, out_dir=str(tmp_path))
    history = finetune(model, QA, config, val_examples=QA)
    assert history.val_loss[-1] < history.val_loss[0]
    for name, value in model.state_dict().items():
        if "lora_" not in name:  # every base weight is where it was
            torch.testing.assert_close(value, base[name.replace(".base.", ".")], msg=name)
    x = torch.tensor([tok.encode("What is owl?")])
    with torch.no_grad():
        expected = model(x)[0]
        reloaded = lm.load_model(tmp_path / "last.pt", device="cpu")
        torch.testing.assert_close(reloaded(x)[0], expected)
        fresh = llama_like(tok)
        fresh.load_state_dict(base)
        lm.load_adapters(fresh, tmp_path / "adapters.safetensors")
        torch.testing.assert_close(fresh.eval()(x)[0], expected)
    adapters = (tmp_path / "adapters.safetensors").stat().st_size
    assert adapters * 5 < (tmp_path / "last.pt").stat().st_size
    assert lm.load_checkpoint(tmp_path / "last.pt")["lora"]["rank"] == 4
