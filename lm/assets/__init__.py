"""Files that ship inside the `lm` package: the book's measurements and small models, and the glossary.

    lm.assets.path("glossary_chat.pt")     # a Path into the installed package
    lm.book.asset("gpu_decode.json")       # the same, as the chapters write it
    lm.assets.names()                      # what there is

They are package data (pyproject.toml, [tool.setuptools.package-data]), so a chapter finds them
wherever `lm` is installed (a checkout, a wheel, Colab), never through a path relative to the
current folder.

| file | what | made by |
|---|---|---|
| `attention_cost_{cpu,h200_fp32,h200_bf16}.json` | time and memory of each attention variant (chapter 4) | `bench/attention_cost.py` |
| `gpu_train_mfu.json`, `ddp_scaling.json` | GPU training throughput and scaling (chapter 6) | `bench/gpu_train_mfu.py`, `bench/ddp_scaling.py` |
| `gpu_decode.json` | GPU decode tokens/s (chapter 7) | `bench/gpu_decode.py` |
| `serve_load_{cpu,h200}.json` | the server under concurrent clients (chapter 9) | `bench/serve_load.py` |
| `glossary_base.pt` | chapter 8's pretrained model (3.6 MB, float16 weights) | `scripts/make_glossary_base.py` |
| `glossary_chat.pt` | chapter 9's chat model (3.6 MB, float16 weights) | `scripts/make_glossary_chat.py` |
| `shakespeare_char.pt` | chapter 7's "model worth reading": 4.8M parameters, 5,000 steps on the plays (9.7 MB, float16 weights) | `scripts/make_shakespeare_model.py` (`make shakespeare-model`) |
| `shakespeare_char_draft.pt` | its draft for speculative decoding (chapter 7, `lm.speculative`): 2 blocks, width 192, 1.0M parameters, the same tokenizer (1.9 MB, float16 weights) | `scripts/make_shakespeare_model.py --draft` |
| `glossary/` | the hand-written fine-tuning data and its data card (`lm.glossary`) | written by hand |
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def path(name: str) -> Path:
    """The file `name` (e.g. "glossary_chat.pt" or "glossary/glossary.jsonl") of the installed package."""
    root = Path(str(resources.files(__name__)))
    found = root / name
    if not found.exists():
        raise FileNotFoundError(f"lm ships no asset {name!r} (in {root}); there are: {', '.join(names())}")
    return found


def names() -> list[str]:
    """Every asset, as the names `path` takes, sorted."""
    root = Path(str(resources.files(__name__)))
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc"))
