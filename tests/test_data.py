"""
Token files and batches: the header's round trip and every refusal, uint16/uint32 ids, and get_batch
(the C++ gather) against the plain reference.

    python -m pytest tests/test_data.py -q
"""
import json
import os
import struct

import numpy as np
import pytest
import torch

import data
from data import TokenDataset, open_tokens, read_header, token_dtype_for, write_header, write_tokens
from tokenizer import Tokenizer


def header_bytes(magic=data.MAGIC, version=1, itemsize=2, n_tokens=0):
    return struct.pack("<8sIIQ8x", magic, version, itemsize, n_tokens)


# --- the file format ------------------------------------------------------------------------------------

def test_header_layout_is_32_little_endian_bytes(tmp_path):
    path = str(tmp_path / "t.bin")
    with open(path, "wb") as f:
        write_header(f, 3, np.uint16)
        f.write(np.array([1, 2, 3], dtype="<u2").tobytes())
    raw = open(path, "rb").read()
    assert raw[:32] == b"NSLMTOK\x00" + (1).to_bytes(4, "little") + (2).to_bytes(4, "little") \
        + (3).to_bytes(8, "little") + bytes(8)
    assert read_header(path) == (1, np.dtype(np.uint16), 3)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_write_read_round_trip(tmp_path, dtype):
    ids = np.array([0, 5, 50256, 65535] + ([70000, 2**32 - 1] if dtype == np.uint32 else []), dtype=np.int64)
    path = str(tmp_path / "t.bin")
    write_tokens(path, ids, dtype)
    header = read_header(path)
    assert header.dtype == np.dtype(dtype) and header.n_tokens == len(ids)
    tokens = open_tokens(path)
    assert isinstance(tokens, np.memmap) and not tokens.flags.writeable
    assert tokens.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(tokens, ids)


def test_empty_token_file_opens(tmp_path):
    path = str(tmp_path / "t.bin")
    write_tokens(path, np.zeros(0, dtype=np.int64), np.uint16)
    assert len(open_tokens(path)) == 0


def test_token_dtype_for():
    assert token_dtype_for(256) == np.uint16
    assert token_dtype_for(50257) == np.uint16
    assert token_dtype_for(65536) == np.uint16  # ids 0..65535 still fit
    assert token_dtype_for(65537) == np.uint32
    assert token_dtype_for(70000) == np.uint32
    assert token_dtype_for(2**32) == np.uint32
    with pytest.raises(ValueError, match="does not fit in uint32"):
        token_dtype_for(2**32 + 1)


def test_write_tokens_refuses_ids_too_big_for_the_dtype(tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        write_tokens(str(tmp_path / "t.bin"), [70000], np.uint16)


def test_missing_file_says_run_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="run prepare.py first"):
        read_header(str(tmp_path / "nope.bin"))


@pytest.mark.parametrize("raw, message", [
    (b"NSLM", "too short"),
    (header_bytes(magic=b"NOTMAGIC"), "not a nanoslm token file"),
    (header_bytes(version=2), "version 2"),
    (header_bytes(itemsize=8), "itemsize 8"),
    (header_bytes(n_tokens=10) + bytes(2 * 9), "truncated or still being written"),
    (header_bytes(n_tokens=10) + bytes(2 * 11), "truncated or still being written"),
])
def test_bad_headers_are_refused(tmp_path, raw, message):
    path = tmp_path / "t.bin"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=message):
        read_header(str(path))


# --- a prepared directory -------------------------------------------------------------------------------

def make_dataset(directory, train_ids, val_ids, dtype=np.uint16, tokenizer=None):
    """A data directory as prepare.py leaves it, around given ids."""
    tokenizer = tokenizer or Tokenizer.gpt2()
    os.makedirs(directory, exist_ok=True)
    splits = {}
    for split, ids in (("train", train_ids), ("val", val_ids)):
        write_tokens(os.path.join(directory, f"{split}.bin"), ids, dtype)
        splits[split] = {"file": f"{split}.bin", "documents": 1, "tokens": len(ids), "bytes": len(ids)}
    meta = {"tokenizer": tokenizer.name, "tokenizer_file": None, "tokenizer_hash": tokenizer.content_hash,
            "n_vocab": tokenizer.n_vocab, "eot_token": tokenizer.eot_token, "dtype": np.dtype(dtype).name,
            "splits": splits}
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(directory)


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.gpt2()


@pytest.fixture
def dataset(tmp_path, gpt2):
    rng = np.random.default_rng(0)
    train = rng.integers(0, gpt2.n_vocab, size=5000)
    val = rng.integers(0, gpt2.n_vocab, size=300)
    return TokenDataset(make_dataset(tmp_path / "d", train, val, tokenizer=gpt2), tokenizer=gpt2)


def test_get_batch_shapes_and_targets(dataset):
    x, y = dataset.get_batch("train", 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    data = torch.from_numpy(np.asarray(dataset.splits["train"]).astype(np.int64))
    for row_x, row_y in zip(x, y):
        # each row is a window of the file, and y is the same window one token later
        starts = [i for i in range(len(data) - 16) if torch.equal(data[i:i + 16], row_x)]
        assert starts, "x is not a window of the token file"
        assert any(torch.equal(data[i + 1:i + 17], row_y) for i in starts)


def test_get_batch_equals_the_reference(dataset):
    for split, B, T in (("train", 8, 16), ("train", 3, 4999), ("val", 5, 64), ("val", 1, 1)):
        x, y = dataset.get_batch(split, B, T, torch.Generator().manual_seed(42))
        x_ref, y_ref = dataset.get_batch_reference(split, B, T, torch.Generator().manual_seed(42))
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref), (split, B, T)


def test_get_batch_with_uint32_ids(tmp_path):
    vocab = Tokenizer({bytes([i]): i for i in range(256)}, {"<|endoftext|>": 70000 - 1})  # n_vocab 70,000
    ids = 65536 + np.arange(100, dtype=np.int64) * 30  # all beyond uint16
    d = make_dataset(tmp_path / "d", ids, ids, dtype=np.uint32, tokenizer=vocab)
    ds = TokenDataset(d)
    assert ds.splits["train"].dtype == np.uint32
    x, y = ds.get_batch("train", 4, 10, torch.Generator().manual_seed(0))
    x_ref, y_ref = ds.get_batch_reference("train", 4, 10, torch.Generator().manual_seed(0))
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert int(x.min()) > 65535 and int(y.max()) < 70000


def test_get_batch_reproducible_from_the_seed(dataset):
    a = dataset.get_batch("train", 8, 32, torch.Generator().manual_seed(7))
    b = dataset.get_batch("train", 8, 32, torch.Generator().manual_seed(7))
    c = dataset.get_batch("train", 8, 32, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_generator_advances_between_batches(dataset):
    g = torch.Generator().manual_seed(7)
    first, second = dataset.get_batch("train", 8, 32, g)[0], dataset.get_batch("train", 8, 32, g)[0]
    assert not torch.equal(first, second)


def test_gather_checks_what_it_reads_and_writes():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = np.zeros((2, 8), np.int64), np.zeros((2, 8), np.int64)
    strided = np.array([3, 10**12, 50, 10**12])[::2]  # a view: offsets 3 and 50, read through its strides
    data._nanoslm.gather_batch(tokens, strided, 8, x, y)
    assert x[:, 0].tolist() == [3, 50] and y[:, 0].tolist() == [4, 51]
    for bad in (np.array([10**12, 0, 10**12, 0])[::2], np.array([2**63 - 3, 0])):  # past the end; overflowing
        with pytest.raises(IndexError, match="leaves no room"):
            data._nanoslm.gather_batch(tokens, bad, 8, x, y)
    with pytest.raises(ValueError, match="int64 array"):  # an int32 output would be filled as a hidden copy
        data._nanoslm.gather_batch(tokens, np.array([0, 1]), 8, np.zeros((2, 8), np.int32), y)
    with pytest.raises(ValueError, match="int64 array"):
        data._nanoslm.gather_batch(tokens, np.array([0, 1]), 8, x, np.zeros((2, 8), np.int64)[:, ::1].T.copy().T)


def test_split_too_small(dataset):
    dataset.get_batch("val", 2, 299, torch.Generator())  # 300 tokens hold exactly one window of 299 + 1
    with pytest.raises(ValueError, match="fewer than block_size"):
        dataset.get_batch("val", 2, 300, torch.Generator())
    with pytest.raises(ValueError, match="no split 'test'"):
        dataset.get_batch("test", 2, 8, torch.Generator())


def test_epoch_offsets_read_every_window_once_an_epoch(dataset):
    """5,000 tokens in windows of 64: 77 an epoch, each once, in a random order, the cuts moved by each epoch's
    phase; any run of windows is the same whichever calls drew it (a resumed run, other processes)."""
    T, n = 64, 5000
    windows = (n - 1) // T - 1
    stream = dataset.epoch_offsets("train", 0, 3 * windows, T, seed=1).tolist()
    phases = set()
    for e in range(3):
        epoch = sorted(stream[e * windows:(e + 1) * windows])
        phase = epoch[0] % T
        assert epoch == [phase + i * T for i in range(windows)], e  # every window of the epoch once
        assert epoch[-1] + T + 1 <= n  # the last window's target is in the split
        assert stream[e * windows:(e + 1) * windows] != epoch  # not in file order
        phases.add(phase)
    assert len(phases) > 1
    assert dataset.epoch_offsets("train", 70, 20, T, seed=1).tolist() == stream[70:90]  # across an epoch's end
    assert dataset.epoch_offsets("train", 0, windows, T, seed=2).tolist() != stream[:windows]
    x, y = dataset.get_epoch_batch("train", 70, 20, T, seed=1)
    x_ref, y_ref = data.gather_reference(dataset.splits["train"], torch.tensor(stream[70:90]), T)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    with pytest.raises(ValueError, match="fewer than 2 \\* block_size"):
        dataset.epoch_offsets("val", 0, 1, 150, seed=1)  # 300 tokens: no room for a phase
    with pytest.raises(ValueError, match="no split 'test'"):
        dataset.epoch_offsets("test", 0, 1, 8, seed=1)


def test_mismatched_tokenizer_is_refused(tmp_path, gpt2):
    other = Tokenizer({bytes([i]): i for i in range(256)}, {"<|endoftext|>": 256}, name="bytes")
    d = make_dataset(tmp_path / "d", np.arange(100), np.arange(100), tokenizer=gpt2)
    TokenDataset(d, tokenizer=gpt2)
    with pytest.raises(ValueError, match=r"tokenizer mismatch.*'gpt2'.*'bytes'"):
        TokenDataset(d, tokenizer=other)


def test_missing_meta_says_run_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="run prepare.py first"):
        TokenDataset(str(tmp_path))


def test_broken_meta_is_one_clear_error(tmp_path, gpt2):
    d = make_dataset(tmp_path / "d", np.arange(100), np.arange(100), tokenizer=gpt2)
    meta_path = os.path.join(d, "meta.json")
    meta = json.load(open(meta_path))
    del meta["splits"]["val"]["tokens"]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match="meta.json is not a meta.json of prepare.py.*KeyError"):
        TokenDataset(d)
    open(meta_path, "w").write('{"n_vocab": 50257,')
    with pytest.raises(ValueError, match="meta.json is not a meta.json of prepare.py.*JSONDecodeError"):
        TokenDataset(d)


@pytest.mark.parametrize("key, value, message", [
    ("n_vocab", 10 ** 12, "n_vocab 1000000000000 does not fit its uint16 token ids"),  # no 10^12-row embedding
    ("n_vocab", -5, "n_vocab -5 does not fit"),
    ("n_vocab", "50257", "does not fit"),
    ("eot_token", 70000, "eot_token 70000 is not an id below n_vocab 50257"),
    ("dtype", "float64", "dtype float64 is not uint16 or uint32"),
])
def test_meta_with_absurd_sizes_is_refused(tmp_path, gpt2, key, value, message):
    d = make_dataset(tmp_path / "d", np.arange(100), np.arange(100), tokenizer=gpt2)
    meta_path = os.path.join(d, "meta.json")
    meta = json.load(open(meta_path))
    meta[key] = value
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match="meta.json is not a meta.json of prepare.py.*" + message):
        TokenDataset(d)


def test_meta_disagreeing_with_the_files_is_refused(tmp_path, gpt2):
    d = make_dataset(tmp_path / "d", np.arange(100), np.arange(100), tokenizer=gpt2)
    write_tokens(os.path.join(d, "val.bin"), np.arange(50), np.uint16)  # another run's file
    with pytest.raises(ValueError, match="mixes two prepare runs"):
        TokenDataset(d)
    write_tokens(os.path.join(d, "val.bin"), np.arange(100), np.uint32)
    with pytest.raises(ValueError, match="mixes two prepare runs"):
        TokenDataset(d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_get_batch_on_cuda(dataset):
    x, y = dataset.get_batch("train", 8, 64, torch.Generator().manual_seed(3), device="cuda")
    x_ref, y_ref = dataset.get_batch_reference("train", 8, 64, torch.Generator().manual_seed(3))
    assert x.is_cuda and y.is_cuda
    assert torch.equal(x.cpu(), x_ref) and torch.equal(y.cpu(), y_ref)
