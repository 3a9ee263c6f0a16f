"""Make lm/assets/glossary_base.pt, the pretrained model chapter 8 fine-tunes (stage 1 of seed 000).

    python scripts/make_glossary_base.py             # about a minute on one GPU, about an hour on 2 CPU cores

A character-level GPT (4 layers, width 192, RoPE, RMSNorm) reads `lm.glossary.pretraining_text()`,
every entry of the glossary in several wordings, until it knows them nearly by heart. Only the
weights are stored, in float16 (the chapter loads them back into float32), with the tokenizer.
The script ends with one JSON line: the settings, the final loss and the time taken.
"""

import argparse
import json
import time
from pathlib import Path

import torch

import lm

ASSETS = Path(__file__).resolve().parent.parent / "lm" / "assets"  # package data (lm.assets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ASSETS / "glossary_base.pt"))
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20, help="times the glossary is stated over")
    parser.add_argument("--wording", choices=("varied", "one"), default="varied",
                        help="state each entry in all of STATEMENT_FORMS, or always as 'term: definition'")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    forms = lm.glossary.STATEMENT_FORMS if args.wording == "varied" else lm.glossary.STATEMENT_FORMS[:1]
    torch.manual_seed(0)
    tokenizer = lm.CharTokenizer.train(lm.glossary.all_text())
    ids = torch.tensor(tokenizer.encode(lm.glossary.pretraining_text(repeats=args.repeats, forms=forms)))
    config = lm.ModelConfig(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.layers,
                            n_head=args.width // 32, d_model=args.width, pos="rope", norm="rmsnorm", dropout=0.0)
    model = lm.GPT(config, tokenizer=tokenizer).to(lm.resolve_device(args.device))
    start = time.perf_counter()
    history = lm.train(model, ids, ids[: len(ids) // 20], lm.TrainConfig(
        max_steps=args.steps, batch_size=64, lr=2e-3, warmup_steps=100, eval_interval=args.steps, eval_iters=4,
        precision="fp32", progress=False))
    seconds = time.perf_counter() - start
    half = {name: tensor.half() for name, tensor in model.state_dict().items()}
    lm.save_checkpoint(args.out, model, model_state=half, step=args.steps, train_config={
        "max_steps": args.steps, "batch_size": 64, "lr": 2e-3, "corpus": f"glossary.pretraining_text({args.repeats}), {args.wording} wording"})
    print(json.dumps({"out": args.out, "steps": args.steps, "params": sum(p.numel() for p in model.parameters()),
                      "train_tokens": len(ids), "final_loss": history.train_loss[-1], "seconds": round(seconds, 1),
                      "device": str(next(model.parameters()).device)}))


if __name__ == "__main__":
    main()
