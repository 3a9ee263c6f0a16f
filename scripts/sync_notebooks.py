"""Write the Colab install line of every chapter from _config.yml, or check that it is there.

Every chapter starts with a set-up cell that installs `lm` when it runs on Colab:

    if "google.colab" in sys.modules:
        !pip install -q "lm[serve] @ git+https://github.com/lm-book/lm" openai httpx

Where `lm` comes from is the book's one repository setting, `repository: url:` in _config.yml (the
launch buttons use it too). What each chapter needs on top stays in its own line: the extras in
brackets (`lm`, `lm[serve]`, `lm[test]`) and any packages after the quotes. This script rewrites
the source part of the line, `@ git+<url>`, from the configuration, and leaves the rest alone.

    python scripts/sync_notebooks.py                 # rewrite every book/*.ipynb that disagrees
    python scripts/sync_notebooks.py --check         # exit 1, naming each chapter that disagrees
    python scripts/sync_notebooks.py book/04_*.ipynb # only these notebooks

A chapter without the line (in its first code cell, right under the `google.colab` test) is an
error in both modes: the script does not guess where it goes. Changing the line needs no
re-execution of the notebook: it runs only on Colab, so nbval never compares it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "_config.yml"
COLAB_TEST = 'if "google.colab" in sys.modules:'
# `    !pip install -q "lm[extras] @ <source>" more packages`: indent, extras, source, the rest.
INSTALL = re.compile(r'^(?P<indent>\s*)!pip install -q "lm(?P<extras>\[[\w,\s-]*\])? @ (?P<source>[^"]*)"(?P<rest>.*)$')


def install_source(config_path: Path = CONFIG) -> str:
    """`git+<url>` from `repository: url:` of _config.yml."""
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    url = ((config or {}).get("repository") or {}).get("url")
    if not url:
        raise SystemExit(f"{config_path}: repository: url: is not set")
    return f"git+{url.rstrip('/')}"


def chapters() -> list[Path]:
    return sorted((ROOT / "book").glob("*.ipynb"))


def synced_source(cell_source: str, source: str) -> str:
    """The first code cell's source with its install line pointing at `source`.

    Raises ValueError when the cell has no install line under the Colab test."""
    lines = cell_source.split("\n")
    for i, line in enumerate(lines):
        match = INSTALL.match(line)
        if match is None:
            continue
        above = [previous for previous in lines[:i] if previous.strip()]
        if not above or above[-1].strip() != COLAB_TEST:
            raise ValueError(f"the install line is not right under `{COLAB_TEST}`")
        lines[i] = f'{match["indent"]}!pip install -q "lm{match["extras"] or ""} @ {source}"{match["rest"]}'
        return "\n".join(lines)
    raise ValueError(f'no `!pip install -q "lm @ ..."` line in the first code cell')


def sync(path: Path, source: str, write: bool) -> bool:
    """True when `path` already agrees; otherwise rewrite it (write=True) and return False."""
    notebook = nbformat.read(path, as_version=4)
    first = next((cell for cell in notebook.cells if cell.cell_type == "code"), None)
    if first is None:
        raise ValueError("no code cell")
    new = synced_source(first.source, source)
    if new == first.source:
        return True
    if write:
        first.source = new
        nbformat.write(notebook, path)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every book/*.ipynb")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook disagrees")
    parser.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args(argv)

    source = install_source(args.config)
    failed = 0
    for path in args.notebooks or chapters():
        try:
            agrees = sync(path, source, write=not args.check)
        except ValueError as err:
            print(f"{path}: {err}", file=sys.stderr)
            failed += 1
            continue
        if not agrees:
            print(f"{path}: install line {'differs from' if args.check else 'now follows'} _config.yml ({source})",
                  file=sys.stderr if args.check else sys.stdout)
            failed += args.check
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
