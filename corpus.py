"""
Reading a corpus: the documents of .txt, .jsonl and .parquet files (gzipped text too) and of TinyStories on
the Hugging Face hub, cleaning, and the seeded train/val split. prepare.py turns them into token files;
finetune.py --make_data reads stories with them.

    from corpus import read_file
    for doc in read_file("stories.txt"):                  # documents separated by <|endoftext|> lines
        ...
    docs = list(read_file("notes.txt.gz", separator="blankline"))
"""
import itertools
import json
import os
import re
import socket
import unicodedata
from urllib.parse import urlparse

import numpy as np

from files import DataError, read_lines
from tokenizer import EOT

HF_DATASET = "roneneldan/TinyStories"
MAX_DOC_CHARS = 16 << 20  # a longer "document" is a file without separators: refused, so memory stays bounded


class DownloadError(DataError):
    """The hub failed: unlike bad input, the same command may succeed later, so the run stays resumable."""

# --- reading documents: every reader yields the raw text of each document, in file order ----------------

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")


def file_kind(path: str) -> str:
    for suffix in SUFFIXES:
        if path.endswith(suffix):
            return suffix
    raise DataError(f"{path}: unsupported file type; --input takes {', '.join(SUFFIXES)}")


def read_txt(path: str, separator: str, max_doc_chars: int = MAX_DOC_CHARS):
    """Documents of a text file: separated by lines that hold only <|endoftext|>, or by blank lines. A document
    over max_doc_chars (a file without separators, most likely) is an error: memory stays bounded."""
    lines, chars = [], 0
    for lineno, line in read_lines(path):
        is_break = line.strip() == EOT if separator == "eot" else not line.strip()
        if is_break:
            yield "".join(lines).strip("\n")
            lines, chars = [], 0
        else:
            lines.append(line)
            chars += len(line)
            if chars > max_doc_chars:  # one document is held whole: memory would grow with the file
                raise DataError(f"{path}:{lineno}: a document longer than {max_doc_chars:,} characters; "
                                   + ("are the documents separated by lines holding only <|endoftext|>? "
                                      "--separator=blankline splits at blank lines" if separator == "eot" else
                                      "split the file into documents at blank lines"))
    if lines:
        yield "".join(lines).strip("\n")


def read_stories_from_paragraphs(path: str, opening: str = "Once"):
    """Stories of a file whose paragraphs and stories are both separated by blank lines (the bundled
    valid_blankline_separated.txt): a paragraph that begins with `opening` starts a new story, the others join
    the story before them, one line each, as in the <|endoftext|>-separated files. A story that opens some
    other way stays joined to the one before it (in TinyStories' v1 stories, about a third)."""
    story = []
    for paragraph in read_txt(path, "blankline"):
        if not paragraph.strip():  # a second blank line
            continue
        if story and paragraph.startswith(opening):
            yield "\n".join(story)
            story = []
        story.append(paragraph)
    if story:
        yield "\n".join(story)


def read_jsonl(path: str, text_field: str):
    """The text_field of each JSON object, one per line (blank lines are skipped)."""
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") \
                from None
        if not isinstance(obj, dict) or text_field not in obj:
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{path}:{lineno}: no {text_field!r} field (found {found}); pick the field with "
                               "--text_field")
        text = obj[text_field]
        if text is not None and not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: {text_field!r} is a {type(text).__name__}, not a string")
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{path}:{lineno}: {text_field!r} holds a lone surrogate {ascii(text[e.start])}, "
                               "which is not text; fix the line") from None
        yield text or ""


def read_parquet(path: str, text_field: str):
    """The text_field column of a parquet file, read a batch of rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read {path} as parquet: {e}") from None
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {text_field!r} (it has {pf.schema_arrow.names}); pick one "
                           "with --text_field")
    batches = pf.iter_batches(batch_size=4096, columns=[text_field])
    for first_row in itertools.count(0, 4096):
        try:
            batch = next(batches, None)
            texts = batch.column(0).to_pylist() if batch is not None else []
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {path} from row {first_row:,} on: {e}") from None
        if batch is None:
            return
        for text in texts:
            if text is not None and not isinstance(text, str):
                raise DataError(f"{path}: column {text_field!r} holds {type(text).__name__}, not strings")
            yield text or ""


def read_file(path: str, separator: str = "eot", text_field: str = "text", max_doc_chars: int = MAX_DOC_CHARS):
    """The documents of one file of any supported kind, in file order."""
    kind = file_kind(path)
    if kind in (".txt", ".txt.gz"):
        return read_txt(path, separator, max_doc_chars)
    if kind in (".jsonl", ".jsonl.gz"):
        return read_jsonl(path, text_field)
    return read_parquet(path, text_field)


# --- TinyStories from the Hugging Face hub ------------------------------------------------------------------

def check_hub_reachable(timeout: float = 5.0) -> None:
    """Fail in seconds, not after minutes of retries, when the hub cannot be reached at all."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return  # offline mode: datasets answers from its cache or fails at once by itself
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                 timeout=timeout).close()
    except OSError as e:
        raise DownloadError(offline_message(f"{url.hostname} is unreachable: {e}")) from None


def offline_message(reason: str) -> str:
    return (f"could not load {HF_DATASET} from the Hugging Face hub ({reason}). Without network access use "
            "--dataset=bundled (~4,800 stories shipped in data/tinystories_sample) or --input=PATH with your own "
            ".txt/.jsonl/.parquet files")


def read_tinystories(split: str):
    """The stories of one split of TinyStories, streamed from the hub (nothing is held in memory)."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    n_read = 0
    try:
        import datasets
        datasets.logging.set_verbosity_error()
        for row in datasets.load_dataset(HF_DATASET, split=split, streaming=True):
            yield row["text"]
            n_read += 1
    except Exception as e:  # any failure of the download machinery means the same thing to the user
        reason = f"{type(e).__name__}: {str(e)[:200]}"
        if n_read == 0:
            raise DownloadError(offline_message(reason)) from None
        raise DownloadError(f"the download of {HF_DATASET} ({split}) failed after {n_read:,} more stories "
                            f"({reason}); re-run the same command to continue from the last chunk") from None

# --- cleaning, and the train/val split ---------------------------------------------------------------------


def clean(text: str, normalize: bool = False, lowercase: bool = False) -> str:
    """normalize: Unicode NFC, \\r\\n -> \\n, runs of spaces/tabs -> one space, no trailing spaces, at most one
    blank line; lowercase: everything lowercased."""
    if normalize:
        text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
        text = re.sub(r"[ \t]+", " ", text)
        text = re.sub(r" +\n", "\n", text)
        text = re.sub(r"\n{3,}", "\n\n", text)
        text = text.strip()
    if lowercase:
        text = text.lower()
    return text


def val_mask(indices: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """True where document index goes to val: splitmix64 of (seed, index) as a uniform draw in [0, 1)."""
    with np.errstate(over="ignore"):
        z = indices.astype(np.uint64) + np.uint64(seed % 2**64) * np.uint64(0xD1B54A32D192ED03)
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / 2**53 < fraction
