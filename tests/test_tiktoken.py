"""`TiktokenTokenizer`: GPT-2's tokenizer, offline, checked against tiktoken's own r50k_base."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import subprocess

import pytest
import tiktoken
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lm
from lm import TokenizerError, load_tokenizer
from lm.data import DataError
from lm.tokenizers import TiktokenTokenizer, gpt2_ranks_path, tokenizer_from_dict

R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's expected_hash


@pytest.fixture(scope="module")
def ranks_file():
    try:
        return gpt2_ranks_path()
    except DataError as err:  # neither cached nor reachable through pip
        pytest.skip(f"GPT-2's ranks are not available: {err}")


@pytest.fixture(scope="module")
def tok(ranks_file) -> TiktokenTokenizer:
    return TiktokenTokenizer()


@pytest.fixture(scope="module")
def reference(ranks_file, tmp_path_factory) -> tiktoken.Encoding:
    """tiktoken's own r50k_base: its download cache is filled with lm's copy, so
    `tiktoken.get_encoding` builds the encoding with tiktoken's pattern and special tokens, after
    checking the file's hash, without any network."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    shutil.copy(ranks_file, cache / hashlib.sha1(R50K_URL.encode()).hexdigest())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        return tiktoken.get_encoding("r50k_base")


def test_ranks_file_is_tiktokens_r50k_base(ranks_file):
    assert hashlib.sha256(ranks_file.read_bytes()).hexdigest() == R50K_SHA256


# ---- known ids ---------------------------------------------------------------------------------------
def test_known_ids(tok):
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    assert tok.encode(" the") == [262]
    assert tok.decode([15496, 11, 995, 0]) == "Hello, world!"


def test_vocabulary(tok):
    assert tok.vocab_size == len(tok) == 50257
    assert tok.special_tokens == {"<|endoftext|>": 50256}
    assert tok.eos_id == 50256 and tok.bos_id is None and tok.pad_id is None
    assert tok.encoding.n_vocab == 50257


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_ids_match_tiktoken_r50k_base(tok, reference, text):
    assert tok.encode(text) == reference.encode(text, allowed_special="all")
    assert tok.encode(text, allowed_special="none") == reference.encode_ordinary(text)


def test_ids_match_on_tricky_text(tok, reference):
    for text in ["Hello, world!", "  spaces   and\ttabs\n\n", "don't we'll I've", "日本語 😀 naïve",
                 "1234567 + 89", "<|endoftext|>between<|endoftext|>"]:
        assert tok.encode(text) == reference.encode(text, allowed_special="all")
        assert tok.encode(text, allowed_special="none") == reference.encode_ordinary(text)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allowed_special="none")) == text


# ---- special tokens ----------------------------------------------------------------------------------
def test_special_tokens_in_text(tok):
    text = "one<|endoftext|>two"
    assert 50256 in tok.encode(text)
    assert tok.encode(text) == tok.encode(text, allowed_special={"<|endoftext|>"})
    as_text = tok.encode(text, allowed_special="none")
    assert 50256 not in as_text and tok.decode(as_text) == text
    assert tok.encode(text, allowed_special=set()) == as_text


def test_bad_allowed_special(tok):
    with pytest.raises(TokenizerError, match="<\\|im_start\\|>"):
        tok.encode("x", allowed_special={"<|im_start|>"})
    with pytest.raises(TokenizerError, match="'some'"):
        tok.encode("x", allowed_special="some")


def test_decode_out_of_range(tok):
    with pytest.raises(TokenizerError, match="id 50257 is out of range"):
        tok.decode([50257])


def test_encode_needs_a_str(tok):
    with pytest.raises(TokenizerError, match="bytes"):
        tok.encode(b"Hello")


# ---- where the ranks come from -----------------------------------------------------------------------
def _no_network(name):
    raise ConnectionError(f"no network for {name}")


def test_offline_default_never_calls_get_encoding(ranks_file, monkeypatch):
    monkeypatch.setattr(tiktoken, "get_encoding", _no_network)
    assert TiktokenTokenizer().encode("Hello, world!") == [15496, 11, 995, 0]
    assert TiktokenTokenizer("r50k_base").encode("Hello, world!") == [15496, 11, 995, 0]


def test_lm_gpt2_ranks_variable(ranks_file, tmp_path, monkeypatch):
    copy = tmp_path / "ranks" / "gpt2.tiktoken"
    copy.parent.mkdir()
    shutil.copy(ranks_file, copy)
    monkeypatch.setattr(tiktoken, "get_encoding", _no_network)
    monkeypatch.setenv("LM_GPT2_RANKS", str(copy))
    assert gpt2_ranks_path() == copy
    assert TiktokenTokenizer(source="lm").encode("Hello, world!") == [15496, 11, 995, 0]


def test_missing_ranks_file_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_GPT2_RANKS", str(tmp_path / "nothing.tiktoken"))
    with pytest.raises(TokenizerError) as err:
        TiktokenTokenizer()
    assert "LM_GPT2_RANKS" in str(err.value) and "source='tiktoken'" in str(err.value)


def test_source_tiktoken_uses_tiktokens_own_encoding(reference):
    tok = TiktokenTokenizer("r50k_base", source="tiktoken")
    assert tok.encoding is reference  # what tiktoken.get_encoding returns
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]


def test_source_tiktoken_offline_is_explained(monkeypatch):
    monkeypatch.setattr(tiktoken, "get_encoding", _no_network)
    with pytest.raises(TokenizerError) as err:
        TiktokenTokenizer("gpt2", source="tiktoken")
    assert "ConnectionError" in str(err.value) and "source='lm'" in str(err.value)


def test_unknown_encoding_name():
    with pytest.raises(TokenizerError) as err:
        TiktokenTokenizer("gpt5")
    assert "unknown tiktoken encoding 'gpt5'" in str(err.value) and "'gpt2'" in str(err.value)


def test_bad_source_and_no_offline_copy():
    with pytest.raises(TokenizerError, match="source='web'"):
        TiktokenTokenizer(source="web")
    with pytest.raises(TokenizerError, match="offline copy"):
        TiktokenTokenizer("cl100k_base", source="lm")


# ---- persistence and use in a model ------------------------------------------------------------------
def test_to_dict_stores_only_the_name(tok):
    assert tok.to_dict() == {"kind": "tiktoken", "name": "gpt2"}
    buffer = io.BytesIO()
    torch.save({"tokenizer": tok.to_dict()}, buffer)
    buffer.seek(0)
    loaded = tokenizer_from_dict(torch.load(buffer, weights_only=True)["tokenizer"])
    assert isinstance(loaded, TiktokenTokenizer) and loaded.encode("Hi there") == tok.encode("Hi there")


def test_save_load_json(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert json.loads(path.read_text()) == {"kind": "tiktoken", "name": "gpt2"}
    for loaded in (load_tokenizer(path), TiktokenTokenizer.load(path)):
        assert loaded.encode("Hello, world!") == [15496, 11, 995, 0]
    with pytest.raises(TokenizerError, match="expected a 'tiktoken' tokenizer"):
        TiktokenTokenizer.from_dict({"kind": "char"})


# ---- loading never downloads ------------------------------------------------------------------------
@pytest.fixture
def network_calls(monkeypatch) -> list:
    """Refuses every connection (sockets, and the subprocess that `pip download` would be); returns
    the list of attempts, which a test expects to stay empty."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:2])
        raise ConnectionRefusedError("the test forbids network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    return calls


def test_loading_uses_cached_ranks_offline(ranks_file, tmp_path, network_calls):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"kind": "tiktoken", "name": "gpt2"}))
    assert load_tokenizer(path).encode("Hello, world!") == [15496, 11, 995, 0]
    assert network_calls == []


@pytest.mark.parametrize("name", ["gpt2", "r50k_base"])
def test_loading_without_cached_ranks_fails_clearly_without_downloading(tmp_path, monkeypatch, network_calls, name):
    monkeypatch.setenv("LM_DATA_DIR", str(tmp_path / "empty"))  # no ranks cached there
    monkeypatch.delenv("LM_GPT2_RANKS", raising=False)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"kind": "tiktoken", "name": name}))
    with pytest.raises(TokenizerError, match=r"GPT-2's ranks are not cached at .*gpt2\.tiktoken.*LM_GPT2_RANKS"):
        load_tokenizer(path)
    assert network_calls == []
    assert not (tmp_path / "empty").exists()


def test_loading_an_encoding_lm_has_no_copy_of_never_downloads(tmp_path, network_calls):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"kind": "tiktoken", "name": "cl100k_base"}))
    with pytest.raises(TokenizerError, match=r"offline copy of \('gpt2', 'r50k_base'\) only.*source='tiktoken'"):
        load_tokenizer(path)
    with pytest.raises(TokenizerError, match="download=False"):
        TiktokenTokenizer("cl100k_base", download=False)
    assert network_calls == []


def test_model_generates_with_gpt2_tokenizer(tok):
    config = lm.ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16)
    model = lm.GPT(config, tokenizer=tok)
    text = model.generate("Hello, world", max_new_tokens=4, seed=0)
    assert isinstance(text, str)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=60))
def test_streamed_text_equals_decoding_everything(tok, text):
    """Streaming hands each token's bytes to an incremental UTF-8 decoder (`decode_bytes`): the
    pieces join to the whole decode, also where a character's bytes span several tokens."""
    from lm.generation import TextStream

    ids = tok.encode(text)
    stream = TextStream(tok)
    pieces = [stream.add(i) for i in ids]
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert "".join(pieces) + stream.pending == tok.decode(ids) == text
