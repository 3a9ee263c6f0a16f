"""Token data: packing, token files, splits and batches (lm/data.py); corpora are in test_corpora.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lm import DataError, get_batch, train_val_split
from lm.data import Batches, pack_documents, read_tokens, token_dtype, write_tokens


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


def test_read_tokens_names_an_id_beyond_the_vocabulary(tmp_path):
    """Before training, not as an IndexError from the embedding: ids from another tokenizer."""
    path = write_tokens(tmp_path / "train.bin", [3, 299, 7], vocab_size=1000)
    assert read_tokens(path, 300).tolist() == [3, 299, 7]
    with pytest.raises(DataError, match=r"holds id 299, but the tokenizer has 200 tokens \(ids 0..199\).*lm prep"):
        read_tokens(path, 200)


def test_read_tokens_refuses_a_file_cut_inside_an_id(tmp_path):
    path = tmp_path / "train.bin"
    path.write_bytes(b"\x01\x00\x02")  # one and a half uint16 ids
    with pytest.raises(DataError, match="3 bytes, not a whole number of uint16 ids"):
        read_tokens(path, 100)


def test_read_tokens_missing(tmp_path):
    with pytest.raises(DataError, match="lm prep"):
        read_tokens(tmp_path / "train.bin", 100)


# ---- batches for training ---------------------------------------------------------------------------------------
def test_random_batches_match_get_batch():
    ids = torch.arange(500)
    batches = Batches(ids, 4, 16, seed=7)
    generator = torch.Generator().manual_seed(7)
    for _ in range(3):
        [(x, y)] = batches.next_step()
        ex, ey = get_batch(ids, 4, 16, generator)
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_global_batch_is_split_across_micro_batches_and_ranks():
    ids = torch.arange(1000)
    whole = Batches(ids, 8, 10, seed=3).next_step()[0][0]
    accum = torch.cat([x for x, _ in Batches(ids, 4, 10, seed=3, grad_accum_steps=2).next_step()])
    assert torch.equal(whole, accum)
    ranks = [Batches(ids, 2, 10, seed=3, grad_accum_steps=2, rank=r, world_size=2).next_step() for r in range(2)]
    interleaved = torch.cat([ranks[r][m][0] for m in range(2) for r in range(2)])
    assert torch.equal(whole, interleaved)


def test_epoch_sampling_sees_every_window_once_per_epoch():
    ids = torch.arange(10 * 16 + 1)  # exactly 10 windows of 16 with their targets
    batches = Batches(ids, 3, 16, seed=0, mode="epoch")
    assert batches.n_windows == 10
    starts = []
    for _ in range(4):  # 12 windows: one epoch and two more
        [(x, y)] = batches.next_step()
        assert torch.equal(y, x + 1)
        starts += x[:, 0].tolist()
    assert sorted(starts[:10]) == list(range(0, 160, 16))
    assert batches.epoch == 1 and batches.position == 2 and batches.epochs_done == pytest.approx(1.2)
    assert starts[:10] != list(range(0, 160, 16))  # shuffled


@pytest.mark.parametrize("mode", ["random", "epoch"])
def test_batches_resume_from_their_state(mode):
    ids = np.arange(3000, dtype=np.uint16)
    a = Batches(ids, 5, 12, seed=1, mode=mode)
    for _ in range(7):
        a.next_step()
    b = Batches(ids, 5, 12, seed=1, mode=mode)
    b.load_state_dict(a.state_dict())
    for _ in range(60):
        assert torch.equal(a.next_step()[0][0], b.next_step()[0][0])


def test_batch_errors():
    with pytest.raises(DataError, match="sampling mode 'shuffle'"):
        Batches(torch.arange(100), 2, 8, mode="shuffle")
    with pytest.raises(DataError, match="too few for windows of seq_len=100"):
        Batches(torch.arange(50), 2, 100)
    with pytest.raises(DataError, match="same sampling mode"):
        Batches(torch.arange(100), 2, 8, mode="epoch").load_state_dict(Batches(torch.arange(100), 2, 8).state_dict())
