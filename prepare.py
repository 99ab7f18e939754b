"""
Turn a text corpus into the token files that train.py reads: data/<name>/{train.bin, val.bin, meta.json}.

    python prepare.py --dataset=bundled                    # 4,043 TinyStories shipped in the repo (seconds)
    python prepare.py                                      # TinyStories from the Hugging Face hub (~2.1M stories)
    python prepare.py --dataset=bundled --vocab_size=4096  # train a BPE vocabulary on the train split too
    python prepare.py --input=stories.txt                  # documents separated by <|endoftext|> lines
    python prepare.py --input=notes.txt.gz --separator=blankline
    python prepare.py --input a.jsonl b.jsonl --text_field=content --normalize
    python prepare.py --input=train.parquet --val_input=val.parquet --name=mycorpus

Each document becomes its tokens followed by <|endoftext|>. Without --val_input, each document goes to val
with probability --val_fraction, decided from (--seed, its index) alone, so the split needs no second pass.
Text is read and tokenized in chunks, so memory stays flat on any corpus size. An interrupted run
(Ctrl-C, a crash) picks up where it stopped when re-run with the same options; meta.json is written last,
and a previous complete output in the same directory stays intact until the new one is complete.
"""
import argparse
import gzip
import hashlib
import itertools
import json
import os
import re
import socket
import sys
import unicodedata
import zlib
from urllib.parse import urlparse

import numpy as np
from tqdm import tqdm

from data import HEADER_BYTES, TokenDataset, read_header, token_dtype_for, write_header
from tokenizer import EOT, Tokenizer, atomic_write, special_tokens_path

ROOT = os.path.dirname(os.path.abspath(__file__))
BUNDLED = os.path.join(ROOT, "data", "tinystories_sample", "train.txt.gz")
HF_DATASET = "roneneldan/TinyStories"
SPLITS = ("train", "val")
STATE_FILE = ".prepare_state.json"
CHUNK_CHARS = 16 << 20  # characters of text tokenized at a time: bounds memory, and the work lost to a crash


class PrepareError(Exception):
    """A problem with the user's input or options: reported as one line, without a traceback."""


class DownloadError(PrepareError):
    """The hub failed: unlike bad input, the same command may succeed later, so the run stays resumable."""


def build_parser() -> argparse.ArgumentParser:
    # The docstring as the description, as train.py/sample.py/... print theirs (configurator.help_text).
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["tinystories", "bundled"], default="tinystories",
                     help="tinystories: download roneneldan/TinyStories from the Hugging Face hub; bundled: the "
                          "4,043 stories in data/tinystories_sample/train.txt.gz (no network). Default tinystories")
    # extend: --input=a --input=b means both files (the = form takes one value, so the last would win)
    p.add_argument("--input", nargs="+", action="extend", metavar="PATH",
                     help="local files instead of --dataset: .txt, .txt.gz, .jsonl, .jsonl.gz or .parquet")
    p.add_argument("--val_input", nargs="+", action="extend", metavar="PATH",
                   help="files that make the val split (the source is then all train); default: a seeded split")
    p.add_argument("--separator", choices=["eot", "blankline"], default="eot",
                   help="how .txt documents are separated: a line holding only <|endoftext|> (eot), or "
                        "blank lines (blankline). Default eot")
    p.add_argument("--text_field", default="text", help="the text field of .jsonl objects and .parquet rows")
    p.add_argument("--val_fraction", type=float, default=0.1,
                   help="share of documents for val (default 0.1); not used with --val_input or with "
                        "--dataset=tinystories, which has its own validation split")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val split (default 1337)")
    p.add_argument("--normalize", action="store_true",
                   help="Unicode NFC, runs of spaces/tabs to one space, no trailing spaces, at most one blank line")
    p.add_argument("--lowercase", action="store_true", help="lowercase all text")
    p.add_argument("--tokenizer", choices=["gpt2"], default="gpt2", help="the vocabulary to use (default gpt2)")
    p.add_argument("--vocab_size", type=int,
                   help="train a BPE vocabulary of this many tokens on the train split instead of using GPT-2's; "
                        "saved as <out_dir>/<name>/tokenizer.tiktoken")
    p.add_argument("--name", help="output directory name under --out_dir (default: the dataset name or the "
                                  "first input's stem, plus _bpe<N> with --vocab_size)")
    p.add_argument("--out_dir", default="data", help="parent of the output directory (default data)")
    return p

# -----------------------------------------------------------------------------
# reading documents: every reader yields the raw text of each document, in file order

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")


def file_kind(path: str) -> str:
    for suffix in SUFFIXES:
        if path.endswith(suffix):
            return suffix
    raise PrepareError(f"{path}: unsupported file type; --input takes {', '.join(SUFFIXES)}")


def read_lines(path: str):
    """(line number, text) of each line of a UTF-8 text file (gzipped if it ends in .gz), with \\n endings."""
    opener = gzip.open if path.endswith(".gz") else open
    offset = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    where = "uncompressed byte" if path.endswith(".gz") else "byte"
                    raise PrepareError(f"{path} is not valid UTF-8: {e.reason} at {where} {offset + e.start:,} "
                                       f"(line {lineno}); convert it to UTF-8 first") from None
                offset += len(raw)
                if lineno == 1:
                    line = line.lstrip("\ufeff")  # a byte order mark is not text
                if line.endswith("\r\n"):
                    line = line[:-2] + "\n"
                yield lineno, line
    except (gzip.BadGzipFile, EOFError, OSError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise PrepareError(f"no such file: {path}") from None
        raise PrepareError(f"cannot read {path}: {e}") from None


def read_txt(path: str, separator: str):
    """Documents of a text file: separated by lines that hold only <|endoftext|>, or by blank lines."""
    lines, chars = [], 0
    for lineno, line in read_lines(path):
        is_break = line.strip() == EOT if separator == "eot" else not line.strip()
        if is_break:
            yield "".join(lines).strip("\n")
            lines, chars = [], 0
        else:
            lines.append(line)
            chars += len(line)
            if chars > CHUNK_CHARS:  # one document is held whole: memory would grow with the file
                raise PrepareError(f"{path}:{lineno}: a document longer than {CHUNK_CHARS:,} characters; "
                                   + ("are the documents separated by lines holding only <|endoftext|>? "
                                      "--separator=blankline splits at blank lines" if separator == "eot" else
                                      "split the file into documents at blank lines"))
    if lines:
        yield "".join(lines).strip("\n")


def read_jsonl(path: str, text_field: str):
    """The text_field of each JSON object, one per line (blank lines are skipped)."""
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") \
                from None
        if not isinstance(obj, dict) or text_field not in obj:
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise PrepareError(f"{path}:{lineno}: no {text_field!r} field (found {found}); pick the field with "
                               "--text_field")
        text = obj[text_field]
        if text is not None and not isinstance(text, str):
            raise PrepareError(f"{path}:{lineno}: {text_field!r} is a {type(text).__name__}, not a string")
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError as e:
            raise PrepareError(f"{path}:{lineno}: {text_field!r} holds a lone surrogate {ascii(text[e.start])}, "
                               "which is not text; fix the line") from None
        yield text or ""


def read_parquet(path: str, text_field: str):
    """The text_field column of a parquet file, read a batch of rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"cannot read {path} as parquet: {e}") from None
    if text_field not in pf.schema_arrow.names:
        raise PrepareError(f"{path} has no column {text_field!r} (it has {pf.schema_arrow.names}); pick one "
                           "with --text_field")
    batches = pf.iter_batches(batch_size=4096, columns=[text_field])
    for first_row in itertools.count(0, 4096):
        try:
            batch = next(batches, None)
            texts = batch.column(0).to_pylist() if batch is not None else []
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise PrepareError(f"cannot read {path} from row {first_row:,} on: {e}") from None
        if batch is None:
            return
        for text in texts:
            if text is not None and not isinstance(text, str):
                raise PrepareError(f"{path}: column {text_field!r} holds {type(text).__name__}, not strings")
            yield text or ""


def read_file(path: str, args):
    kind = file_kind(path)
    if kind in (".txt", ".txt.gz"):
        return read_txt(path, args.separator)
    if kind in (".jsonl", ".jsonl.gz"):
        return read_jsonl(path, args.text_field)
    return read_parquet(path, args.text_field)


def read_files(paths, args):
    for path in paths:
        yield from read_file(path, args)


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
            "--dataset=bundled (4,043 stories shipped in data/tinystories_sample) or --input=PATH with your own "
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

# -----------------------------------------------------------------------------
# cleaning, and the train/val split


def clean(text: str, args) -> str:
    if args.normalize:
        text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
        text = re.sub(r"[ \t]+", " ", text)
        text = re.sub(r" +\n", "\n", text)
        text = re.sub(r"\n{3,}", "\n\n", text)
        text = text.strip()
    if args.lowercase:
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


def make_passes(args):
    """The reads that make the two splits: (name, open the document stream, which split its documents go to),
    where the split is "train", "val" or "seeded" (decided per document by val_mask)."""
    if args.input:
        train_source = ("input", lambda: read_files(args.input, args))
    elif args.dataset == "bundled":
        train_source = ("bundled", lambda: read_txt(BUNDLED, "eot"))
    else:
        train_source = ("tinystories_train", lambda: read_tinystories("train"))
    if args.val_input:
        return [(*train_source, "train"), ("val_input", lambda: read_files(args.val_input, args), "val")]
    if not args.input and args.dataset == "tinystories":  # TinyStories ships its own validation split
        return [(*train_source, "train"), ("tinystories_validation", lambda: read_tinystories("validation"), "val")]
    return [(*train_source, "seeded")]


def read_chunks(stream, first_index: int, seed: int, val_fraction: float, args):
    """Group a document stream into chunks of about CHUNK_CHARS characters, each routed and cleaned by
    route(). first_index is the index of the stream's first document (those before it are done)."""
    docs, size = [], 0
    for doc in stream:
        docs.append(doc)
        size += len(doc)
        if size >= CHUNK_CHARS:
            yield route(docs, first_index, seed, val_fraction, args)
            first_index += len(docs)
            docs, size = [], 0
    if docs:
        yield route(docs, first_index, seed, val_fraction, args)


def route(docs, first_index: int, seed: int, val_fraction: float, args):
    """(documents read, cleaned train texts, cleaned val texts, documents dropped as empty)."""
    to_val = val_mask(np.arange(first_index, first_index + len(docs)), seed, val_fraction)
    texts = [clean(d, args) for d in docs]
    train = [t for t, v in zip(texts, to_val) if not v and t.strip()]
    val = [t for t, v in zip(texts, to_val) if v and t.strip()]
    return len(docs), train, val, len(docs) - len(train) - len(val)


def pass_chunks(source, rule: str, skip: int, args):
    """Chunks of one pass, with each document routed to its split by rule ("train", "val" or "seeded")."""
    stream = itertools.islice(source(), skip, None)
    fraction = {"train": 0.0, "val": 1.0, "seeded": args.val_fraction}[rule]
    return read_chunks(stream, skip, args.seed, fraction, args)


def train_texts(passes, args):
    """Every train document, cleaned: what a new vocabulary learns from."""
    for _, source, rule in passes:
        if rule != "val":
            for _, train, _, _ in pass_chunks(source, rule, 0, args):
                yield from train

# -----------------------------------------------------------------------------
# the output directory: temporary files, the resume state, and the final swap


def default_name(args) -> str:
    if args.input:
        stem = os.path.basename(args.input[0])
        for suffix in SUFFIXES:
            if stem.endswith(suffix):
                stem = stem[:-len(suffix)]
                break
        name = stem
    else:
        name = args.dataset
    return name + (f"_bpe{args.vocab_size}" if args.vocab_size else "")


def source_description(args) -> dict:
    if args.input:
        return {"input": args.input, "val_input": args.val_input}
    return {"dataset": args.dataset, "val_input": args.val_input}


def options_description(args) -> dict:
    return {"separator": args.separator, "text_field": args.text_field, "val_fraction": args.val_fraction,
            "seed": args.seed, "normalize": args.normalize, "lowercase": args.lowercase,
            "vocab_size": args.vocab_size}


def fingerprint(args) -> str:
    """What decides the output: options, and each input file's size and modification time."""
    files = (args.input or ([BUNDLED] if args.dataset == "bundled" else [])) + (args.val_input or [])
    stats = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in files]
    blob = json.dumps([source_description(args), options_description(args), stats], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class Output:
    """data/<name>/: the temporary files a run writes, and the swap that makes them final."""

    def __init__(self, out_dir: str):
        self.dir = out_dir
        self.state_path = os.path.join(out_dir, STATE_FILE)
        self.tmp_vocab = os.path.join(out_dir, "tokenizer.tmp.tiktoken")

    def bin_path(self, split: str, tmp: bool = False) -> str:
        return os.path.join(self.dir, f"{split}.bin" + (".tmp" if tmp else ""))

    def load_state(self):
        try:
            with open(self.state_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def write_state(self, state: dict) -> None:
        atomic_write(self.state_path, json.dumps(state, indent=1).encode())

    def remove_temporaries(self) -> None:
        paths = [self.state_path, self.tmp_vocab, special_tokens_path(self.tmp_vocab)]
        for path in paths + [self.bin_path(s, tmp=True) for s in SPLITS]:
            if os.path.exists(path):
                os.remove(path)

    def can_resume(self, state: dict) -> bool:
        """The temporary files hold at least what the state records (a crash may leave more, never less)."""
        itemsize = np.dtype(state["dtype"]).itemsize
        for split in SPLITS:
            path = self.bin_path(split, tmp=True)
            recorded = HEADER_BYTES + state["splits"][split]["tokens"] * itemsize
            if not os.path.isfile(path) or os.path.getsize(path) < recorded:
                return False
        return state["vocab_size"] is None or os.path.isfile(self.tmp_vocab)

    def finish(self, meta: dict, trained: bool) -> None:
        """Swap the new files in. The old meta.json goes first, so a crash half-way leaves a directory that
        TokenDataset refuses (no meta.json) rather than one that mixes two runs."""
        meta_path = os.path.join(self.dir, "meta.json")
        if os.path.exists(meta_path):
            os.remove(meta_path)
        vocab = os.path.join(self.dir, "tokenizer.tiktoken")
        for tmp, final in ((self.tmp_vocab, vocab), (special_tokens_path(self.tmp_vocab), special_tokens_path(vocab))):
            if trained:
                os.replace(tmp, final)
            elif os.path.exists(final):  # an earlier run's vocabulary, which these files do not use
                os.remove(final)
        for split in SPLITS:
            os.replace(self.bin_path(split, tmp=True), self.bin_path(split))
        atomic_write(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
        os.remove(self.state_path)

# -----------------------------------------------------------------------------
# the run


def check_args(args) -> None:
    if args.input and args.dataset == "bundled":
        raise PrepareError("give either --input or --dataset=bundled, not both")
    for path in (args.input or []) + (args.val_input or []):
        file_kind(path)
        if not os.path.isfile(path):
            raise PrepareError(f"no such file: {path}")
    if not args.input and args.dataset == "tinystories":
        check_hub_reachable()
    if not 0.0 <= args.val_fraction < 1.0:
        raise PrepareError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.vocab_size is not None:
        if args.vocab_size < 257:
            raise PrepareError(f"--vocab_size={args.vocab_size} is too small: the 256 byte tokens and "
                               f"{EOT} alone need 257")
        try:
            token_dtype_for(args.vocab_size)
        except ValueError as e:
            raise PrepareError(str(e)) from None


def empty_corpus(args) -> PrepareError:
    return PrepareError(f"the corpus is empty: no documents with text were found in "
                        f"{', '.join(args.input or [args.dataset])}")


def get_tokenizer(args, out: Output, passes) -> Tokenizer:
    if args.vocab_size is None:
        return Tokenizer.gpt2()
    print(f"training a {args.vocab_size:,}-token BPE vocabulary on the train split")
    texts = train_texts(passes, args)
    first = next(texts, None)
    if first is None:
        raise empty_corpus(args)
    try:
        tok = Tokenizer.train(itertools.chain([first], texts), args.vocab_size, special_tokens=[EOT], verbose=True)
    except ValueError as e:
        raise PrepareError(f"cannot train the vocabulary: {e}") from None
    tok.save(out.tmp_vocab)
    return tok


def start_or_resume(args, out: Output, passes):
    """The tokenizer and the state to continue from: the interrupted run's, or a fresh start."""
    key = fingerprint(args)
    state = out.load_state()
    if state is not None:
        if state.get("fingerprint") != key:
            print(f"found an interrupted run in {out.dir} with other options or inputs: starting over")
        elif not out.can_resume(state):
            print(f"found an interrupted run in {out.dir} but its files are incomplete: starting over")
        else:
            tok = Tokenizer.load(out.tmp_vocab, name=f"bpe{args.vocab_size}") if args.vocab_size else Tokenizer.gpt2()
            if tok.content_hash == state["tokenizer_hash"]:
                done = ", ".join(f"{s} {state['splits'][s]['tokens']:,} tokens" for s in SPLITS)
                print(f"resuming the interrupted run in {out.dir} ({done} already written)")
                itemsize = np.dtype(state["dtype"]).itemsize
                for split in SPLITS:  # drop whatever was written after the last recorded chunk
                    with open(out.bin_path(split, tmp=True), "r+b") as f:
                        f.truncate(HEADER_BYTES + state["splits"][split]["tokens"] * itemsize)
                return tok, state
            print(f"found an interrupted run in {out.dir} with another tokenizer: starting over")
    out.remove_temporaries()
    tok = get_tokenizer(args, out, passes)
    state = {"fingerprint": key, "tokenizer_hash": tok.content_hash, "vocab_size": args.vocab_size,
             "dtype": token_dtype_for(tok.n_vocab).name, "dropped_documents": 0,
             "passes": {name: {"documents_read": 0, "done": False} for name, _, _ in passes},
             "splits": {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}}
    for split in SPLITS:
        with open(out.bin_path(split, tmp=True), "wb") as f:
            f.write(bytes(HEADER_BYTES))  # zeros, a bad magic, until the real header goes in at the end
    out.write_state(state)
    return tok, state


def append_chunk(tok: Tokenizer, files: dict, state: dict, train: list, val: list) -> None:
    """Tokenize one chunk's documents onto the ends of the split files, and count them in the state."""
    for split, texts in (("train", train), ("val", val)):
        if not texts:
            continue
        ids = tok.encode_to_array(texts, append_eot=True)
        files[split].write(ids.astype(state["dtype"]).tobytes())
        counts = state["splits"][split]
        counts["documents"] += len(texts)
        counts["tokens"] += len(ids)
        counts["bytes"] += sum(len(t.encode("utf-8")) for t in texts)
    for f in files.values():  # on disk before the state says so
        f.flush()
        os.fsync(f.fileno())


def tokenize_passes(tok: Tokenizer, state: dict, out: Output, passes, args) -> None:
    """Read, clean, tokenize and append each chunk to the split files, recording progress after each."""
    files = {s: open(out.bin_path(s, tmp=True), "ab") for s in SPLITS}
    try:
        for name, source, rule in passes:
            progress = state["passes"][name]
            if progress["done"]:
                continue
            with tqdm(desc=name, unit="doc", initial=progress["documents_read"], unit_scale=True) as bar:
                for n_read, train, val, dropped in pass_chunks(source, rule, progress["documents_read"], args):
                    append_chunk(tok, files, state, train, val)
                    progress["documents_read"] += n_read
                    state["dropped_documents"] += dropped
                    out.write_state(state)
                    bar.update(n_read)
                    bar.set_postfix(train_tokens=f"{state['splits']['train']['tokens']:,}",
                                    val_tokens=f"{state['splits']['val']['tokens']:,}")
            progress["done"] = True
            out.write_state(state)
    finally:
        for f in files.values():
            f.close()


def write_headers(state: dict, out: Output) -> None:
    for split in SPLITS:
        path = out.bin_path(split, tmp=True)
        with open(path, "r+b") as f:
            write_header(f, state["splits"][split]["tokens"], state["dtype"])
            f.flush()
            os.fsync(f.fileno())
        read_header(path)  # the size must now agree with the header


def make_meta(tok: Tokenizer, state: dict, args) -> dict:
    return {
        "tokenizer": tok.name,
        "tokenizer_file": "tokenizer.tiktoken" if args.vocab_size else None,  # relative to this directory
        "tokenizer_hash": tok.content_hash,
        "n_vocab": tok.n_vocab,
        "eot_token": tok.eot_token,
        "dtype": state["dtype"],
        "splits": {s: {"file": f"{s}.bin", **state["splits"][s]} for s in SPLITS},
        "dropped_documents": state["dropped_documents"],
        "source": source_description(args),
        "options": options_description(args),
    }


def prepare(args) -> str:
    """Write <out_dir>/<name>/{train.bin, val.bin, meta.json} (and tokenizer.tiktoken with --vocab_size);
    return the directory."""
    check_args(args)
    out = Output(os.path.join(args.out_dir, args.name or default_name(args)))
    created = not os.path.isdir(out.dir)
    os.makedirs(out.dir, exist_ok=True)
    passes = make_passes(args)
    try:
        tok, state = start_or_resume(args, out, passes)
        tokenize_passes(tok, state, out, passes, args)
        if state["splits"]["train"]["documents"] == 0:
            raise empty_corpus(args)
        if state["splits"]["val"]["documents"] == 0 and (args.val_input or args.val_fraction > 0):
            one_document = (args.separator == "eot" and any(file_kind(path).startswith(".txt")
                                                            for path in args.input or []))
            raise PrepareError(f"the val split is empty ({state['splits']['train']['documents']} documents in all): "
                               "give more documents, a larger --val_fraction, or --val_input"
                               + ("; a .txt without lines holding only <|endoftext|> is one document: "
                                  "--separator=blankline splits it at blank lines" if one_document else ""))
    except PrepareError as e:
        state = out.load_state()
        if isinstance(e, DownloadError) and state and any(p["documents_read"] for p in state["passes"].values()):
            raise  # keep what the download brought so far: the same command continues from there
        out.remove_temporaries()  # the input has to change, so nothing here can be resumed
        if created and not os.listdir(out.dir):
            os.rmdir(out.dir)
        raise
    write_headers(state, out)
    meta = make_meta(tok, state, args)
    out.finish(meta, trained=args.vocab_size is not None)
    return out.dir


def summary(out_dir: str) -> str:
    """A few lines on what was written, and the first tokens of two val documents as text|id pairs."""
    ds = TokenDataset(out_dir)
    tok = ds.load_tokenizer()
    lines = [f"wrote {out_dir}/ ({ds.meta['tokenizer']} tokenizer, {ds.n_vocab:,} tokens, {ds.dtype} ids)"]
    for split, info in ds.meta["splits"].items():
        lines.append(f"  {split:5s} {info['documents']:>12,} documents {info['tokens']:>14,} tokens "
                     f"{info['bytes'] / max(info['tokens'], 1):.2f} bytes/token")
    val = np.asarray((ds.splits["val"] if len(ds.splits["val"]) else ds.splits["train"])[:100_000])
    ends = np.flatnonzero(val == ds.eot_token)[:2].tolist()
    for start, end in zip([0] + [e + 1 for e in ends], ends):
        ids = val[start:min(start + 20, end + 1)].tolist()
        pairs = " ".join(f"{tok.decode([i])!r}|{i}" for i in ids)
        lines.append(f"  example: {pairs}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        out_dir = prepare(args)
    except PrepareError as e:
        sys.exit(f"error: {e}")
    print(summary(out_dir))


if __name__ == "__main__":
    main()
