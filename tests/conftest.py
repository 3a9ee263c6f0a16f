"""Shared fixtures: one torch thread (small models run faster and reproducibly), fixed seeds, tiny models."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

import lm

# No example database: nothing written into the checkout, and every run draws the same examples.
settings.register_profile("lm", database=None, derandomize=True)
settings.load_profile("lm")
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "lm-tests-hypothesis")  # its caches, outside the checkout

# A short text with a repeating pattern: a tiny model learns it in a few dozen steps.
PATTERN_TEXT = "the quick brown fox jumps over the lazy dog. " * 120


def pytest_configure(config):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_config() -> lm.ModelConfig:
    """2 layers, d_model 32: big enough to have every part, small enough to run in milliseconds."""
    return lm.ModelConfig(vocab_size=48, block_size=16, n_layer=2, n_head=4, d_model=32)


@pytest.fixture
def tiny_model(tiny_config) -> lm.GPT:
    return lm.GPT(tiny_config).eval()


@pytest.fixture
def pattern_text() -> str:
    return PATTERN_TEXT


@pytest.fixture
def char_tokenizer(pattern_text) -> lm.CharTokenizer:
    return lm.CharTokenizer.train(pattern_text)


@pytest.fixture
def text_model(char_tokenizer) -> lm.GPT:
    """A tiny untrained model with a character tokenizer attached, so generate() takes text."""
    config = lm.ModelConfig(vocab_size=char_tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, d_model=32)
    return lm.GPT(config, tokenizer=char_tokenizer).eval()


@pytest.fixture(scope="session")
def ranks() -> dict[bytes, int]:
    """GPT-2's BPE ranks (token bytes -> id), from the package index's cache; skips where they cannot be had."""
    from lm.data import DataError
    from lm.tokenizers import gpt2_ranks_path, load_gpt2_ranks

    try:
        gpt2_ranks_path()
    except DataError as err:  # neither cached nor reachable through pip
        pytest.skip(f"GPT-2's ranks are not available: {err}")
    return load_gpt2_ranks()


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty folder for lm's compiled kernels and none of them loaded yet in this process (the
    decoding kernels of lm.cpu_kernels and its causal attention; cleared again afterwards)."""
    from lm import cpu_kernels
    monkeypatch.setenv("LM_KERNEL_DIR", str(tmp_path / "kernels"))
    loaders = (cpu_kernels._load, cpu_kernels._load_causal)
    for load in loaders:
        load.cache_clear()
    yield tmp_path / "kernels"
    for load in loaders:
        load.cache_clear()
