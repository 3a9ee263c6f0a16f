"""The project's set-up files agree with each other."""

import re
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


def test_environment_yml_installs_the_package_itself_without_resolving_again():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert pip_sections == [["--no-deps -e ."]]


def test_makefile_installs_the_pinned_torch_before_the_project():
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.index('"$(TORCH_SPEC)"') < makefile.index('-e ".[book,test]"')
    assert "TORCH_SPEC ?= torch==2.13.0" in makefile
    assert pyproject_requirements()["torch"].startswith(">="), "pyproject must accept the pinned torch"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme
