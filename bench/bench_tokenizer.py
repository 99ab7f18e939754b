"""
Tokenizer speed against the peers, measured in one run on the same text:
encoding MB/s (one thread, then all threads) against tiktoken and Hugging Face `tokenizers` with the same
GPT-2 vocabulary, and BPE training time against Hugging Face's BpeTrainer.

    python bench/bench_tokenizer.py              # the bundled TinyStories text (4.3 MB)
    python bench/bench_tokenizer.py --repeat=5

Every figure is the median of --repeat runs after one warm-up. Ids are checked equal before timing.
"""
import argparse
import gzip
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tiktoken  # noqa: E402
import tokenizers  # noqa: E402
from tiktoken.load import load_tiktoken_bpe  # noqa: E402
from tokenizers import models, pre_tokenizers, trainers  # noqa: E402

from export import hf_tokenizer  # noqa: E402
from machine import cpu_name  # noqa: E402
from system import default_num_threads  # noqa: E402
from tokenizer import EOT, GPT2_PATTERN, GPT2_RANKS, Tokenizer  # noqa: E402


def machine() -> str:
    return f"{cpu_name()}, {default_num_threads()} threads, Python {platform.python_version()}"


def load_text():
    """The bundled TinyStories text: stories of the train file, paragraphs of the validation file."""
    def read(name):
        with gzip.open(os.path.join(ROOT, "data", "tinystories_sample", name), "rt", encoding="utf-8") as f:
            return f.read()
    docs = [d.strip("\n") for d in read("train.txt.gz").split(EOT)]
    docs += read("valid_blankline_separated.txt.gz").split("\n\n")
    docs = [d for d in docs if d.strip()]
    return "\n\n".join(docs), docs


def timed(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_encode(text, docs, repeat):
    ours = Tokenizer.gpt2()
    ranks = load_tiktoken_bpe(GPT2_RANKS)
    ref = tiktoken.Encoding(name="gpt2", mergeable_ranks=ranks, special_tokens={EOT: 50256}, pat_str=GPT2_PATTERN)
    hf = hf_tokenizer(ours)  # export.py's: the GPT-2 ranks as a HF byte-level BPE, <|endoftext|> special
    threads = default_num_threads()

    assert ours.encode_ordinary(text) == ref.encode_ordinary(text), "ids differ from tiktoken"
    expected = ref.encode_ordinary_batch(docs)
    assert ours.encode_batch(docs) == expected, "batch ids differ from tiktoken"
    assert [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)] == expected, "HF ids differ"
    megabytes = len(text.encode("utf-8")) / 1e6
    print(f"\nencoding {megabytes:.1f} MB ({len(docs):,} documents), GPT-2 vocabulary; the three give the "
          "same ids (checked on every document)")
    rows = [
        ("1 thread", "nanoslm encode_ordinary(text)", lambda: ours.encode_ordinary(text)),
        ("1 thread", "tiktoken encode_ordinary(text)", lambda: ref.encode_ordinary(text)),
        ("1 thread", "HF tokenizers encode(doc) per doc", lambda: [hf.encode(d, add_special_tokens=False) for d in docs]),
        (f"{threads} threads", "nanoslm encode_batch(docs)", lambda: ours.encode_batch(docs, num_threads=threads)),
        (f"{threads} threads", "tiktoken encode_ordinary_batch(docs)",
         lambda: ref.encode_ordinary_batch(docs, num_threads=threads)),
        (f"{threads} threads", "HF tokenizers encode_batch(docs)",
         lambda: hf.encode_batch(docs, add_special_tokens=False)),
    ]
    speeds = {}
    for group, name, fn in rows:
        speeds[name] = megabytes / timed(fn, repeat)
        print(f"  {group:<10} {name:<40} {speeds[name]:7.1f} MB/s")
    print(f"  ratio 1 thread:  {speeds[rows[0][1]] / speeds[rows[1][1]]:.2f}x tiktoken, "
          f"{speeds[rows[0][1]] / speeds[rows[2][1]]:.2f}x HF tokenizers")
    print(f"  ratio {threads} threads: {speeds[rows[3][1]] / speeds[rows[4][1]]:.2f}x tiktoken, "
          f"{speeds[rows[3][1]] / speeds[rows[5][1]]:.2f}x HF tokenizers")


def bench_train(docs, repeat):
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"\nBPE training on {megabytes:.1f} MB ({len(docs):,} documents)")
    for vocab_size in (4096, 8192):
        ours = timed(lambda: Tokenizer.train(docs, vocab_size), repeat)

        def hf_train():
            hf = tokenizers.Tokenizer(models.BPE())
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            hf.train_from_iterator(docs, trainer)
        peer = timed(hf_train, repeat)
        print(f"  vocab {vocab_size}: nanoslm {ours:.3f} s, HF BpeTrainer {peer:.3f} s -> {peer / ours:.1f}x faster")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"versions: tiktoken {tiktoken.__version__}, tokenizers {tokenizers.__version__}")
    text, docs = load_text()
    bench_encode(text, docs, args.repeat)
    bench_train(docs, args.repeat)


if __name__ == "__main__":
    main()
