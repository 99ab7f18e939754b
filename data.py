"""
nanoslm's token files and the batch reader that feeds training.

    python prepare.py --dataset=bundled        # writes data/bundled/{train.bin, val.bin, meta.json}
    python data.py data/bundled                # checks the files and shows one batch

A token file (.bin) is a 32-byte little-endian header, then the token ids back to back:

    magic     8 bytes   b"NSLMTOK\\x00"
    version   uint32    1
    itemsize  uint32    2 (uint16 ids, vocabularies up to 65,536) or 4 (uint32 ids)
    n_tokens  uint64
    reserved  8 bytes   zero

meta.json beside the files says which tokenizer made them (name, file, content hash), the dtype and the
count of documents, tokens and bytes of each split. prepare.py writes meta.json last, so a directory
with a meta.json holds a complete set.

>>> ds = TokenDataset("data/bundled")
>>> x, y = ds.get_batch("train", batch_size=4, block_size=8, generator=torch.Generator().manual_seed(0))
>>> x.shape, x.dtype, bool((x[:, 1:] == y[:, :-1]).all())
(torch.Size([4, 8]), torch.int64, True)
"""
import hashlib
import json
import os
import struct
import sys
from typing import NamedTuple

import numpy as np
import torch

from system import native

_nanoslm = native()

# -----------------------------------------------------------------------------
# the token file format

MAGIC = b"NSLMTOK\x00"
VERSION = 1
HEADER_BYTES = 32
_HEADER = struct.Struct("<8sIIQ8x")  # magic, version, itemsize, n_tokens, 8 reserved bytes
assert _HEADER.size == HEADER_BYTES


class Header(NamedTuple):
    version: int
    dtype: np.dtype
    n_tokens: int


def token_dtype_for(n_vocab: int) -> np.dtype:
    """The smallest id type that holds every id of a vocabulary of n_vocab tokens (ids 0 .. n_vocab - 1)."""
    if n_vocab <= 0:
        raise ValueError(f"n_vocab must be positive, got {n_vocab}")
    if n_vocab <= 2**16:
        return np.dtype(np.uint16)
    if n_vocab <= 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"a vocabulary of {n_vocab:,} tokens does not fit in uint32 token ids (at most 2**32): "
                     "choose a smaller vocab_size")


def write_header(f, n_tokens: int, dtype) -> None:
    """Write the 32-byte header at f's current position (the start of the file)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.uint16, np.uint32):
        raise ValueError(f"token files hold uint16 or uint32 ids, not {dtype}")
    f.write(_HEADER.pack(MAGIC, VERSION, dtype.itemsize, n_tokens))


def read_header(path: str) -> Header:
    """Read and check a token file's header, including that the file holds exactly n_tokens ids."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no token file at {path}: run prepare.py first (e.g. `python prepare.py "
                                "--dataset=bundled`)")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"{path} is {size} bytes, too short for a token file header ({HEADER_BYTES} bytes): "
                         "it is truncated or still being written; re-run prepare.py")
    magic, version, itemsize, n_tokens = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise ValueError(f"{path} is not a nanoslm token file (magic {magic!r}, expected {MAGIC!r}); "
                         "make it with prepare.py")
    if version != VERSION:
        raise ValueError(f"{path} has token file version {version}, this code reads version {VERSION}: "
                         "re-run prepare.py to rewrite it")
    if itemsize not in (2, 4):
        raise ValueError(f"{path} has itemsize {itemsize}; token files hold uint16 (2) or uint32 (4) ids")
    expected = HEADER_BYTES + n_tokens * itemsize
    if size != expected:
        raise ValueError(f"{path} is {size:,} bytes but its header promises {n_tokens:,} tokens "
                         f"({expected:,} bytes): the file is truncated or still being written; re-run prepare.py")
    return Header(version, np.dtype(np.uint16 if itemsize == 2 else np.uint32), n_tokens)


def open_tokens(path: str) -> np.ndarray:
    """The ids of a token file as a read-only memmap (no copy: pages load as batches touch them)."""
    header = read_header(path)
    if header.n_tokens == 0:  # np.memmap refuses a zero-length map
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_BYTES, shape=(header.n_tokens,))


def write_tokens(path: str, ids, dtype=None) -> None:
    """Write ids as a complete token file (through a temporary file, so a reader never sees half of it)."""
    ids = np.asarray(ids)
    dtype = np.dtype(dtype) if dtype is not None else token_dtype_for(int(ids.max()) + 1 if ids.size else 1)
    if ids.size and (ids.min() < 0 or ids.max() >= 2 ** (8 * dtype.itemsize)):
        raise ValueError(f"ids range {ids.min()}..{ids.max()} does not fit in {dtype}")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write_header(f, ids.size, dtype)
        f.write(ids.astype(dtype).tobytes())
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# batches: the native gather, and the plain reference it must equal


def gather(data: np.ndarray, offsets: torch.Tensor, block_size: int, device="cpu"):
    """x[b] = data[offsets[b] : offsets[b] + T], y[b] = the same window one token later, both (B, T) int64.
    The copy runs in C++ without the GIL, straight into the (pinned, when bound for a GPU) output tensors."""
    batch_size = offsets.numel()
    pin = torch.device(device).type == "cuda"
    x = torch.empty((batch_size, block_size), dtype=torch.int64, pin_memory=pin)
    y = torch.empty((batch_size, block_size), dtype=torch.int64, pin_memory=pin)
    _nanoslm.gather_batch(data, offsets.numpy(), block_size, x.numpy(), y.numpy())
    if torch.device(device).type != "cpu":
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x, y


def gather_reference(data: np.ndarray, offsets: torch.Tensor, block_size: int, device="cpu"):
    """The same batch, nanoGPT-style: one slice, cast and copy per row."""
    T = block_size
    x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in offsets.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in offsets.tolist()])
    return x.to(device), y.to(device)


class TokenDataset:
    """The train and val token files of one prepared directory, checked against meta.json."""

    def __init__(self, data_dir: str, tokenizer=None):
        self.data_dir = data_dir
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"no meta.json in {data_dir}: run prepare.py first (e.g. `python prepare.py "
                                    "--dataset=bundled` writes data/bundled)")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
            self.n_vocab = self.meta["n_vocab"]
            self.eot_token = self.meta["eot_token"]
            self.dtype = np.dtype(self.meta["dtype"])
            splits = {split: (info["file"], info["tokens"]) for split, info in self.meta["splits"].items()}
            if self.dtype not in (np.uint16, np.uint32):
                raise ValueError(f"dtype {self.dtype} is not uint16 or uint32")
            if not (isinstance(self.n_vocab, int) and 0 < self.n_vocab <= 2 ** (8 * self.dtype.itemsize)):
                raise ValueError(f"n_vocab {self.n_vocab!r} does not fit its {self.dtype} token ids")
            if self.eot_token is not None and not (isinstance(self.eot_token, int) and 0 <= self.eot_token < self.n_vocab):
                raise ValueError(f"eot_token {self.eot_token!r} is not an id below n_vocab {self.n_vocab}")
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{meta_path} is not a meta.json of prepare.py ({type(e).__name__}: {e}): "
                             "re-run prepare.py") from None
        self.splits = {}
        for split, (file, n_tokens) in splits.items():
            path = os.path.join(data_dir, file)
            header = read_header(path)
            if header.dtype != self.dtype or header.n_tokens != n_tokens:
                raise ValueError(f"{path} holds {header.n_tokens:,} {header.dtype} tokens but meta.json says "
                                 f"{n_tokens:,} {self.dtype}: the directory mixes two prepare runs; "
                                 "re-run prepare.py")
            self.splits[split] = open_tokens(path)
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a tokenizer other than the one that wrote the files: its ids would mean other text."""
        if tokenizer.content_hash != self.meta["tokenizer_hash"] or tokenizer.n_vocab != self.n_vocab:
            raise ValueError(
                f"tokenizer mismatch: {self.data_dir} was made with {self.meta['tokenizer']!r} "
                f"(n_vocab {self.n_vocab:,}, hash {self.meta['tokenizer_hash'][:12]}) but the given tokenizer is "
                f"{tokenizer.name!r} (n_vocab {tokenizer.n_vocab:,}, hash {tokenizer.content_hash[:12]}); "
                "use dataset.load_tokenizer(), or re-run prepare.py with this tokenizer")

    def load_tokenizer(self):
        """The tokenizer that wrote these files: GPT-2's, or the vocabulary prepare.py trained beside them."""
        from tokenizer import Tokenizer
        if self.meta.get("tokenizer_file"):
            tok = Tokenizer.load(os.path.join(self.data_dir, self.meta["tokenizer_file"]),
                                 name=self.meta["tokenizer"])
        elif self.meta["tokenizer"] == "gpt2":
            tok = Tokenizer.gpt2()
        else:
            raise ValueError(f"meta.json in {self.data_dir} names tokenizer {self.meta['tokenizer']!r} "
                             "but no tokenizer_file; re-run prepare.py")
        self.check_tokenizer(tok)
        return tok

    def keep_fraction(self, split: str, fraction: float) -> None:
        """From now on draw split's windows from its first fraction of tokens only (data-size studies)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"a fraction of the {split} split must be in (0, 1], got {fraction}")
        self.splits[split] = self.splits[split][:int(len(self.splits[split]) * fraction)]

    def _offsets(self, split: str, batch_size: int, block_size: int, generator) -> torch.Tensor:
        if split not in self.splits:
            raise ValueError(f"no split {split!r} in {self.data_dir} (it has {sorted(self.splits)})")
        n = len(self.splits[split])
        if n < block_size + 1:
            raise ValueError(f"the {split} split of {self.data_dir} has {n:,} tokens, fewer than block_size + 1 = "
                             f"{block_size + 1:,}: use a smaller block_size or prepare more text")
        return torch.randint(n - block_size, (batch_size,), generator=generator)

    def epoch_offsets(self, split: str, first: int, count: int, block_size: int, seed: int) -> torch.Tensor:
        """The start offsets of windows first .. first + count - 1 of a stream that reads split in epochs: each
        epoch cuts it into windows of block_size tokens (from a random phase, so the cuts move from epoch to
        epoch), in a random order, every window once. Stateless: window k depends only on (seed, k), so a
        resumed run and N processes draw what one uninterrupted process draws."""
        if split not in self.splits:
            raise ValueError(f"no split {split!r} in {self.data_dir} (it has {sorted(self.splits)})")
        n = len(self.splits[split])
        windows = (n - 1) // block_size - 1  # per epoch: room for the phase, and for the target one token on
        if windows < 1:
            raise ValueError(f"the {split} split of {self.data_dir} has {n:,} tokens, fewer than 2 * block_size "
                             f"+ 1 = {2 * block_size + 1:,}: use a smaller block_size or prepare more text")
        offsets = []
        for k in range(first, first + count):
            epoch, index = divmod(k, windows)
            phase, order = self._epoch_order(split, epoch, windows, block_size, seed)
            offsets.append(phase + int(order[index]) * block_size)
        return torch.tensor(offsets, dtype=torch.int64)

    def _epoch_order(self, split, epoch, windows, block_size, seed):
        """(phase, permutation of the windows) of one epoch, kept for the epoch's batches."""
        key = (split, epoch, windows, block_size, seed)
        if getattr(self, "_order_key", None) != key:
            digest = hashlib.blake2b(f"{seed}/{split}/epoch/{epoch}".encode(), digest_size=8).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)
            phase = int(torch.randint(block_size, (1,), generator=g))
            self._order_key, self._order = key, (phase, torch.randperm(windows, generator=g))
        return self._order

    def get_epoch_batch(self, split: str, first: int, batch_size: int, block_size: int, seed: int, device="cpu"):
        """Windows first .. first + batch_size - 1 of the epochs stream (epoch_offsets): x (B, T) and y."""
        return gather(self.splits[split], self.epoch_offsets(split, first, batch_size, block_size, seed),
                      block_size, device)

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                  device="cpu"):
        """batch_size random windows of split: x (B, T) int64 and y, the next token at each position."""
        offsets = self._offsets(split, batch_size, block_size, generator)
        return gather(self.splits[split], offsets, block_size, device)

    def get_batch_reference(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                            device="cpu"):
        """get_batch done the plain way; the tests and bench/bench_batch.py hold get_batch to it."""
        offsets = self._offsets(split, batch_size, block_size, generator)
        return gather_reference(self.splits[split], offsets, block_size, device)


if __name__ == "__main__":
    data_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join("data", "bundled")
    try:
        ds = TokenDataset(data_dir)
        tok = ds.load_tokenizer()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    for split, ids in ds.splits.items():
        print(f"{split}: {len(ids):,} {ds.dtype} tokens")
    x, y = ds.get_batch("train", batch_size=2, block_size=16, generator=torch.Generator().manual_seed(0))
    for row in x.tolist():
        print(repr(tok.decode(row)))
