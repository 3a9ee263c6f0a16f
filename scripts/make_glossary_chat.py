"""Make lm/assets/glossary_chat.pt, the small assistant of the chapter "A small assistant": a glossary
chat model that answers in the "human" template and reads retrieved passages (RAG-lite).

    python scripts/make_glossary_chat.py         # about 2 minutes on one H200 (pretraining 65 s, fine-tuning
                                                # 51 s, evaluation ~10 s); hours on 2 CPU cores

Knowledge that a model has by heart is no test of retrieval, so the model is built not to have all
of it:

1. Pretraining (as scripts/make_glossary_base.py: a character-level GPT, 4 layers, width 192,
   RoPE, RMSNorm, here with block_size 512) reads the glossary in several wordings, but only the
   entries of the *train* split, and of those only the ones not picked (by a hash of the term, a
   fraction `--open_book`) as "open-book" terms. The val and test terms' definitions are never
   trained on, in any stage.
2. Full fine-tuning in the "human" template on the train split's questions (and refusals): every
   question once with a system message of passages retrieved by BM25 (`lm.retrieval.with_context`,
   k passages within a token budget) and once without, except the open-book terms' questions,
   which only ever come with context. Those were meant to make copying from the context pay, since
   pretraining never stated them (see the result below: fine-tuning taught them by heart instead).
   The fine-tuning retriever indexes the train terms' passages only, so no held-out definition is
   ever even read in training.
3. Exact match (`lm.evaluate`, greedy) on the test split (held-out terms and unanswerable
   questions), on "rephrased" (train terms, unseen wording) and on val, each without retrieval and
   with `Retriever.glossary()` (every entry: the reference shelf the assistant may look things up
   in) at the same k and budget, which are `lm eval/chat --rag glossary`'s defaults for block 512.

Only the weights are stored, in float16, with the tokenizer; train_config records the fine-tuning
settings ("template": "human", which `lm chat` reads), the RAG settings and the exact matches. The
script ends with one JSON line: the settings, every exact match and the time taken.

Result of the stored checkpoint (the defaults; k=3, budget 256): exact match without / with
retrieval, test 0.16 / 0.16 (all 8 correct answers are refusals: 0 of 41 held-out definitions either
way), rephrased 0.83 / 0.89, val 0.175 / 0.175. With context the model still answers held-out terms
with the definition of a similar train term: 2000 steps (about 19 epochs) let it learn the open-book
answers by heart too, so copying from the context never paid. --open_book 0.5 gave test 0.16 / 0.14,
rephrased 0.77 / 0.87, val 0.20 / 0.225.

`--reading N` adds N questions about invented terms ("kelomi vatu") whose definition is only in
their context (`reading_examples`), data that cannot be answered without reading. Measured on one
H200 (exact match without / with retrieval; all other settings the defaults unless named):

    --reading 6000                                   test 0.12 / 0.08, rephrased 0.53 / 0.74, val 0.175 / 0.15
    --reading 12000 --finetune_steps 3000            test 0.14 / 0.12, rephrased 0.45 / 0.77, val 0.225 / 0.20
    --reading 6000 --open_book 0 --finetune_steps 1500
                                                     test 0.12 / 0.10, rephrased 0.84 / 0.95, val 0.175 / 0.10

None of them answers a single held-out definition from its passages (the correct test answers are
refusals): with context the model still writes the definition of some train term. A likely reason:
the reading examples give invented names to definitions of train terms, which the model can answer
by recognising a definition it knows rather than by copying it. At this size (1.8M parameters, character level) reading is not learnt well enough to beat
memory, so the stored checkpoint stays the one made without `--reading`.
"""

import argparse
import hashlib
import json
import random
import sys
import time
import warnings
from pathlib import Path

import torch

import lm
from lm import glossary
from lm.retrieval import CONTEXT_HEADER, Retriever, with_context

ASSETS = Path(__file__).resolve().parent.parent / "lm" / "assets"  # package data (lm.assets)


def is_open_book(term: str, fraction: float) -> bool:
    """Whether a train term is kept out of pretraining (seen in fine-tuning only with its context)."""
    bucket = int(hashlib.sha1(f"open-book:{term.strip().lower()}".encode("utf-8")).hexdigest(), 16) % 1000
    return bucket < round(fraction * 1000)


def pretraining_text(entries: list[dict], repeats: int, seed: int = 0) -> str:
    """`lm.glossary.pretraining_text` over the given entries only."""
    rng = random.Random(seed)
    lines = []
    for _ in range(repeats):
        order = list(entries)
        rng.shuffle(order)
        lines += [rng.choice(glossary.STATEMENT_FORMS).format(**e) for e in order]
    return "\n".join(lines) + "\n"


def finetuning_examples(retriever, tokenizer, k: int, budget: int, open_book: set[str]) -> list:
    """The train split's conversations, each with retrieved context and (unless its term is open-book)
    also without; open-book questions only where the context holds the answer."""
    term_of = {form.format(term=e["term"]): e["term"] for e in glossary.entries() for form in glossary.TRAIN_FORMS}
    plain = list(glossary.examples("train"))
    with_ctx = list(with_context(plain, retriever, k=k, tokenizer=tokenizer, budget=budget))
    # an open-book question whose context misses its passage would teach guessing: it is left out
    ctx = [c for c in with_ctx if term_of.get(c[-2]["content"]) not in open_book or c[-1]["content"] in c[0]["content"]]
    closed = [c for c in plain if term_of.get(c[0]["content"]) not in open_book]
    return ctx + closed


SYLLABLES = ("ba be bi bo bu da de di do du ka ke ki ko ku la le li lo lu ma me mi mo mu na ne ni no nu "
             "ra re ri ro ru sa se si so su ta te ti to tu va ve vi vo vu za ze zi zo zu").split()


def invented_term(rng: random.Random) -> str:
    """A made-up term ("kelomi vatu"): nothing the model has read can tell what it means."""
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))) for _ in range(rng.randint(1, 2)))


def reading_examples(entries: list[dict], n: int, budget: int, rng: random.Random) -> list:
    """Questions about invented terms, each defined (with a real entry's definition) in a context of
    passages laid out as `Retriever.context` lays them out: the answer can only be read, never
    remembered, so these examples teach the model to copy from its context. The defined passage
    comes first about three times in four (BM25's top hit is usually the right one), else second."""
    out = []
    while len(out) < n:
        term, target = invented_term(rng), rng.choice(entries)
        others = [f"{o['term']}: {o['definition']}" for o in rng.sample(entries, 3) if o is not target]
        passages = others[:]
        passages.insert(0 if rng.random() < 0.75 else 1, f"{term}: {target['definition']}")
        lines, used = [], len(CONTEXT_HEADER)
        for p in passages:
            if used + len(p) + 1 > budget and lines:
                break
            lines.append(p)
            used += len(p) + 1
        if f"{term}: " not in "\n".join(lines):
            continue
        question = rng.choice(glossary.TRAIN_FORMS).format(term=term)
        out.append([{"role": "system", "content": "\n".join([CONTEXT_HEADER, *lines])},
                    {"role": "user", "content": question}, {"role": "assistant", "content": target["definition"]}])
    return out


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ASSETS / "glossary_chat.pt"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20, help="times the pretraining text states the glossary")
    parser.add_argument("--pretrain_steps", type=int, default=4000)
    parser.add_argument("--pretrain_batch", type=int, default=32)
    parser.add_argument("--open_book", type=float, default=0.3,
                        help="fraction of train terms left out of pretraining, fine-tuned on only with context")
    parser.add_argument("--reading", type=int, default=0,
                        help="questions about invented terms defined only in their context (see reading_examples)")
    parser.add_argument("--finetune_steps", type=int, default=2000)
    parser.add_argument("--finetune_batch", type=int, default=32)
    parser.add_argument("--finetune_lr", type=float, default=1e-3)
    parser.add_argument("--rag_k", type=int, default=3)
    parser.add_argument("--rag_budget", type=int, default=256, help="tokens of retrieved text (default: block/2)")
    parser.add_argument("--precision", default="auto", help="training precision (auto: bf16 on a CUDA GPU)")
    parser.add_argument("--predictions", default=None, help="write every test/val prediction here (JSONL)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    device = lm.resolve_device(args.device)
    start = time.perf_counter()

    # 1. pretraining on the train terms that are not open-book
    torch.manual_seed(args.seed)
    tokenizer = lm.CharTokenizer.train(glossary.all_text())
    train_entries = [e for e in glossary.entries() if glossary.split_of(e["term"]) == "train"]
    open_book = {e["term"] for e in train_entries if is_open_book(e["term"], args.open_book)}
    known = [e for e in train_entries if e["term"] not in open_book]
    ids = torch.tensor(tokenizer.encode(pretraining_text(known, args.repeats, args.seed)))
    config = lm.ModelConfig(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.layers,
                            n_head=args.width // 32, d_model=args.width, pos="rope", norm="rmsnorm", dropout=0.0)
    model = lm.GPT(config, tokenizer=tokenizer).to(device)
    pre = lm.train(model, ids, ids[: len(ids) // 20], lm.TrainConfig(
        max_steps=args.pretrain_steps, batch_size=args.pretrain_batch, lr=2e-3, warmup_steps=100,
        eval_interval=args.pretrain_steps, eval_iters=4, precision=args.precision, progress=False, seed=args.seed))
    pretrain_seconds = time.perf_counter() - start
    log(f"pretrained in {pretrain_seconds:.0f} s, loss {pre.train_loss[-1]:.3f}")

    # 2. fine-tuning, half the examples with retrieved context (open-book terms: always)
    train_retriever = Retriever(f"{e['term']}: {e['definition']}" for e in train_entries)
    shelf = Retriever.glossary()
    rag = dict(k=args.rag_k, tokenizer=tokenizer, budget=args.rag_budget)
    train_set = finetuning_examples(train_retriever, tokenizer, args.rag_k, args.rag_budget, open_book)
    train_set += reading_examples(train_entries, args.reading, args.rag_budget, random.Random(args.seed))
    val = list(glossary.examples("val"))
    val_set = val + list(with_context(val, shelf, **rag))
    ft_config = lm.FinetuneConfig(
        max_steps=args.finetune_steps, batch_size=args.finetune_batch, lr=args.finetune_lr, warmup_steps=50,
        eval_interval=max(1, args.finetune_steps // 4), eval_iters=5, patience=None, template="human",
        precision=args.precision, progress=False, seed=args.seed)
    t0 = time.perf_counter()
    history = lm.finetune(model, train_set, ft_config, val_examples=val_set)
    finetune_seconds = time.perf_counter() - t0

    log(f"fine-tuned in {finetune_seconds:.0f} s, val loss {history.val_loss}")

    def save(em: dict) -> None:
        half = {name: tensor.half() for name, tensor in model.state_dict().items()}
        lm.save_checkpoint(args.out, model, model_state=half, step=args.finetune_steps, train_config={
            **ft_config.to_dict(), "rag_k": args.rag_k, "rag_budget": args.rag_budget, "open_book": args.open_book,
            "reading": args.reading,
            "pretraining": f"glossary train terms minus open-book ({len(known)} of {len(train_entries)}), "
                           f"{args.repeats} repeats, {args.pretrain_steps} steps x {args.pretrain_batch}",
            "exact_match": em})

    save({})

    # 3. exact match without and with retrieval
    model.eval()
    em, predictions = {}, []
    for split in ("test", "val", "rephrased"):
        plain = glossary.examples(split)
        for name, examples in (("no_rag", plain), ("rag", with_context(plain, shelf, **rag))):
            result = lm.evaluate(model, examples, template="human", batch_size=64)
            em[f"{split}_{name}"] = round(result.exact_match, 4)
            if result.skipped:
                em[f"{split}_{name}_skipped"] = result.skipped
            predictions += [{"split": split, "rag": name == "rag", **p} for p in result.predictions]
            log(f"{split} {name}: exact match {result.exact_match:.3f}")
    seconds = time.perf_counter() - start
    if args.predictions:
        with open(args.predictions, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions if p["split"] != "rephrased")
    save(em)

    print(json.dumps({"out": args.out, **{k: v for k, v in vars(args).items() if k != "out"},
                      "params": sum(p.numel() for p in model.parameters()), "pretrain_tokens": len(ids),
                      "pretrain_loss": round(pre.train_loss[-1], 4), "finetune_examples": len(train_set),
                      "finetune_val_loss": [round(v, 4) for v in history.val_loss],
                      "open_book_terms": len(open_book), "exact_match": em,
                      "pretrain_seconds": round(pretrain_seconds, 1), "finetune_seconds": round(finetune_seconds, 1),
                      "seconds": round(seconds, 1), "device": str(device)}))


if __name__ == "__main__":
    main()
