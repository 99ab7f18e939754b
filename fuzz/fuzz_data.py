"""
Fuzzes the token files' reader (data.read_header / open_tokens, over arbitrary file bytes: a valid header
with arbitrary fields, or none) and the native gather_batch(data, offsets, block_size, x, y), over arbitrary
arrays, dtypes, offsets, block sizes and shapes, contiguous or strided.

    FUZZ_SECONDS=600 fuzz/run.sh fuzz/fuzz_data.py         # make fuzz runs every harness

Bad input must raise (harness.REFUSALS); a header that reads must match its file, and a gather that runs must
equal numpy's slices.
"""
import os
import struct
import tempfile

import atheris
import numpy as np

from harness import REFUSALS, main, native

_nanoslm = native()
import data  # noqa: E402 (after native(): it must find the build native() chose)

# The file each input is written to: already unlinked, so that nothing is left behind however the run ends
# (libFuzzer exits without unwinding); reached by its /proc/self/fd path (Linux, as atheris is).
_token_file = tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
TOKEN_FILE = f"/proc/self/fd/{_token_file.fileno()}"
DTYPES = [np.uint16, np.uint32, np.int64, np.int32, np.uint8, np.float32, np.float64, np.bool_]

# -----------------------------------------------------------------------------
# the token file reader


def file_bytes(fdp):
    """A header (magic, version, itemsize, n_tokens: each right or arbitrary) then arbitrary ids, or junk."""
    if fdp.ConsumeIntInRange(0, 4) == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    magic = data.MAGIC if fdp.ConsumeIntInRange(0, 5) else fdp.ConsumeBytes(8).ljust(8, b"\0")
    version = data.VERSION if fdp.ConsumeIntInRange(0, 5) else fdp.ConsumeIntInRange(0, 2**32 - 1)
    itemsize = fdp.PickValueInList([2, 4]) if fdp.ConsumeIntInRange(0, 5) else fdp.ConsumeIntInRange(0, 2**32 - 1)
    payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    n_tokens = len(payload) // max(itemsize, 1) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 2**64 - 1)
    reserved = b"\0" * 8 if fdp.ConsumeIntInRange(0, 5) else fdp.ConsumeBytes(8).ljust(8, b"\0")
    return struct.pack("<8sIIQ", magic, version, itemsize, n_tokens) + reserved + payload


def check_token_file(fdp):
    raw = file_bytes(fdp)
    with open(TOKEN_FILE, "wb") as f:
        f.write(raw)
    try:
        header = data.read_header(TOKEN_FILE)
        ids = data.open_tokens(TOKEN_FILE)
    except ValueError:  # what the reader promises for a bad file: a ValueError saying so
        return None
    assert header.dtype in (np.uint16, np.uint32) and len(raw) == 32 + header.n_tokens * header.dtype.itemsize
    assert ids.dtype == header.dtype and len(ids) == header.n_tokens
    assert ids.tobytes() == raw[32:]
    return ids


# -----------------------------------------------------------------------------
# gather_batch


def some_array(fdp, shape, dtype, values=None):
    """An array of shape and dtype, or a hostile near-miss: another dtype or shape, strided, Fortran-ordered,
    read-only, or not an array at all."""
    kind = fdp.ConsumeIntInRange(0, 12)
    if kind == 1:
        dtype = fdp.PickValueInList(DTYPES)
    elif kind == 2:
        shape = tuple(max(0, s + fdp.ConsumeIntInRange(-1, 1)) for s in shape)
    elif kind == 3:
        shape = shape[:-1] if len(shape) > 1 else shape + (1,)
    if values is None:
        values = fdp.ConsumeIntInRange(0, 2**16) * np.ones(shape, dtype=np.int64)
    with np.errstate(invalid="ignore"):  # (huge ints cast to a small dtype: hostile on purpose)
        a = np.resize(np.asarray(values), shape).astype(dtype, casting="unsafe")
    if kind == 4:  # the same values, every other element of a larger array
        big = np.zeros((2 * a.size,), dtype=a.dtype)
        big[::2] = a.ravel()
        a = big[::2].reshape(shape) if a.ndim == 1 or a.size == 0 else big[::2][:a.size].reshape(shape)
    elif kind == 5 and a.ndim == 2:
        a = np.asfortranarray(a)
    elif kind == 6:
        a.flags.writeable = False
    elif kind == 7:
        return a.tolist()
    elif kind == 8:
        return None
    return a


def check_gather(fdp, ids):
    n = fdp.ConsumeIntInRange(0, 40)
    tokens = ids if ids is not None and fdp.ConsumeBool() else some_array(
        fdp, (n,), fdp.PickValueInList([np.uint16, np.uint32]), np.arange(n) * 7919 % 65536)
    n = len(tokens) if hasattr(tokens, "__len__") else 0
    batch_size = fdp.ConsumeIntInRange(0, 4)
    block_size = fdp.ConsumeIntInRange(-2, n + 2) if fdp.ConsumeIntInRange(0, 9) else fdp.PickValueInList(
        [2**31, 2**62, 2**63 - 1, -2**63])
    offsets = [fdp.ConsumeIntInRange(-2, n) if fdp.ConsumeIntInRange(0, 9) else
               fdp.PickValueInList([-2**63, 2**62, 2**63 - 1, 2**64 - 1]) for _ in range(batch_size)]
    offsets = some_array(fdp, (batch_size,), np.int64 if all(o < 2**63 for o in offsets) else np.uint64, offsets)
    shape = (batch_size, max(block_size, 0) if block_size < 2**16 else 1)
    x, y = some_array(fdp, shape, np.int64), some_array(fdp, shape, np.int64)
    try:
        _nanoslm.gather_batch(tokens, offsets, block_size, x, y)
    except REFUSALS:
        return
    tokens, offsets = np.asarray(tokens), np.asarray(offsets).astype(np.int64)  # offsets cross as int64
    T = block_size
    for b, o in enumerate(offsets.tolist()):
        assert (x[b] == tokens[o:o + T]).all() and (y[b] == tokens[o + 1:o + 1 + T]).all(), (b, o, T)


def test_one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    check_gather(fdp, check_token_file(fdp))


if __name__ == "__main__":
    main(test_one_input, also_instrument=[data.read_header, data.open_tokens])
