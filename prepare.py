"""
Turn a text corpus into the token files that train.py reads: data/<name>/{train.bin, val.bin, meta.json}.

    python prepare.py --dataset=bundled                    # ~4,800 TinyStories shipped in the repo (seconds)
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
import hashlib
import itertools
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from corpus import (SUFFIXES, DownloadError, check_hub_reachable, clean, file_kind, read_file,
                    read_stories_from_paragraphs, read_tinystories, read_txt, val_mask)
from data import HEADER_BYTES, TokenDataset, read_header, token_dtype_for, write_header
from files import DataError, atomic_path, atomic_write, remove_stale_writes, writing
from tokenizer import EOT, Tokenizer, special_tokens_path

ROOT = os.path.dirname(os.path.abspath(__file__))
BUNDLED = os.path.join(ROOT, "data", "tinystories_sample", "train.txt.gz")
# ~790 more stories (the start of TinyStories' v1 validation split), exported with blank lines between paragraphs
# and between stories alike: train-only text for the bundled corpus, whose val split stays BUNDLED's
BUNDLED_EXTRA = os.path.join(ROOT, "data", "tinystories_sample", "valid_blankline_separated.txt.gz")
SPLITS = ("train", "val")
STATE_FILE = ".prepare_state.json"
CHUNK_CHARS = 16 << 20  # characters of text tokenized at a time: bounds memory, and the work lost to a crash


def read_files(paths, args):
    """The documents of the --input (or --val_input) files, one file after another."""
    for path in paths:
        yield from read_file(path, args.separator, args.text_field, CHUNK_CHARS)


def build_parser() -> argparse.ArgumentParser:
    # The docstring as the description, as train.py/sample.py/... print theirs (configurator.help_text).
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["tinystories", "bundled"], default="tinystories",
                     help="tinystories: download roneneldan/TinyStories from the Hugging Face hub; bundled: "
                          "the ~4,800 stories in data/tinystories_sample (no network). Default tinystories")
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

def make_passes(args):
    """The reads that make the two splits: (name, open the document stream, which split its documents go to),
    where the split is "train", "val" or "seeded" (decided per document by val_mask)."""
    if args.input:
        train_source = ("input", lambda: read_files(args.input, args))
    elif args.dataset == "bundled":
        train_source = ("bundled", lambda: read_txt(BUNDLED, "eot", CHUNK_CHARS))
    else:
        train_source = ("tinystories_train", lambda: read_tinystories("train"))
    if args.val_input:
        return [(*train_source, "train"), ("val_input", lambda: read_files(args.val_input, args), "val")]
    if not args.input and args.dataset == "tinystories":  # TinyStories ships its own validation split
        return [(*train_source, "train"), ("tinystories_validation", lambda: read_tinystories("validation"), "val")]
    if args.dataset == "bundled":  # BUNDLED's stories split by seed, then more stories for train only
        return [(*train_source, "seeded"),
                ("bundled_extra", lambda: read_stories_from_paragraphs(BUNDLED_EXTRA), "train")]
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
    texts = [clean(d, args.normalize, args.lowercase) for d in docs]
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
    files = (args.input or ([BUNDLED, BUNDLED_EXTRA] if args.dataset == "bundled" else [])) + (args.val_input or [])
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
        """Swap the new files in. The new meta.json is written first (the last write that needs space: a full
        disk stops the run before anything is swapped), then the old one goes, so a crash half-way leaves a
        directory that TokenDataset refuses (no meta.json) rather than one that mixes two runs; the new one
        is renamed in last."""
        meta_path = os.path.join(self.dir, "meta.json")
        with atomic_path(meta_path) as new_meta:
            with open(new_meta, "w") as f:
                f.write(json.dumps(meta, indent=1) + "\n")
            if os.path.exists(meta_path):
                os.remove(meta_path)
            vocab = os.path.join(self.dir, "tokenizer.tiktoken")
            for tmp, final in ((self.tmp_vocab, vocab),
                               (special_tokens_path(self.tmp_vocab), special_tokens_path(vocab))):
                if trained:
                    os.replace(tmp, final)
                elif os.path.exists(final):  # an earlier run's vocabulary, which these files do not use
                    os.remove(final)
            for split in SPLITS:
                os.replace(self.bin_path(split, tmp=True), self.bin_path(split))
        os.remove(self.state_path)

# -----------------------------------------------------------------------------
# the run


def check_args(args) -> None:
    if args.input and args.dataset == "bundled":
        raise DataError("give either --input or --dataset=bundled, not both")
    for path in (args.input or []) + (args.val_input or []):
        file_kind(path)
        if not os.path.isfile(path):
            raise DataError(f"no such file: {path}")
    if not args.input and args.dataset == "tinystories":
        check_hub_reachable()
    if not 0.0 <= args.val_fraction < 1.0:
        raise DataError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.vocab_size is not None:
        if args.vocab_size < 257:
            raise DataError(f"--vocab_size={args.vocab_size} is too small: the 256 byte tokens and "
                               f"{EOT} alone need 257")
        try:
            token_dtype_for(args.vocab_size)
        except ValueError as e:
            raise DataError(str(e)) from None


def empty_corpus(args) -> DataError:
    return DataError(f"the corpus is empty: no documents with text were found in "
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
        raise DataError(f"cannot train the vocabulary: {e}") from None
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
    remove_stale_writes(out.dir)  # of a run killed in the middle of an atomic write
    passes = make_passes(args)
    kept = (f"What {out.dir} held before is as it was, and this run's progress is saved: free some space, "
            "then run the same command again to continue")
    try:
        with writing(out.dir, kept):
            tok, state = start_or_resume(args, out, passes)
            tokenize_passes(tok, state, out, passes, args)
        if state["splits"]["train"]["documents"] == 0:
            raise empty_corpus(args)
        if state["splits"]["val"]["documents"] == 0 and (args.val_input or args.val_fraction > 0):
            one_document = (args.separator == "eot" and any(file_kind(path).startswith(".txt")
                                                            for path in args.input or []))
            raise DataError(f"the val split is empty ({state['splits']['train']['documents']} documents in all): "
                               "give more documents, a larger --val_fraction, or --val_input"
                               + ("; a .txt without lines holding only <|endoftext|> is one document: "
                                  "--separator=blankline splits it at blank lines" if one_document else ""))
    except DataError as e:
        state = out.load_state()
        if isinstance(e, DownloadError) and state and any(p["documents_read"] for p in state["passes"].values()):
            raise  # keep what the download brought so far: the same command continues from there
        out.remove_temporaries()  # the input has to change, so nothing here can be resumed
        if created and not os.listdir(out.dir):
            os.rmdir(out.dir)
        raise
    with writing(out.dir, kept):
        write_headers(state, out)
        out.finish(make_meta(tok, state, args), trained=args.vocab_size is not None)
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
    except (DataError, OSError) as e:  # OSError: files.WriteError, a full disk
        sys.exit(f"error: {e}")
    print(summary(out_dir))


if __name__ == "__main__":
    main()
