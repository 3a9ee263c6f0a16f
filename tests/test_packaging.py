"""The project's set-up files agree with each other."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name where they differ
NOT_PACKAGES = {"python", "pip"}  # conda entries that are the interpreter and installer themselves


def _split(requirement: str) -> tuple[str, str]:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement).groups()
    return name.lower().replace("_", "-"), spec.replace(" ", "")


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs.extend(extra)
    return dict(_split(r) for r in reqs)


def conda_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pairs = [_split(d) for d in env["dependencies"] if isinstance(d, str)]
    return {name: spec for name, spec in pairs if name not in NOT_PACKAGES}


def test_environment_yml_lists_the_pyproject_dependencies():
    expected = {CONDA_NAMES.get(name, name): spec for name, spec in pyproject_requirements().items()}
    assert conda_requirements() == expected


def test_environment_yml_installs_the_package_itself_with_lines_pip_accepts(tmp_path):
    # conda (and Binder's repo2docker) write the pip section to a requirements file next to
    # environment.yml and run `pip install -r` on it: parse it the way pip does. In a separate
    # process: pip's internals import the standard library's distutils, which breaks a later
    # `import setuptools` (torch.compile's) in this one.
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(line.replace(" .", f" {ROOT}") for line in pip_sections[0]) + "\n")
    parse = ("import json, sys\n"
             "from pip._internal.network.session import PipSession\n"
             "from pip._internal.req.req_file import parse_requirements\n"
             "print(json.dumps([[r.requirement, r.is_editable] for r in "
             "parse_requirements(sys.argv[1], session=PipSession())]))\n")
    out = subprocess.run([sys.executable, "-c", parse, str(requirements)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[str(ROOT), True]]


def test_makefile_installs_the_pinned_torch_before_the_project():
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.index('"$(TORCH_SPEC)"') < makefile.index('-e ".[book,serve,test]"')
    assert "TORCH_SPEC ?= torch==2.13.0" in makefile
    assert pyproject_requirements()["torch"].startswith(">="), "pyproject must accept the pinned torch"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme


# ---- the core package needs none of the book's extras ----------------------------------------------
BOOK_ONLY = ("matplotlib", "ipywidgets", "IPython")

WITHOUT_BOOK_EXTRAS = f"""
import sys

class Blocked:
    # a meta path finder that makes the book's packages look uninstalled
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BOOK_ONLY!r}:
            raise ImportError(f"{{name}} is blocked: it belongs to the book extra")
        return None

sys.meta_path.insert(0, Blocked())

import torch
import lm

text = "to be or not to be, that is the question. " * 20
tok = lm.CharTokenizer.train(text)
ids = torch.tensor(tok.encode(text))
train_ids, val_ids = lm.train_val_split(ids)
config = lm.ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16)
model = lm.GPT(config, tokenizer=tok)
config = lm.TrainConfig(max_steps=2, batch_size=2, eval_interval=1, eval_iters=1, warmup_steps=0,
                        progress=False)
history = lm.train(model, train_ids, val_ids, config)
assert len(history.loss) == 2, history.loss
assert isinstance(model.generate("to be", max_new_tokens=5), str)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BOOK_ONLY!r})
assert not loaded, loaded
"""


def test_lm_trains_and_generates_without_the_book_extras():
    result = subprocess.run([sys.executable, "-c", WITHOUT_BOOK_EXTRAS], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_book_packages_are_an_extra_not_core_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_split(r)[0] for r in project["dependencies"]}
    book = {_split(r)[0] for r in project["optional-dependencies"]["book"]}
    assert {"matplotlib", "ipywidgets", "ipython"} <= book
    assert not core & {"matplotlib", "ipywidgets", "ipython", "pygments"}


def test_import_lm_reaches_quantize():
    result = subprocess.run([sys.executable, "-c", "import lm; print(lm.quantize.quantize_int8.__name__)"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "quantize_int8"
