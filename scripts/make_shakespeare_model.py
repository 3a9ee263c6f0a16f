"""Make lm/assets/shakespeare_char.pt, the book's "model worth reading" (chapter 7), or its draft model.

    python scripts/make_shakespeare_model.py          # about 5 minutes on one GPU; many hours on 2 CPU cores
    python scripts/make_shakespeare_model.py --draft  # lm/assets/shakespeare_char_draft.pt: about 1 minute on one GPU

A character-level GPT (6 blocks, width 256, 4 heads, context 256, dropout 0.1) trained on the
Shakespeare corpus of `lm prep --corpus shakespeare` for 5,000 steps of 64 windows: 82 million
characters, about 18 passes over the plays. The weights with the lowest validation loss are stored
in float16 (the chapter loads them back into float32) with the tokenizer, the settings, the
validation curve and the time the run took, so the book can say what reproducing it costs.
The script ends with one JSON line: the settings, the best validation loss and the time taken.

`--draft` makes the small model that speculative decoding (`lm.speculative`, chapter 7) drafts with
for the big one: the same recipe, tokenizer and context at 2 blocks of width 192 (3 heads) without
dropout (a model this small underfits the plays rather than overfitting them): 1.0M parameters,
validation loss 1.44 against the big model's 1.32. What matters for a draft is how often its greedy
choice agrees with the big model's and how cheap its forward is; `bench/speculative_decode.py`
measures both. Of the drafts tried (1 x 128, 2 x 128, 2 x 192: validation loss 1.64, 1.56, 1.44),
2 x 192 agreed most often (about 70% of its guesses kept, 3 tokens per target forward with 3
guesses) and was the fastest on a CPU, its extra width costing little at batch 1.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import lm
from lm import cli
from lm.data import read_tokens

ASSETS = Path(__file__).resolve().parent.parent / "lm" / "assets"  # package data (lm.assets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", action="store_true",
                        help="the draft model: --layers 2 --width 192 --dropout 0, written to "
                             "lm/assets/shakespeare_char_draft.pt (each can still be overridden)")
    parser.add_argument("--out", default=None, help="default: lm/assets/shakespeare_char.pt (_draft.pt with --draft)")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--layers", type=int, default=None, help="blocks (default: 6; 2 with --draft)")
    parser.add_argument("--width", type=int, default=None, help="d_model, 64 per head (default: 256; 192 with --draft)")
    parser.add_argument("--dropout", type=float, default=None, help="default: 0.1 (0.0 with --draft)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--eval_interval", type=int, default=250)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    defaults = dict(out=str(ASSETS / "shakespeare_char_draft.pt"), layers=2, width=192, dropout=0.0) if args.draft \
        else dict(out=str(ASSETS / "shakespeare_char.pt"), layers=6, width=256, dropout=0.1)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    data_dir = lm.corpora.data_home() / "shakespeare"
    if not (data_dir / "train.bin").is_file():
        cli.main(["prep", "--corpus", "shakespeare", "--out_dir", str(data_dir)])
    tokenizer = lm.load_tokenizer(data_dir / "tokenizer.json")
    train_ids = read_tokens(data_dir / "train.bin", tokenizer.vocab_size)
    val_ids = read_tokens(data_dir / "val.bin", tokenizer.vocab_size)

    device = lm.resolve_device(args.device)
    config = lm.ModelConfig(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.layers,
                            n_head=max(1, args.width // 64), d_model=args.width, dropout=args.dropout)
    torch.manual_seed(0)
    model = lm.GPT(config, tokenizer=tokenizer).to(device)
    train = dict(max_steps=args.steps, batch_size=args.batch_size, lr=1e-3, min_lr=1e-4, warmup_steps=200,
                 eval_interval=args.eval_interval, eval_iters=40, compile=device.type == "cuda", progress=False)
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        history = lm.train(model, train_ids, val_ids, lm.TrainConfig(**train, out_dir=out_dir))
        seconds = time.perf_counter() - start
        best = lm.load_model(Path(out_dir) / "best.pt", device="cpu")
    half = {name: tensor.half() for name, tensor in best.state_dict().items()}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    record = {
        **train, "corpus": "shakespeare (lm prep)", "train_tokens": len(train_ids),
        "seconds": round(seconds, 1), "device": device_name,
        "eval_steps": [s + 1 for s in history.eval_step],  # steps done, as best_step counts them
        "train_loss": [round(v, 4) for v in history.train_loss],
        "val_loss": [round(v, 4) for v in history.val_loss],
        "best_val_loss": round(history.best_val_loss, 4), "best_step": history.best_step,
        "tokens_per_second": round(history.tokens_per_second),
    }
    lm.save_checkpoint(args.out, best, model_state=half, step=args.steps, train_config=record)
    print(json.dumps({"out": args.out, "params": lm.count_params(config), **{k: record[k] for k in
                      ("seconds", "device", "best_val_loss", "train_tokens")}}))


if __name__ == "__main__":
    main()
