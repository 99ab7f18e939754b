"""The bundled sample's stories (data/tinystories_sample/train.txt.gz), for tests and tests/kill_harness.py that
need real text: stories(0, 300) is the first 300."""
import gzip
import os

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tinystories_sample",
                      "train.txt.gz")


def stories(first, count):
    """Stories first .. first + count - 1 of the bundled sample, each without its <|endoftext|> line."""
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        return f.read().split("<|endoftext|>\n")[first:first + count]
