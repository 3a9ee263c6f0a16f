"""Every Python example in the README runs as written, in order, in one namespace (the later
examples use the model the first one trains), in a fresh folder so that runs/ lands there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_python_examples():
    assert len(python_examples()) >= 3


def test_readme_python_examples_run_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)  # the models come from the package (lm.assets), not from the checkout
    namespace: dict = {}
    for number, code in enumerate(python_examples(), start=1):
        try:
            exec(compile(code, f"README.md, python example {number}", "exec"), namespace)
        except Exception as err:  # name the example, then fail with its own traceback
            raise AssertionError(f"README python example {number} failed: {err!r}\n{code}") from err
    assert (tmp_path / "runs" / "shakespeare" / "best.pt").is_file()
    assert (tmp_path / "runs" / "glossary_lora" / "adapters.safetensors").is_file()
    assert 0 <= namespace["result"].token_accuracy <= 1 and namespace["result"].examples == 10
    assert capsys.readouterr().out.strip(), "the examples print generated text"
    assert isinstance(namespace["text"], str) and namespace["config"].max_new_tokens == 100
    assert namespace["reply"].choices[0].message.content  # the server answered the openai client
    assert len(lm_examples(tmp_path / "chat_history.jsonl")) == 1  # and kept the conversation


def lm_examples(path):
    import lm

    return lm.load_examples(path)
