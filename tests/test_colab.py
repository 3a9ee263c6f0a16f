"""Every chapter runs on Colab from its first cell: the install line follows _config.yml, the launch
buttons are configured, and a chapter's data comes from the installed package, not the checkout."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

import lm

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "book").glob("*.ipynb"))


def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_notebooks", ROOT / "scripts" / "sync_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sync_notebooks = _sync_module()


def config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def code_of(path: Path) -> list[str]:
    return [cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]


# ---- one setting: the repository -------------------------------------------------------------------

def test_every_chapter_installs_lm_on_colab_from_the_configured_repository(capsys):
    assert CHAPTERS
    status = sync_notebooks.main(["--check"])
    assert status == 0, f"run `python scripts/sync_notebooks.py`:\n{capsys.readouterr().err}"
    url = config()["repository"]["url"]
    for path in CHAPTERS:
        first = code_of(path)[0]
        assert 'if "google.colab" in sys.modules:' in first, path.name
        assert f'@ git+{url}"' in first, path.name


def test_the_chapters_that_need_extras_ask_for_them():
    first = {path.name[:2]: code_of(path)[0] for path in CHAPTERS}
    assert '"lm[serve] @' in first["09"]  # the server of chapter 9
    assert '"lm[test] @' in first["11"]  # transformers, for chapter 11


def _notebook(tmp_path: Path, first_cell: str) -> Path:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("# A chapter"), nbformat.v4.new_code_cell(first_cell),
                      nbformat.v4.new_code_cell('!pip install -q "lm @ git+https://elsewhere.example/lm"')]
    path = tmp_path / "chapter.ipynb"
    nbformat.write(notebook, path)
    return path


def test_sync_rewrites_the_source_and_keeps_the_chapters_extras_and_packages(tmp_path):
    fork = tmp_path / "_config.yml"
    fork.write_text(yaml.safe_dump({"repository": {"url": "https://github.com/someone/fork/"}}))
    cell = ('import sys\n\nif "google.colab" in sys.modules:\n'
            '    !pip install -q "lm[serve] @ git+https://github.com/lm-book/lm" openai httpx\n\nimport lm')
    path = _notebook(tmp_path, cell)
    before = nbformat.read(path, as_version=4)

    assert sync_notebooks.main(["--check", "--config", str(fork), str(path)]) == 1
    assert nbformat.read(path, as_version=4) == before  # --check changes nothing
    assert sync_notebooks.main(["--config", str(fork), str(path)]) == 0
    after = nbformat.read(path, as_version=4)
    assert after.cells[1].source == cell.replace("https://github.com/lm-book/lm", "https://github.com/someone/fork")
    assert after.cells[0] == before.cells[0] and after.cells[2] == before.cells[2]  # only the first code cell
    assert sync_notebooks.main(["--check", "--config", str(fork), str(path)]) == 0


@pytest.mark.parametrize("cell", [
    "import lm",  # no install line at all
    '!pip install -q "lm @ git+https://github.com/lm-book/lm"\nimport lm',  # not under the Colab test
])
def test_sync_names_a_chapter_without_a_guarded_install_line(tmp_path, cell, capsys):
    path = _notebook(tmp_path, cell)
    assert sync_notebooks.main(["--check", str(path)]) == 1
    assert sync_notebooks.main([str(path)]) == 1
    assert "chapter.ipynb" in capsys.readouterr().err


# ---- launch buttons -----------------------------------------------------------------------------

def test_the_config_gives_every_chapter_colab_and_binder_buttons():
    from jupyter_book.config import validate_yaml

    cfg = config()
    validate_yaml(cfg, raise_on_errors=True)  # jupyter-book's own schema
    repository, buttons = cfg["repository"], cfg["launch_buttons"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repository["url"])
    assert repository["branch"]
    assert buttons["colab_url"] == "https://colab.research.google.com"
    assert buttons["binderhub_url"] == "https://mybinder.org"
    assert buttons["thebe"] is False  # a live kernel in the page would load from the network
    # The buttons open <url>/blob/<branch>/<path_to_book>/book/NN.ipynb: the chapters' real place.
    book_root = ROOT / repository["path_to_book"]
    assert all((book_root / "book" / path.name).is_file() for path in CHAPTERS)


# ---- data comes with the package ------------------------------------------------------------------

CHECKOUT_PATH = re.compile(r"""["'](\.\./|\./|data/|book/|lm/)""")


def test_chapters_read_no_file_relative_to_the_checkout():
    for path in CHAPTERS:
        for source in code_of(path):
            for line in source.splitlines():
                if "--out" in line or line.lstrip().startswith("#"):
                    continue  # a command printed for the reader, not a file the chapter reads
                assert not CHECKOUT_PATH.search(line), f"{path.name}: {line.strip()}"


def test_the_assets_the_chapters_use_ship_with_the_package():
    code = "\n".join(source for path in CHAPTERS for source in code_of(path))
    assert "asset(" in code
    for name in ("glossary_base.pt", "glossary_chat.pt", "shakespeare_char.pt", "gpu_decode.json", "gpu_train_mfu.json", "ddp_scaling.json",
                 "serve_load_cpu.json", "serve_load_h200.json"):
        assert f'"{name}"' in code and name in lm.assets.names(), name
    for kind in ("cpu", "h200_fp32", "h200_bf16"):  # chapter 4: asset(f"attention_cost_{name}.json")
        assert f'"{kind}"' in code and f"attention_cost_{kind}.json" in lm.assets.names()
    from lm.book import asset

    assert asset("glossary_chat.pt") == lm.assets.path("glossary_chat.pt")
    assert lm.glossary.directory() == lm.assets.path("glossary")
    with pytest.raises(FileNotFoundError, match="glossary_chat.pt"):  # the error lists what there is
        lm.assets.path("no_such_file.json")


def test_package_data_is_declared_for_every_asset():
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lm.assets"]
    root = ROOT / "lm" / "assets"
    for name in lm.assets.names():
        assert any((root / name).match(str(root / p)) for p in patterns), f"{name} would not be installed"


@pytest.fixture(scope="module")
def installed_copy(tmp_path_factory) -> Path:
    """lm installed from its wheel into a folder of its own, as `make nbval` does."""
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lm", src / "lm", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheel"), str(src)], check=True)
    wheel = next((tmp / "wheel").glob("lm-*.whl"))
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True)
    return tmp / "site"


def test_the_installed_copy_wins_over_the_checkout_and_has_its_data(installed_copy, tmp_path):
    probe = """
import json, lm
from lm.book import asset
print(json.dumps({"lm": lm.__file__, "chat": str(asset("glossary_chat.pt")), "names": lm.assets.names(),
                  "glossary": len(lm.glossary.entries()), "model": lm.load_model(asset("glossary_base.pt")).config.n_layer}))
"""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed_copy)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=empty, env=env, capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(seen["lm"]).is_relative_to(installed_copy), "the checkout's (editable) lm was imported"
    assert Path(seen["chat"]).is_relative_to(installed_copy) and Path(seen["chat"]).stat().st_size > 1_000_000
    assert seen["names"] == lm.assets.names()  # every asset made it into the wheel
    assert seen["glossary"] == len(lm.glossary.entries()) and seen["model"] == 4


def test_make_nbval_runs_the_chapters_from_the_installed_copy():
    recipe = (ROOT / "Makefile").read_text().split("\nnbval:", 1)[1].split("\n\n", 1)[0]
    for piece in ("pip wheel", "--target", 'PYTHONPATH="$$tmp/site"', 'cd "$$tmp/book"', "lm.__file__.startswith",
                  "--nbval ."):
        assert piece in recipe
