"""
Batch reading speed: TokenDataset.get_batch (the C++ gather, no GIL) against the nanoGPT way, a Python
loop of slice + astype(int64) + from_numpy and a torch.stack, for x and for y.

    python bench/bench_batch.py                       # on data/bundled, prepared first if missing
    python bench/bench_batch.py --data_dir=data/tinystories --repeat=200

Both readers draw their offsets from generators with the same seed, so they gather the same windows;
the outputs are checked equal before timing. Figures are the median µs per batch over --repeat batches.
"""
import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import prepare  # noqa: E402
from data import TokenDataset  # noqa: E402
from machine import cpu_name  # noqa: E402
from system import default_num_threads  # noqa: E402

SHAPES = [(32, 256), (64, 512), (256, 1024)]  # (batch_size, block_size)


def machine() -> str:
    return (f"{cpu_name()}, {default_num_threads()} cores | Python {platform.python_version()}, "
            f"torch {torch.__version__}, numpy {np.__version__}, torch threads {torch.get_num_threads()}")


def per_batch_us(get_batch, split, B, T, repeat, seed=0) -> float:
    generator = torch.Generator().manual_seed(seed)
    get_batch(split, B, T, generator)  # warm-up: page in the file, grow the allocator
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        get_batch(split, B, T, generator)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data_dir", default=os.path.join(ROOT, "data", "bundled"))
    parser.add_argument("--repeat", type=int, default=100)
    args = parser.parse_args()
    print(machine())
    if not os.path.isfile(os.path.join(args.data_dir, "meta.json")):
        print(f"preparing {args.data_dir} from the bundled corpus")
        prepare.main(["--dataset=bundled", f"--out_dir={os.path.dirname(args.data_dir)}",
                      f"--name={os.path.basename(args.data_dir)}"])
    ds = TokenDataset(args.data_dir)
    print(f"{args.data_dir}: {len(ds.splits['train']):,} {ds.dtype} train tokens, median of {args.repeat} batches")
    print(f"{'B x T':>12} {'get_batch µs':>14} {'reference µs':>14} {'speed-up':>9}")
    for B, T in SHAPES:
        x, y = ds.get_batch("train", B, T, torch.Generator().manual_seed(1))
        x_ref, y_ref = ds.get_batch_reference("train", B, T, torch.Generator().manual_seed(1))
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref), f"get_batch differs from the reference at {B}x{T}"
        native = per_batch_us(ds.get_batch, "train", B, T, args.repeat)
        reference = per_batch_us(ds.get_batch_reference, "train", B, T, args.repeat)
        print(f"{f'{B} x {T}':>12} {native:14.1f} {reference:14.1f} {reference / native:8.1f}x")


if __name__ == "__main__":
    main()
