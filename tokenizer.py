"""
nanoslm's tokenizer: GPT-2 byte-level BPE, and new BPE vocabularies trained on your own corpus.

    python tokenizer.py --show "I love NLP"
    python tokenizer.py --show "I love NLP" --vocab=data/mystories/tokenizer.tiktoken

>>> tok = Tokenizer.gpt2()
>>> tok.encode("hello world")
[31373, 995]
>>> tok.decode([31373, 995])
'hello world'

The work runs in C++ (csrc/, built into the _nanoslm extension by setup.py); this file validates input
and hands it over. Ids are byte-identical to tiktoken's for the same ranks (tests/test_tokenizer.py).

Files: a vocabulary is a tiktoken-format ranks file (one "base64(token bytes) rank" line per token, which
tiktoken.load.load_tiktoken_bpe reads too) plus, beside it, <name>.special.json with the special tokens.
"""
import argparse
import base64
import codecs
import hashlib
import json
import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from files import atomic_write
from system import default_num_threads, native

_nanoslm = native()

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
GPT2_RANKS = os.path.join(ASSETS_DIR, "gpt2.tiktoken")
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"


def special_tokens_path(ranks_path: str) -> str:
    return os.path.splitext(ranks_path)[0] + ".special.json"


def _check_text(text: str) -> None:
    """Raise a clear error for str values that are not valid Unicode text (lone surrogates)."""
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode: lone surrogate {ascii(text[e.start])} at index "
                         f"{e.start}; decode your input with errors='replace' or fix it") from None


class Tokenizer:
    """Byte-level BPE: ids are ranks (lower merges first), the 256 single bytes are all in the vocabulary."""

    def __init__(self, mergeable_ranks: Dict[bytes, int], special_tokens: Dict[str, int], name: str = "custom"):
        if any(rank < 0 or rank >= 2**31 for rank in mergeable_ranks.values()):
            raise ValueError("ranks must lie in [0, 2**31)")
        for text, i in special_tokens.items():
            if not isinstance(text, str) or not text:
                raise ValueError(f"special token {text!r}: a special token is a non-empty string")
            if not 0 <= i < 2**31:
                raise ValueError(f"special token {text!r} has the id {i}, outside [0, 2**31)")
        if len(set(special_tokens.values())) < len(special_tokens):
            raise ValueError(f"two special tokens share an id: {special_tokens}")
        token_bytes = [b""] * (max(mergeable_ranks.values()) + 1)
        for token, rank in mergeable_ranks.items():
            if token_bytes[rank]:
                raise ValueError(f"rank {rank} is given to two tokens")
            token_bytes[rank] = token
        self.name = name
        self.mergeable_ranks = dict(mergeable_ranks)
        self.special_tokens = dict(special_tokens)
        self._token_bytes = token_bytes
        self._core = _nanoslm.Encoder(token_bytes, sorted(self.special_tokens.items()))
        self.n_vocab = self._core.n_vocab
        self.eot_token = self.special_tokens.get(EOT)

    # --- construction --------------------------------------------------------------------------------

    @classmethod
    def gpt2(cls) -> "Tokenizer":
        """The GPT-2 vocabulary (50,257 tokens, <|endoftext|> = 50256) from the bundled ranks file."""
        return cls.load(GPT2_RANKS, name="gpt2")

    @classmethod
    def load(cls, path: str, name: Optional[str] = None) -> "Tokenizer":
        """Read a ranks file written by save() (or any tiktoken-format file) and its special tokens."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer at {path}: train one with `python prepare.py --vocab_size=N` "
                                    "or use Tokenizer.gpt2()")
        ranks = {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: expected 'base64(token) rank', got {line[:80]!r}") from None
        if not ranks:
            raise ValueError(f"{path} holds no tokens")
        present = set(ranks.values())
        if max(present) != len(ranks) - 1:  # ranks are 0..n-1: a hole or a stray rank means damage
            missing = next(r for r in range(len(ranks)) if r not in present)
            raise ValueError(f"{path} is damaged: rank {missing} is missing (a vocabulary's ranks run 0..n-1 "
                             f"without gaps); train the vocabulary again")
        specials_file = special_tokens_path(path)
        specials = {}
        if os.path.isfile(specials_file):
            try:
                with open(specials_file, encoding="utf-8") as f:
                    specials = json.load(f)["special_tokens"]
                if not isinstance(specials, dict):
                    raise TypeError("special_tokens is not an object")
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{specials_file} is damaged ({type(e).__name__}: {e}): save the tokenizer again "
                                 f"(Tokenizer.save) or train the vocabulary again") from None
        elif os.path.abspath(path) == os.path.abspath(GPT2_RANKS):
            specials = {EOT: 50256}
        return cls(ranks, specials, name=name or os.path.splitext(os.path.basename(path))[0])

    def save(self, path: str) -> None:
        """Write the ranks to path (tiktoken format) and the special tokens to <path stem>.special.json."""
        lines = [base64.b64encode(token) + b" " + str(rank).encode() for token, rank in
                 sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])]
        atomic_write(path, b"\n".join(lines) + b"\n")
        atomic_write(special_tokens_path(path),
                     json.dumps({"special_tokens": self.special_tokens, "pattern": GPT2_PATTERN}, indent=1).encode())

    @classmethod
    def train(cls, texts_or_paths: Union[Iterable[str], Sequence[os.PathLike]], vocab_size: int,
              special_tokens: Sequence[str] = (EOT,), num_threads: Optional[int] = None,
              verbose: bool = False) -> "Tokenizer":
        """
        Learn a byte-level BPE vocabulary of vocab_size tokens in all: the 256 bytes, then the merges in
        the order learnt (token 256 is the first merge), then the special tokens.

        texts_or_paths: strings of text, or paths (pathlib.Path / os.PathLike) of UTF-8 text files.
        Text is split at the special tokens first, so no merge ever crosses one; then into pieces by the
        GPT-2 pattern. Each step merges the most frequent adjacent pair; a tie goes to the pair whose
        byte strings are lexicographically greater (left string first, then right), so training is
        deterministic. Example: on "low lower lowest newest" the first merges are
        we, lo, wes, west, " lo", wer: (w, e), (l, o) and (o, w) all occur 3 times and b'w' is the
        greatest left string -- worked through by hand in tests/test_tokenizer.py.
        """
        if isinstance(texts_or_paths, (str, os.PathLike)):  # one text, or one file
            texts_or_paths = [texts_or_paths]
        special_tokens = list(dict.fromkeys(special_tokens))
        if not all(isinstance(s, str) and s for s in special_tokens):
            raise ValueError(f"special tokens must be non-empty strings: {special_tokens}")
        num_merges = vocab_size - 256 - len(special_tokens)
        if vocab_size >= 2**31:
            raise ValueError(f"vocab_size {vocab_size:,} is too large: at most 2**31 - 1 tokens can be trained")
        if num_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is too small: the 256 byte tokens and "
                             f"{len(special_tokens)} special tokens alone need {256 + len(special_tokens)}")
        num_threads = num_threads or default_num_threads()
        trainer = _nanoslm.BpeTrainer(special_tokens)
        for batch in _text_batches(texts_or_paths, special_tokens, verbose):
            trainer.add_texts(batch, num_threads)
        merges = trainer.train(num_merges)
        if len(merges) < num_merges:
            raise ValueError(f"the corpus is too small for vocab_size {vocab_size}: it has no pairs left to merge "
                             f"after {len(merges)} merges (at most vocab_size "
                             f"{256 + len(merges) + len(special_tokens)})")
        token_bytes = [bytes([b]) for b in range(256)]
        for left, right in merges:
            token_bytes.append(token_bytes[left] + token_bytes[right])
        ranks = {token: rank for rank, token in enumerate(token_bytes)}
        specials = {s: len(token_bytes) + i for i, s in enumerate(special_tokens)}
        return cls(ranks, specials, name=f"bpe{vocab_size}")

    # --- encoding and decoding -----------------------------------------------------------------------

    def _allowed(self, text_or_texts, allowed_special, disallowed_special) -> List[str]:
        if allowed_special == "all":
            allowed_special = set(self.special_tokens)
        allowed_special = set(allowed_special)
        unknown = allowed_special - set(self.special_tokens)
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not special tokens of this tokenizer "
                             f"(it has {sorted(self.special_tokens)})")
        if disallowed_special == "all":
            disallowed_special = set(self.special_tokens) - allowed_special
        if isinstance(text_or_texts, str):
            texts = [text_or_texts]
        elif isinstance(text_or_texts, (list, tuple)):
            texts = text_or_texts
        else:
            raise TypeError(f"expected str, got {type(text_or_texts).__name__}")
        for text in texts:
            _check_text(text)
            for special in disallowed_special:
                if special in text:
                    raise ValueError(
                        f"the text contains the special token {special!r}. Pass allowed_special={{{special!r}}} to "
                        f"encode it as a special token, or disallowed_special=() to encode it as plain text.")
        return sorted(allowed_special)

    def encode(self, text: str, *, allowed_special=frozenset(), disallowed_special="all") -> List[int]:
        """Ids of text. Special tokens in the text are an error unless allowed (then they become their
        ids) or explicitly not disallowed (then they are encoded as ordinary text), as in tiktoken."""
        allowed = self._allowed(text, allowed_special, disallowed_special)
        return self._core.encode(text, allowed)

    def encode_ordinary(self, text: str) -> List[int]:
        """Ids of text, treating special tokens as plain text."""
        _check_text(text)
        return self._core.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], *, num_threads: Optional[int] = None,
                     allowed_special=frozenset(), disallowed_special="all") -> List[List[int]]:
        """encode() of each text, on num_threads threads (all cores by default)."""
        texts = list(texts)
        allowed = self._allowed(texts, allowed_special, disallowed_special)
        return self._core.encode_batch(texts, allowed, num_threads or default_num_threads())

    def encode_to_array(self, texts: Sequence[str], *, append_eot: bool = True,
                        num_threads: Optional[int] = None) -> np.ndarray:
        """All texts' ids (special tokens as plain text) concatenated into one uint32 array, with
        <|endoftext|> after each text when append_eot: the layout of a training token file."""
        texts = list(texts)
        for text in texts:
            _check_text(text)
        if append_eot and self.eot_token is None:
            raise ValueError(f"tokenizer {self.name} has no {EOT} token to append")
        return self._core.encode_to_array(texts, [], num_threads or default_num_threads(),
                                          self.eot_token if append_eot else -1)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"cannot decode: token id {bad[0]} is not in the vocabulary (n_vocab {self.n_vocab})")
        try:
            return self._core.decode_bytes(ids)
        except IndexError as e:  # an unused id inside the range
            raise ValueError(f"cannot decode: {e}") from None

    def decode(self, ids: Sequence[int], errors: str = "replace") -> str:
        """Text of ids. A cut through a multi-byte character decodes to U+FFFD unless errors='strict'."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode_bytes([token_id])

    @property
    def content_hash(self) -> str:
        """sha256 of the vocabulary and special tokens: token files record it to refuse a mismatch."""
        h = hashlib.sha256()
        for token in self._token_bytes:
            h.update(len(token).to_bytes(4, "little") + token)
        h.update(json.dumps(sorted(self.special_tokens.items())).encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab}, special_tokens={self.special_tokens})"


def pretokenize(text: str) -> List[str]:
    """The pieces of text under the GPT-2 pattern, e.g. "I'm here" -> ['I', "'m", ' here']."""
    _check_text(text)
    return _nanoslm.pretokenize(text)


def _text_batches(texts_or_paths, special_tokens, verbose, batch_bytes=8 << 20):
    """Yield lists of strings of about batch_bytes each, reading files in chunks."""
    from tqdm import tqdm
    batch, size = [], 0
    for item in tqdm(texts_or_paths, desc="counting pieces", unit="text", disable=not verbose):
        chunks = _read_file_chunks(item, special_tokens, batch_bytes) if isinstance(item, os.PathLike) else [item]
        for chunk in chunks:
            _check_text(chunk)
            batch.append(chunk)
            size += len(chunk)
            if size >= batch_bytes:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _read_file_chunks(path, special_tokens, chunk_chars):
    """Yield a UTF-8 file's text in pieces, each cut only where the pre-tokenizer would cut anyway: after a
    special token, or at a newline between two ASCII letters/punctuation (the regex has no look-behind,
    so such a cut leaves every piece as it was)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    carry, decoder, offset = "", codecs.getincrementaldecoder("utf-8")(), 0  # offset: bytes read before this block
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk_chars)
            pending = decoder.getstate()[0]  # the start of a character cut by the previous block
            try:
                block = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not valid UTF-8 ({e.reason} at byte {offset - len(pending) + e.start:,}); "
                                 "convert it to UTF-8 first") from None
            offset += len(data)
            if not data:
                break
            text = carry + block
            cut = _safe_cut(text, special_tokens)
            if cut <= 0:
                carry = text
                continue
            yield text[:cut]
            carry = text[cut:]
    if carry:
        yield carry


def _safe_cut(text: str, special_tokens) -> int:
    best = max((text.rfind(s) + len(s) for s in special_tokens if s in text), default=-1)
    if best > 0:
        return best
    pos = len(text) - 1
    while True:
        pos = text.rfind("\n", 0, pos)
        if pos <= 0 or pos + 1 >= len(text):
            return -1
        before, after = text[pos - 1], text[pos + 1]
        if before.isascii() and after.isascii() and not before.isspace() and not after.isspace() \
                and before.isprintable() and after.isprintable():
            return pos + 1


# --- the vocabulary as byte-level BPE (for exports): its merges and GPT-2's byte alphabet ---------------

def merges_of(tok: Tokenizer) -> List[Tuple[bytes, bytes]]:
    """The merge that makes each token: BPE-encode its bytes with the ranks below its own down to two parts."""
    ranks = tok.mergeable_ranks
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pair_ranks = [ranks.get(parts[i] + parts[i + 1], rank) for i in range(len(parts) - 1)]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[i] >= rank:
                raise ValueError(f"token {token!r} (rank {rank}) cannot be built from lower-ranked tokens")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def byte_level_alphabet() -> List[str]:
    """GPT-2's reversible byte -> printable character table, which transformers' ByteLevel BPE uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_level_string(token: bytes, alphabet: Optional[List[str]] = None) -> str:
    """A token's bytes as transformers' and llama.cpp's GPT-2 vocabularies write them: each byte one character
    of byte_level_alphabet() (pass it in when converting many)."""
    alphabet = alphabet or byte_level_alphabet()
    return "".join(alphabet[b] for b in token)


# --- the visualiser -------------------------------------------------------------------------------------

def show(text: str, tokenizers: List[Tokenizer]) -> str:
    """A side-by-side table of each tokenizer's tokens of text: the teaching view."""
    columns = []
    for tok in tokenizers:
        ids = tok.encode(text, allowed_special="all")
        rows = [(repr(tok.token_bytes(i).decode("utf-8", errors="backslashreplace")), str(i)) for i in ids]
        header = f"{tok.name} ({tok.n_vocab:,} tokens): {len(ids)} tokens"
        width = max([len(header)] + [len(t) + len(i) + 2 for t, i in rows])
        lines = [header.ljust(width), "-" * width] + [(t + " " * (width - len(t) - len(i)) + i) for t, i in rows]
        columns.append(lines)
    height = max(len(c) for c in columns)
    for c in columns:
        c += [" " * len(c[0])] * (height - len(c))
    return "\n".join("   ".join(row) for row in zip(*columns))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Show how text splits into tokens.")
    parser.add_argument("--show", required=True, metavar="TEXT", help="the text to tokenize")
    parser.add_argument("--vocab", action="append", default=[], metavar="PATH",
                        help="a trained vocabulary (.tiktoken) to show beside GPT-2; may repeat")
    args = parser.parse_args(argv)
    tokenizers = [Tokenizer.gpt2()] + [Tokenizer.load(p) for p in args.vocab]
    print(show(args.show, tokenizers))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
