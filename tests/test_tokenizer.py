"""
The tokenizer against tiktoken, id for id. tiktoken is built from the same ranks file (it cannot download)
and is the reference for everything that encodes: the bundled TinyStories text, adversarial text (every
Unicode category, whitespace runs, numbers in many scripts, contractions, emoji, combining marks, control
characters, very long words, random code points), the pre-tokenizer class of every code point, and special
tokens. Then decoding and bad input, BPE training (hand-worked merge orders, a slow Python reference
trainer, determinism, files), trained vocabularies read back by tiktoken, and the --show visualiser.

    python -m pytest tests/test_tokenizer.py -q --durations=10
"""
import functools
import gzip
import os
import pathlib
import random
import re
import subprocess
import sys
import unicodedata
from collections import Counter

import numpy as np
import pytest
import regex
import tiktoken
from tiktoken.load import load_tiktoken_bpe

import _nanoslm
import tokenizer as tokenizer_module
from tokenizer import EOT, Tokenizer, pretokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_RANKS_FILE = os.path.join(ROOT, "assets", "gpt2.tiktoken")
SAMPLE_DIR = os.path.join(ROOT, "data", "tinystories_sample")
# GPT-2's pre-tokenizer pattern, written out here (not imported) so the reference cannot share a typo with us.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# --- references, texts and the comparison helpers -------------------------------------------------------

def tiktoken_from(ranks_path, special_tokens):
    return tiktoken.Encoding(name=os.path.basename(ranks_path), mergeable_ranks=load_tiktoken_bpe(ranks_path),
                             special_tokens=special_tokens, pat_str=GPT2_PATTERN)


@pytest.fixture(scope="module")
def ref():
    """tiktoken's GPT-2 encoding, built from the bundled ranks."""
    return tiktoken_from(GPT2_RANKS_FILE, {EOT: 50256})


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.gpt2()


def read_sample(name):
    with gzip.open(os.path.join(SAMPLE_DIR, name), "rt", encoding="utf-8", newline="") as f:
        return f.read()


@pytest.fixture(scope="module")
def train_text():
    """TinyStories, stories separated by lines <|endoftext|> (3.5 M characters)."""
    return read_sample("train.txt.gz")


@pytest.fixture(scope="module")
def valid_text():
    """TinyStories validation text, blank-line separated (0.8 M characters)."""
    return read_sample("valid_blankline_separated.txt.gz")


def first_difference(got, expected):
    n = min(len(got), len(expected))
    return next((i for i in range(n) if got[i] != expected[i]), n)


def assert_same_ids(got, expected, ref_encoding, what="text"):
    """got == expected; if not, say where they first differ and show the text there."""
    if got == expected:
        return
    i = first_difference(got, expected)
    lo, hi = max(0, i - 6), i + 6
    pytest.fail(f"{what}: ids differ at position {i} of {len(expected)} (we made {len(got)} ids)\n"
                f"  ours:     {list(got[lo:hi])}\n  tiktoken: {list(expected[lo:hi])}\n"
                f"  text there (tiktoken's tokens): {[ref_encoding.decode_bytes([t]) for t in expected[lo:hi]]}\n"
                f"  text before it: {ref_encoding.decode_bytes(expected[max(0, i - 40):i])[-120:]!r}")


def short(text, n=120):
    return ascii(text if len(text) <= n else text[:n] + f"... ({len(text):,} chars)")


def check_against_tiktoken(tok, ref, texts):
    """Every text: our ids == tiktoken's (encode_ordinary), and decode gives the text back."""
    for text in texts:
        got, expected = tok.encode_ordinary(text), ref.encode_ordinary(text)
        if got != expected:
            i = first_difference(got, expected)
            pytest.fail(f"ids differ from tiktoken for {short(text)} at id {i}:\n"
                        f"  ours:     {got[max(0, i - 4):i + 6]}\n  tiktoken: {expected[max(0, i - 4):i + 6]}")
        assert tok.decode(got) == text, f"decode(encode(x)) != x for {short(text)}"


# --- GPT-2: known ids and the TinyStories text ----------------------------------------------------------

def test_known_ids(tok):
    assert tokenizer_module.GPT2_PATTERN == GPT2_PATTERN  # the pattern save() records beside a vocabulary
    assert tok.encode("hello world") == [31373, 995]
    assert tok.encode_ordinary("hello world") == [31373, 995]
    assert tok.decode([31373, 995]) == "hello world"
    assert tok.n_vocab == 50257 and tok.eot_token == 50256
    assert tok.encode(EOT, allowed_special="all") == [50256]


@pytest.mark.parametrize("name", ["train", "valid"])
def test_tinystories_whole_text_matches_tiktoken(tok, ref, train_text, valid_text, name):
    text = train_text if name == "train" else valid_text
    ids = tok.encode_ordinary(text)
    assert_same_ids(ids, ref.encode_ordinary(text), ref, f"{name} text, encode_ordinary")
    assert_same_ids(tok.encode(text, allowed_special="all"), ref.encode(text, allowed_special="all"), ref,
                    f"{name} text, encode(allowed_special='all')")
    assert tok.decode(ids) == text


def test_train_text_has_its_separators_as_special_tokens(tok, train_text):
    """The train file's <|endoftext|> lines become id 50256 with allowed_special, so the test above saw them."""
    ids = tok.encode(train_text, allowed_special="all")
    assert ids.count(50256) == train_text.count(EOT) > 1000
    assert tok.encode_ordinary(train_text).count(50256) == 0


@pytest.mark.parametrize("name", ["train", "valid"])
def test_tinystories_encode_batch_matches_tiktoken(tok, ref, train_text, valid_text, name):
    stories = train_text.split(EOT) if name == "train" else valid_text.split("\n\n")
    assert len(stories) > 1000
    two_threads = tok.encode_batch(stories, num_threads=2)
    assert two_threads == tok.encode_batch(stories, num_threads=1)
    expected = ref.encode_ordinary_batch(stories, num_threads=2)
    for i, (got, exp) in enumerate(zip(two_threads, expected)):
        assert_same_ids(got, exp, ref, f"story {i} of {name}")
    assert len(two_threads) == len(stories)


def test_encode_to_array_is_the_stories_ids_each_followed_by_eot(tok, train_text):
    stories = train_text.split(EOT)[:500]
    array = tok.encode_to_array(stories, num_threads=2)
    assert array.dtype == np.uint32
    expected = [i for story in stories for i in tok.encode_ordinary(story) + [50256]]
    assert array.tolist() == expected
    assert tok.encode_to_array(stories, append_eot=False).tolist() == [i for s in stories
                                                                       for i in tok.encode_ordinary(s)]


# --- adversarial text, generated with fixed seeds -------------------------------------------------------

WHITESPACE = [" ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x85", "\xa0", "\u1680",
              *map(chr, range(0x2000, 0x200B)), "\u2028", "\u2029", "\u202f", "\u205f", "\u3000"]
# Characters that look like whitespace (str.isspace() is True for the first four) but are not \s here.
NEAR_WHITESPACE = ["\x1c", "\x1d", "\x1e", "\x1f", "\u200b", "\u180e", "\ufeff", "\u2060"]


@pytest.fixture(scope="module")
def categories():
    """Unicode general category -> code points (surrogates left out: they are not text)."""
    buckets = {}
    for c in range(0x110000):
        if not 0xD800 <= c <= 0xDFFF:
            buckets.setdefault(unicodedata.category(chr(c)), []).append(c)
    return buckets


def category_cases(categories):
    rng = random.Random(1)
    cases, everything = [], []
    for category in sorted(categories):
        chars = [chr(c) for c in rng.sample(categories[category], min(300, len(categories[category])))]
        cases += ["".join(chars), " ".join(chars), "".join("a" + c for c in chars),
                  "".join("1" + c for c in chars), "".join(c + "'s " for c in chars)]
        everything += chars
    rng.shuffle(everything)
    glue = ["a", "Z", "é", "1", "9", "٣", " ", "  ", "\n", "'", "'s", "'ll", "!", ""]
    cases.append("".join(rng.choice(glue) + c for c in everything))  # all categories in one string
    return cases


def whitespace_cases():
    rng = random.Random(2)
    followers = ["", "a", "word", "7", "42", "!", "?!", "'s", "'", "é", "😀", "日本", "\u0301", "\x00"]
    cases = [before + ws * n + after for ws in WHITESPACE + NEAR_WHITESPACE for n in (1, 2, 3, 8, 257)
             for before in ("", "x", "1", ".") for after in followers]
    for ws in WHITESPACE:  # long runs of each kind, at the end of the text and before a word
        cases += [ws * 20_000, ws * 20_000 + "a", "a" + ws * 20_000 + "1"]
    for _ in range(500):  # mixed runs
        run = "".join(rng.choice(WHITESPACE + NEAR_WHITESPACE[:2]) for _ in range(rng.randint(1, 60)))
        cases.append(rng.choice(["", "x", " ", "\n"]) + run + rng.choice(followers))
    return cases


def number_cases(categories):
    rng = random.Random(3)
    cases = ["0", "7", "42", "123", "1234", "12345", "3.14", "-2.5", "1,000,000", "1e10", "1E-9", "0x1F",
             "12:30", "2024-01-01", "$9.99", "€5", "50%", "#1", "1st", "2nd", "v1.2.3", "192.168.0.1",
             "+1 (555) 123-4567", "½", "¼ cup", "x²", "H₂O", "Ⅻ", "ⅻ", "①②③", "٣٫١٤", "١٢٣", "१२३४",
             "১২৩", "๑๒๓", "１２３", "𝟏𝟐𝟑", "〇一二三", "〡〢〣", " 1 2 3 ", "1 000 000", "1\xa0000", "1\u202f000"]
    digits = [chr(c) for c in categories["Nd"]]
    zeros = [d for d in digits if unicodedata.digit(d) == 0]  # one zero per script's block of ten
    for zero in zeros:
        block = [chr(ord(zero) + k) for k in range(10)]
        for _ in range(3):
            number = "".join(rng.choices(block, k=rng.randint(1, 20)))
            cases += [number, " " + number, "a" + number, number + "x", number + "." + number,
                      number + rng.choice("0123456789")]
    others = [chr(c) for c in categories["Nl"] + categories["No"]]
    cases += ["".join(rng.choices(others, k=rng.randint(1, 8))) for _ in range(300)]
    cases.append(" ".join("".join(rng.choices(digits + others, k=rng.randint(1, 6))) for _ in range(3000)))
    return cases


def contraction_cases():
    heads = ["", "I", "it", "don", "they", "O", " he", "1", "!", " ", "\n", "é", "日本"]
    apostrophes = ["'", "''", "'''", "\u2019", "\u2018", "`", "\u02bc"]
    suffixes = ["s", "t", "re", "ve", "m", "ll", "d", "S", "T", "RE", "Re", "rE", "VE", "M", "LL", "Ll", "lL", "D",
                "sa", "st", "lll", "ved", "dd", "", " s", "1", "!", "'s", "é",
                # a letter that would be a contraction if the match ignored case, then a word
                "Sam", "She", "Tom", "Tell", "Mary", "Dan", "REd", "VEry", "LLama", "Ma", "Dog"]
    tails = ["", " ", "x", "!", "\n", "'"]
    return [h + a + s + t for h in heads for a in apostrophes for s in suffixes for t in tails]


EMOJI = ["😀", "👍", "👍🏽", "👍🏿", "👨\u200d👩\u200d👧\u200d👦", "👩🏽\u200d💻", "🧑\u200d🤝\u200d🧑",
         "🏳️\u200d🌈", "🇺🇸", "🇬🇧🇫🇷", "🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f", "❤️", "❤",
         "1️⃣", "#️⃣", "☺︎", "🫠", "🦄", "©", "™", "🏻"]


def emoji_cases():
    rng = random.Random(4)
    cases = []
    for e in EMOJI:
        cases += [e, e * 3, f" {e} ", f"a{e}b", f"1{e}2", f"!{e}!", f"{e}'s", f"I love {e}!", f"{e}\n{e}"]
    words = ["the", "cat", " ", "  ", "!", "42", "'s", "\n", "é"]
    cases.append("".join(rng.choice(EMOJI + words) for _ in range(5000)))
    return cases


def combining_cases(categories):
    rng = random.Random(5)
    marks = [chr(c) for c in range(0x300, 0x370)]
    all_marks = [chr(c) for c in categories["Mn"] + categories["Mc"] + categories["Me"]]
    cases = ["e\u0301", "cafe\u0301", "\u0301", " \u0301", "1\u0301", "!\u0301", "'\u0301s", "a\u0308\u0304",
             "Z" + "".join(rng.choices(marks, k=500)), "क्षि", "สวัสดี", "مَرْحَبًا", "\u1100\u1161\u11a8",
             "ﬁ", "Å", "A\u030a"]
    for word in ["zalgo", "hello world", "日本", "123", "it's", "  "]:
        cases.append("".join(ch + "".join(rng.choices(marks, k=rng.randint(5, 40))) for ch in word))
    cases.append("".join(rng.choice("aZ1 '!\n") + "".join(rng.choices(all_marks, k=rng.randint(0, 4)))
                         for _ in range(5000)))
    return cases


def control_cases():
    controls = [chr(c) for c in range(0x20)] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)]
    cases = []
    for c in controls:
        cases += [c, c * 3, f"a{c}b", f" {c} ", f"1{c}1", f"'{c}s", f"{c}'s", f"!{c}!", f"{c} a", f"a {c}"]
    cases.append("x".join(controls) + "".join(controls) + " ".join(controls))
    return cases


def random_codepoint_text(seed, n):
    """n code points drawn uniformly from all of Unicode but the surrogates (most are unassigned)."""
    rng = np.random.default_rng(seed)
    cps = rng.integers(0, 0x110000 - 0x800, size=n)
    cps[cps >= 0xD800] += 0x800
    return "".join(map(chr, cps.tolist()))


def mixed_text(seed, n):
    """n characters, weighted toward the pattern's edges: ASCII, whitespace, apostrophes, the BMP, anything."""
    rng = random.Random(seed)
    pools = [[chr(c) for c in range(0x20, 0x7F)], WHITESPACE + NEAR_WHITESPACE, ["'", "'s", "'ll", "'S"],
             [chr(c) for c in range(0x80, 0xD800)], list(random_codepoint_text(seed, 2000)), EMOJI]
    return "".join(rng.choice(rng.choices(pools, weights=[40, 15, 5, 25, 10, 5])[0]) for _ in range(n))


ADVERSARIAL = ["categories", "whitespace", "numbers", "contractions", "emoji", "combining", "controls", "random"]


@pytest.fixture(scope="module")
def adversarial(categories):
    return {
        "categories": category_cases(categories),
        "whitespace": whitespace_cases(),
        "numbers": number_cases(categories),
        "contractions": contraction_cases(),
        "emoji": emoji_cases(),
        "combining": combining_cases(categories),
        "controls": control_cases(),
        "random": [random_codepoint_text(6, 150_000), mixed_text(7, 150_000)],
    }


@pytest.mark.parametrize("kind", ADVERSARIAL)
def test_adversarial_text_matches_tiktoken(tok, ref, adversarial, kind):
    check_against_tiktoken(tok, ref, adversarial[kind])


def test_adversarial_text_in_a_batch(tok, ref, adversarial):
    texts = [t for kind in ADVERSARIAL for t in adversarial[kind]]
    assert tok.encode_batch(texts, num_threads=2) == [ref.encode_ordinary(t) for t in texts]


def test_pieces_match_the_regex(adversarial, train_text):
    """Our pre-tokenizer splits as the `regex` package does with the same pattern, on text whose characters
    are old enough for both to agree on their Unicode classes (tiktoken's view of every code point is
    checked separately below)."""
    pattern = regex.compile(GPT2_PATTERN)
    texts = [train_text[:200_000]] + adversarial["whitespace"] + adversarial["contractions"] + adversarial["controls"]
    for text in texts:
        expected = pattern.findall(text)
        assert pretokenize(text) == expected, f"pieces of {short(text)}"
    assert pretokenize("I'm here") == ["I", "'m", " here"]
    assert pretokenize("they'RE   x ") == ["they", "'", "RE", "  ", " x", " "]


# --- very long words: must be fast (a quadratic merge would take minutes at 1,000,000 characters) -------

LONG_TEXTS = {
    "x": lambda: "x" * 1_000_000,
    "random letters": lambda: "".join(random.Random(8).choices("abcdefghijklmnopqrstuvwxyz", k=1_000_000)),
    "one digit": lambda: "1" * 1_000_000,
    "random digits": lambda: "".join(random.Random(9).choices("0123456789", k=1_000_000)),
    "one emoji": lambda: "😀" * 250_000,
    "punctuation": lambda: "!" * 1_000_000,
    "accented letter": lambda: "é" * 1_000_000,
    "spaces": lambda: " " * 1_000_000,
    "newlines then a": lambda: "\n" * 1_000_000 + "a",
    "mixed whitespace": lambda: "".join(random.Random(10).choices(WHITESPACE, k=1_000_000)) + "x",
}
# How much of each text tiktoken is given: all of it where it takes < 1 s; its regex overflows its stack
# on a whitespace run of 1,000,000.
TIKTOKEN_CHARS = {"random digits": 300_000, "spaces": 100_000, "newlines then a": 100_000,
                  "mixed whitespace": 100_000}


@pytest.mark.parametrize("name", list(LONG_TEXTS))
def test_very_long_word(tok, ref, name):
    text = LONG_TEXTS[name]()
    ids = tok.encode_ordinary(text)
    assert tok.decode(ids) == text
    prefix = text[:TIKTOKEN_CHARS.get(name, len(text))]
    expected = ref.encode_ordinary(prefix)
    got = ids if prefix == text else tok.encode_ordinary(prefix)
    assert_same_ids(got, expected, ref, f"long text {name!r}")


# --- the pre-tokenizer class of every code point --------------------------------------------------------

# The pattern only asks of a character whether it is a letter (\p{L}), a number (\p{N}), whitespace (\s) or
# other. To read a code point's class off an encoder, put it after a probe character of a known class and
# see whether the two stay in one piece: c joins "a" only if it is a letter, "1" only if a number, "!" only
# if other, and none if whitespace. A vocabulary whose only merges are probe + (first byte of c) makes the
# pieces visible in the ids: joined, the unit "probe c \n" starts with a merged token (id >= 256); apart,
# with the probe's byte.
PROBES = {"a": 1, "1": 2, "!": 0}  # probe -> the class it joins, numbered as _nanoslm.char_class numbers them
CLASS_NAMES = {0: "other", 1: "letter", 2: "number", 3: "whitespace"}
LEAD_BYTES = [bytes([b]) for b in list(range(0x80)) + list(range(0xC2, 0xF5))]  # first bytes of UTF-8 chars


@pytest.fixture(scope="module")
def probe_vocab():
    tokens = [bytes([b]) for b in range(256)] + [p.encode() + lead for p in PROBES for lead in LEAD_BYTES]
    return {token: rank for rank, token in enumerate(tokens)}


@pytest.fixture(scope="module")
def all_codepoints():
    cps = np.arange(0x110000)
    return cps[(cps < 0xD800) | (cps > 0xDFFF)]


def classes_seen_by(encode, codepoints):
    """(class of each code point as encode's pre-tokenizer sees it, the ids of each probe text)."""
    chars = [chr(c) for c in codepoints.tolist()]
    utf8_len = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    unit_starts = np.cumsum(utf8_len + 2) - (utf8_len + 2)  # byte offset of each "probe c \n"
    classes = np.full(len(chars), 3)
    joins = np.zeros(len(chars), dtype=int)
    all_ids = {}
    for probe, cls in PROBES.items():
        ids = encode("".join(probe + c + "\n" for c in chars))
        all_ids[probe] = ids
        ids = np.asarray(ids)
        token_len = np.where(ids >= 256, 2, 1)
        token_starts = np.cumsum(token_len) - token_len
        at = np.minimum(np.searchsorted(token_starts, unit_starts), len(ids) - 1)
        misaligned = np.flatnonzero(token_starts[at] != unit_starts)
        assert misaligned.size == 0, f"probe {probe!r}: no token starts at the unit of U+{codepoints[misaligned[0]]:04X}"
        joined = ids[at] >= 256
        classes[joined] = cls
        joins += joined
    assert joins.max() <= 1, f"U+{codepoints[joins.argmax()]:04X} joins two probes"
    return classes, all_ids


@pytest.fixture(scope="module")
def tiktoken_classes(probe_vocab, all_codepoints):
    enc = tiktoken.Encoding("probe", pat_str=GPT2_PATTERN, mergeable_ranks=probe_vocab, special_tokens={})
    return classes_seen_by(enc.encode_ordinary, all_codepoints)


def describe_wrong_classes(codepoints, ours, theirs):
    wrong = np.flatnonzero(ours != theirs)
    return f"{wrong.size} code points in the wrong class, e.g. " + ", ".join(
        f"U+{codepoints[i]:04X} {CLASS_NAMES[ours[i]]} (tiktoken: {CLASS_NAMES[theirs[i]]})" for i in wrong[:10])


def test_every_codepoint_is_pretokenized_as_tiktoken_does(probe_vocab, all_codepoints, tiktoken_classes):
    expected_classes, expected_ids = tiktoken_classes
    counts = np.bincount(expected_classes, minlength=4)
    assert counts[1] > 100_000 and counts[2] > 1_000 and counts[3] == 25  # the probe construction works
    assert expected_classes[[ord("a"), ord("7"), ord(" "), ord("!"), 0x3000, 0x4E00]].tolist() == [1, 2, 3, 0, 3, 1]
    ours = Tokenizer(probe_vocab, {})
    classes, ids = classes_seen_by(ours.encode_ordinary, all_codepoints)
    assert np.array_equal(classes, expected_classes), describe_wrong_classes(all_codepoints, classes,
                                                                            expected_classes)
    for probe in PROBES:
        assert ids[probe] == expected_ids[probe], f"probe {probe!r}: ids differ from tiktoken's"


def test_char_class_of_every_codepoint_matches_tiktoken(all_codepoints, tiktoken_classes):
    expected_classes, _ = tiktoken_classes
    classes = np.array([int(_nanoslm.char_class(c)) for c in all_codepoints.tolist()])
    assert np.array_equal(classes, expected_classes), describe_wrong_classes(all_codepoints, classes,
                                                                            expected_classes)


# --- special tokens ------------------------------------------------------------------------------------

SPECIAL_TEXTS = [EOT, "a" + EOT + "b", EOT + EOT, EOT + EOT + EOT, " " + EOT + " ", EOT + "hello", "hello " + EOT,
                 "<" + EOT + ">", "<|endoftext|", "|endoftext|>", EOT + "'s", "'" + EOT + "s", "\n" + EOT + "\n",
                 "1" + EOT + "2", "<|endof" + EOT + "text|>", "Once upon a time." + EOT + "\nThe end."]


@pytest.mark.parametrize("text", SPECIAL_TEXTS)
def test_special_tokens_like_tiktoken(tok, ref, text):
    for allowed in ({EOT}, "all"):
        assert tok.encode(text, allowed_special=allowed) == ref.encode(text, allowed_special=allowed)
    assert tok.encode(text, disallowed_special=()) == ref.encode(text, disallowed_special=())
    assert tok.encode_ordinary(text) == ref.encode_ordinary(text)
    assert tok.encode_batch([text, text], allowed_special="all", num_threads=2) == \
        [ref.encode(text, allowed_special="all")] * 2
    if EOT in text:
        for encode in (tok.encode, ref.encode):
            with pytest.raises(ValueError):
                encode(text)
        with pytest.raises(ValueError, match="allowed_special"):
            tok.encode_batch(["fine", text])
        assert 50256 not in tok.encode_ordinary(text)
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


def test_special_token_ids(tok):
    assert tok.encode(EOT + EOT, allowed_special={EOT}) == [50256, 50256]
    assert tok.encode(EOT + "hi" + EOT, allowed_special="all") == [50256, 5303, 50256]
    assert tok.encode(EOT, disallowed_special=()) == tok.encode_ordinary(EOT) == [27, 91, 437, 1659, 5239, 91, 29]


def test_unknown_special_token_is_refused(tok):
    with pytest.raises(ValueError, match="<|pad|>"):
        tok.encode("hello", allowed_special={"<|pad|>"})
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode_batch(["hello"], allowed_special={"<|pad|>"})


def test_two_special_tokens_like_tiktoken():
    specials = {EOT: 50256, "<|pad|>": 50257}
    ranks = load_tiktoken_bpe(GPT2_RANKS_FILE)
    ours = Tokenizer(ranks, specials)
    theirs = tiktoken.Encoding("gpt2pad", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    assert ours.n_vocab == 50258
    text = "a<|pad|>b" + EOT + "<|pad|><|pad|>c"
    for kwargs in [dict(allowed_special="all"), dict(allowed_special={"<|pad|>"}, disallowed_special=()),
                   dict(allowed_special={EOT}, disallowed_special=()), dict(disallowed_special=())]:
        assert ours.encode(text, **kwargs) == theirs.encode(text, **kwargs), kwargs
    for kwargs in [dict(allowed_special={"<|pad|>"}), dict(allowed_special={EOT}), {}]:
        for encoder in (ours, theirs):
            with pytest.raises(ValueError):
                encoder.encode(text, **kwargs)


def test_many_and_overlapping_special_tokens_split_longest_first():
    """Special tokens are found earliest first, the longest of those starting at the same place; checked
    against a plain Python split on text dense with them (the finder remembers each token's next place)."""
    specials = {EOT: 50256, "<|a|>": 50257, "<|a|>b": 50258, "|>": 50259}
    tok = Tokenizer(load_tiktoken_bpe(GPT2_RANKS_FILE), specials)
    rng = random.Random(0)
    parts = list(specials) + ["x", "b", " <|a", "|", "hello ", "\n"]
    for _ in range(200):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 40)))
        expected, pos = [], 0
        while pos < len(text):
            starts = [(text.find(s, pos), -len(s), s) for s in specials if text.find(s, pos) >= 0]
            if not starts:
                expected += tok.encode_ordinary(text[pos:])
                break
            start, _, special = min(starts)
            expected += tok.encode_ordinary(text[pos:start]) + [specials[special]]
            pos = start + len(special)
        assert tok.encode(text, allowed_special="all") == expected, text


def test_special_tokens_must_be_distinct_non_empty_and_in_range():
    ranks = {bytes([b]): b for b in range(256)}
    for specials, message in (({"": 256}, "non-empty"), ({"<|a|>": 256, "<|b|>": 256}, "share an id"),
                              ({"<|a|>": 2**32 - 1}, "outside")):
        with pytest.raises(ValueError, match=message):
            Tokenizer(ranks, specials)
    with pytest.raises(ValueError, match="non-empty"):
        Tokenizer.train(["some text"], vocab_size=300, special_tokens=["", EOT])


# --- decoding and bad input ----------------------------------------------------------------------------

def test_decode_cut_through_a_character(tok, ref):
    ids = tok.encode("😀")
    assert len(ids) == 2 and ids == ref.encode("😀")
    assert tok.decode(ids[:1]) == ref.decode(ids[:1]) == "\ufffd"
    assert tok.decode_bytes(ids[:1]) == "😀".encode()[:len(tok.decode_bytes(ids[:1]))]
    with pytest.raises(UnicodeDecodeError):
        tok.decode(ids[:1], errors="strict")
    assert tok.decode(ids, errors="strict") == "😀"


@pytest.mark.parametrize("bad_id", [50257, 10**6, -1, 2**32, 2**64])
def test_decode_unknown_id_raises(tok, bad_id):
    with pytest.raises(ValueError):
        tok.decode([31373, bad_id])


def test_decode_unused_rank_raises():
    tok = Tokenizer({bytes([b]): b for b in range(256)}, {EOT: 300})  # ids 256..299 are no token
    assert tok.n_vocab == 301 and tok.decode([300, 104, 105]) == EOT + "hi"
    with pytest.raises(ValueError, match="280"):
        tok.decode([280])


@pytest.mark.parametrize("method", ["encode", "encode_ordinary", "encode_batch", "pretokenize", "train"])
def test_lone_surrogate_is_a_clear_error(tok, method):
    text = "a\ud800b"
    call = {"encode": lambda: tok.encode(text), "encode_ordinary": lambda: tok.encode_ordinary(text),
            "encode_batch": lambda: tok.encode_batch(["fine", text], num_threads=2),
            "pretokenize": lambda: pretokenize(text),
            "train": lambda: Tokenizer.train(["fine text", text], vocab_size=300)}[method]
    with pytest.raises(ValueError, match="surrogate"):
        call()


@pytest.mark.parametrize("bad", [b"bytes", None, 42, ["a list"]])
def test_non_str_input_is_a_type_error(tok, bad):
    for call in (lambda: tok.encode(bad), lambda: tok.encode_ordinary(bad), lambda: tok.encode_batch(["ok", bad])):
        with pytest.raises(TypeError):
            call()


# --- training: worked examples and a slow reference ---------------------------------------------------

def learned_tokens(tok):
    """The learned tokens in merge order (token 256 first), special tokens left out."""
    specials = set(tok.special_tokens.values())
    return [tok.token_bytes(i) for i in range(256, tok.n_vocab) if i not in specials]


def test_worked_example_low_lower_lowest_newest():
    """
    Pieces: "low", " lower", " lowest", " newest" (one each). The rule: merge the most frequent pair;
    a tie goes to the greater (left bytes, right bytes).

    1. Counts: (l,o) 3, (o,w) 3, (w,e) 3 [lower, lowest, newest], (' ',l) 2, (e,s) 2, (s,t) 2, and
       (e,r) (' ',n) (n,e) (e,w) 1. Three pairs tie at 3; the greatest left is b'w'  -> we  (256)
       low | ' ' l o we r | ' ' l o we s t | ' ' n e we s t
    2. (l,o) 3 is now alone at the top ((o,w) fell to 1, (o,we) is 2)               -> lo  (257)
       lo w | ' ' lo we r | ' ' lo we s t | ' ' n e we s t
    3. At 2: (' ',lo), (lo,we), (we,s), (s,t); greatest left b'we'                   -> wes (258)
       lo w | ' ' lo we r | ' ' lo wes t | ' ' n e wes t
    4. At 2: (' ',lo), (wes,t); b'wes' > b' '                                        -> west (259)
       lo w | ' ' lo we r | ' ' lo west | ' ' n e west
    5. At 2: only (' ',lo)                                                           -> ' lo' (260)
       lo w | ' lo' we r | ' lo' west | ' ' n e west
    6. All pairs at 1: (lo,w) (' lo',we) (we,r) (' lo',west) (' ',n) (n,e) (e,west);
       greatest left b'we'                                                           -> wer (261)
    """
    tok = Tokenizer.train(["low lower lowest newest"], vocab_size=256 + 6 + 1)
    assert learned_tokens(tok) == [b"we", b"lo", b"wes", b"west", b" lo", b"wer"]
    assert tok.special_tokens == {EOT: 262} and tok.n_vocab == 263
    assert tok.encode(" lowest") == [260, 259]


def test_worked_example_overlapping_pairs():
    """
    "aaabdaaabac" is one piece. Pairs in "aaa" overlap and count twice, so (a,a) is 4, (a,b) 2:
    1. (a,a) 4                                      -> aa       aa a b d aa a b a c  (merged left to right)
    2. (aa,a) 2 ties (a,b) 2; b'aa' > b'a'           -> aaa      aaa b d aaa b a c
    3. (aaa,b) 2                                    -> aaab     aaab d aaab a c
    4. all 1: lefts aaab, d, aaab, a; b'd' greatest -> daaab    aaab daaab a c
    5. all 1: lefts aaab, daaab, a                  -> daaaba   aaab daaaba c
    6. (daaaba,c) beats (aaab,daaaba)               -> daaabac
    7. the last pair                                -> aaabdaaabac; then no pairs are left.
    Counted without overlaps, (a,a) would be 2 and tie (a,b), which wins the tie (b'b' > b'a').
    """
    tok = Tokenizer.train(["aaabdaaabac"], vocab_size=256 + 7 + 1)
    assert learned_tokens(tok) == [b"aa", b"aaa", b"aaab", b"daaab", b"daaaba", b"daaabac", b"aaabdaaabac"]
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(["aaabdaaabac"], vocab_size=256 + 8 + 1)


def test_worked_example_tie_on_the_left_string():
    """
    Three texts, so three pieces: "ab", "ac", "xb". Every pair occurs once: (a,b), (a,c), (x,b).
    1. The greatest left string is b'x'                                   -> xb
    2. (a,b) and (a,c) tie on the left string b'a'; b'c' > b'b'          -> ac
    3. The last pair                                                      -> ab
    """
    tok = Tokenizer.train(["ab", "ac", "xb"], vocab_size=256 + 3 + 1)
    assert learned_tokens(tok) == [b"xb", b"ac", b"ab"]


def reference_train(texts, num_merges, special_tokens=(EOT,)):
    """The obvious BPE trainer the fast one must agree with: split at special tokens, then into pieces by the
    pattern; at each step count every adjacent pair of every piece afresh (overlaps count), merge the most
    frequent (ties: the greater (left bytes, right bytes)) left to right everywhere. Returns the new tokens."""
    split_at_specials = regex.compile("|".join(regex.escape(s) for s in special_tokens))
    piece_counts = Counter()
    for text in texts:
        for part in split_at_specials.split(text):
            piece_counts.update(regex.findall(GPT2_PATTERN, part))
    words = [(list(piece.encode()), n) for piece, n in piece_counts.items()]
    token_bytes = [bytes([b]) for b in range(256)]
    for _ in range(num_merges):
        pair_counts = Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += n
        if not pair_counts:
            break
        best = max(pair_counts, key=lambda p: (pair_counts[p], token_bytes[p[0]], token_bytes[p[1]]))
        new_id = len(token_bytes)
        token_bytes.append(token_bytes[best[0]] + token_bytes[best[1]])
        for ids, _ in words:
            i = 0
            while i < len(ids) - 1:
                if ids[i] == best[0] and ids[i + 1] == best[1]:
                    ids[i:i + 2] = [new_id]
                i += 1
        words = [(ids, n) for ids, n in words if len(ids) > 1]
    return token_bytes[256:]


def reference_training_texts(train_text):
    rng = random.Random(11)
    runs = ["a" * n for n in range(1, 12)] + ["!" * n for n in range(1, 9)] + [" " * n for n in range(1, 9)] + \
        ["1" * n for n in range(1, 9)] + ["😀" * n for n in range(1, 5)] + ["ab" * n for n in range(1, 6)]
    words = ["naïve", "café", "日本語", "Ελληνικά", "кошка", "it's", "I'LL", "  ", "\n\n", "\t", "1,234", "?!"]
    mixture = " ".join(rng.choice(runs + words) for _ in range(4000))
    return [train_text[:40_000], mixture, "x" + EOT + "x!!" + EOT + "!!x"]


def test_training_matches_the_reference_trainer(train_text):
    texts = reference_training_texts(train_text)
    for text in texts:
        assert pretokenize(text) == regex.findall(GPT2_PATTERN, text)  # so the reference splits as we do
    num_merges = 250
    tok = Tokenizer.train(texts, vocab_size=256 + num_merges + 1, num_threads=2)
    expected = reference_train(texts, num_merges)
    got = learned_tokens(tok)
    i = first_difference(got, expected)
    assert got == expected, f"merge {i} differs: we learned {got[i:i + 3]}, the reference {expected[i:i + 3]}"


# --- training: properties ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_corpus(train_text):
    return train_text[:300_000]


def test_training_is_deterministic(small_corpus):
    first = Tokenizer.train([small_corpus], vocab_size=600, num_threads=1)
    assert Tokenizer.train([small_corpus], vocab_size=600, num_threads=1).mergeable_ranks == first.mergeable_ranks
    assert Tokenizer.train([small_corpus], vocab_size=600, num_threads=2).mergeable_ranks == first.mergeable_ranks
    assert first.content_hash == Tokenizer.train([small_corpus], vocab_size=600, num_threads=2).content_hash


def test_texts_or_one_text_joined_by_eot_train_the_same(small_corpus):
    stories = small_corpus.split(EOT)
    assert len(stories) > 100
    separately = Tokenizer.train(stories, vocab_size=600, num_threads=2)
    joined = Tokenizer.train([EOT.join(stories)], vocab_size=600, num_threads=2)
    assert separately.mergeable_ranks == joined.mergeable_ranks
    # ... and joined by something else than a special token, the text trains differently
    other = Tokenizer.train(["\n".join(stories)], vocab_size=600, num_threads=2)
    assert other.mergeable_ranks != joined.mergeable_ranks


def test_special_tokens_are_never_merged_across():
    """
    To the pattern alone, '?!!<|endoftext|>!!?' is one piece of punctuation; split at the special token first,
    the pieces are '?!!', '!!?', '<<', '>>' and 'x' (50 each), and no learned token holds '|' or crosses one.
    Counts: (!,!) 100, then (?,!), (!,?), (<,<), (>,>) 50 each -> !!; then (?,!!), (!!,?), (<,<), (>,>) tie at
    50 and go by left string: b'?' > b'>' > b'<' > b'!!' -> ?!!, >>, <<, !!?; then no pair is left.
    """
    texts = ["?!!" + EOT + "!!?" + EOT + "<<" + EOT + ">>" + EOT + "x" + EOT] * 50
    tok = Tokenizer.train(texts, vocab_size=256 + 5 + 1)
    assert learned_tokens(tok) == [b"!!", b"?!!", b">>", b"<<", b"!!?"]
    assert tok.special_tokens == {EOT: 261}
    with pytest.raises(ValueError, match="corpus is too small"):
        Tokenizer.train(texts, vocab_size=256 + 6 + 1)


def test_special_token_text_is_never_learned(train_text):
    tok = Tokenizer.train([train_text[:200_000]], vocab_size=2000)
    for token in learned_tokens(tok):
        assert b"endoftext" not in token and b"<|" not in token and b"|>" not in token, token


def test_ids_are_merge_order_and_vocab_size_counts_everything(small_corpus):
    tok = Tokenizer.train([small_corpus], vocab_size=700, special_tokens=[EOT, "<|pad|>"])
    assert tok.n_vocab == 700 and tok.special_tokens == {EOT: 698, "<|pad|>": 699}
    assert len(tok.mergeable_ranks) == 698
    assert all(tok.token_bytes(b) == bytes([b]) for b in range(256))
    assert len(tok.token_bytes(256)) == 2  # the first merge joins two bytes
    # every learned token is the concatenation of two earlier tokens
    earlier = {tok.token_bytes(b) for b in range(256)}
    for i in range(256, 698):
        token = tok.token_bytes(i)
        assert any(token[:k] in earlier and token[k:] in earlier for k in range(1, len(token))), (i, token)
        earlier.add(token)
    assert tok.encode(EOT + "<|pad|>", allowed_special="all") == [698, 699]
    assert Tokenizer.train([small_corpus], vocab_size=300, special_tokens=()).n_vocab == 300


def test_first_merge_is_the_most_frequent_pair(small_corpus):
    tok = Tokenizer.train([small_corpus], vocab_size=258)
    pair_counts = Counter()
    for piece, n in Counter(p for part in small_corpus.split(EOT) for p in pretokenize(part)).items():
        b = piece.encode()
        for pair in zip(b, b[1:]):
            pair_counts[pair] += n
    best = max(pair_counts, key=lambda p: (pair_counts[p], p))
    assert tok.token_bytes(256) == bytes(best)


@pytest.mark.parametrize("vocab_size", [0, 100, 255, 256])
def test_vocab_size_too_small(vocab_size):
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(["some text to learn from"], vocab_size=vocab_size)


def test_corpus_too_small_for_the_vocab():
    """Pieces "ab" and " ab": two merges (ab, then ' ' + ab) and no pair is left."""
    assert Tokenizer.train(["ab ab"], vocab_size=256 + 2 + 1).n_vocab == 259
    with pytest.raises(ValueError, match="corpus is too small"):
        Tokenizer.train(["ab ab"], vocab_size=256 + 3 + 1)


# --- training from files ------------------------------------------------------------------------------

def write_text(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return path


def pieces_split_at_specials(text):
    return [p for part in text.split(EOT) for p in pretokenize(part)]


def chunky_text():
    """Text with few safe cuts: non-ASCII lines, CRLF, whitespace runs, specials, contractions at line starts."""
    rng = random.Random(12)
    lines = ["日本語の文", "naïve café", "a\r\nb", "   indented", "it's\n's", "x\n\ny", "!\n!", "1\n2", "\t\n\t",
             "plain ascii line", "end " + EOT, EOT + "start", "\u3000\n\u3000", "😀\n😀", "'\nll"]
    return "\n".join(rng.choice(lines) for _ in range(20_000))


def test_file_chunks_cut_only_between_pieces(tmp_path):
    text = chunky_text()
    path = write_text(tmp_path / "chunky.txt", text)
    chunks = list(tokenizer_module._read_file_chunks(path, [EOT], 97))
    assert len(chunks) > 100
    assert "".join(chunks) == text
    assert [p for chunk in chunks for p in pieces_split_at_specials(chunk)] == pieces_split_at_specials(text)


def test_training_from_a_file_equals_training_from_its_text(tmp_path, monkeypatch, train_text):
    text = train_text + chunky_text()
    path = write_text(tmp_path / "corpus.txt", text)
    from_text = Tokenizer.train([text], vocab_size=1000)
    # Read the file in small chunks, so the chunking and batching are exercised on a 4 MB file.
    chunks = []
    read_file_chunks = tokenizer_module._read_file_chunks
    monkeypatch.setattr(tokenizer_module, "_read_file_chunks",
                        lambda *args: (chunks.append(c) or c for c in read_file_chunks(*args)))
    monkeypatch.setattr(tokenizer_module, "_text_batches",
                        functools.partial(tokenizer_module._text_batches, batch_bytes=64 << 10))
    from_file = Tokenizer.train([pathlib.Path(path)], vocab_size=1000)
    assert len(chunks) > 50 and "".join(chunks) == text
    assert from_file.mergeable_ranks == from_text.mergeable_ranks
    assert from_file.content_hash == from_text.content_hash


def test_training_from_several_files_and_texts(tmp_path, small_corpus):
    stories = small_corpus.split(EOT)
    half = len(stories) // 2
    a = write_text(tmp_path / "a.txt", EOT.join(stories[:half]))
    expected = Tokenizer.train(stories, vocab_size=500)
    assert Tokenizer.train([pathlib.Path(a)] + stories[half:], vocab_size=500).mergeable_ranks == \
        expected.mergeable_ranks


@pytest.mark.parametrize("content, offset", [(b"hello\n\xff\xfe world\n", 6), (b"caf\xe9 au lait\n" * 3, 3),
                                             (b"ok " * 50_000 + b"\x80", 150_000), ("😀".encode()[:3], 0)])
def test_non_utf8_file_is_a_clear_error(tmp_path, content, offset):
    path = tmp_path / "latin1_story.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + f".*at byte {offset:,}\\)"):
        Tokenizer.train([path], vocab_size=300)


def test_non_utf8_offset_counts_from_the_start_of_the_file(tmp_path):
    path = tmp_path / "late.txt"
    path.write_bytes("é".encode() * 100 + b"\xff")  # read in 97-byte blocks: an é is cut at each block's end
    with pytest.raises(ValueError, match="at byte 200\\)"):
        list(tokenizer_module._read_file_chunks(path, [EOT], 97))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Tokenizer.train([tmp_path / "nope.txt"], vocab_size=300)


# --- trained vocabularies: save, load, and tiktoken reads them ------------------------------------------

@pytest.fixture(scope="module", params=[1024, 4096])
def trained(request, train_text, tmp_path_factory):
    """(tokenizer trained on the TinyStories text, the path it was saved to)."""
    tok = Tokenizer.train([train_text], vocab_size=request.param, num_threads=2)
    path = str(tmp_path_factory.mktemp("vocab") / f"stories{request.param}.tiktoken")
    tok.save(path)
    return tok, path


def test_save_load_round_trip(trained):
    tok, path = trained
    loaded = Tokenizer.load(path)
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.special_tokens == tok.special_tokens == {EOT: tok.n_vocab - 1}
    assert loaded.content_hash == tok.content_hash and loaded.n_vocab == tok.n_vocab
    assert loaded.name == os.path.basename(path).split(".")[0]


def test_trained_vocab_matches_tiktoken(trained, valid_text, adversarial):
    tok, path = trained
    ref = tiktoken_from(path, tok.special_tokens)
    assert ref.n_vocab == tok.n_vocab
    assert_same_ids(tok.encode_ordinary(valid_text), ref.encode_ordinary(valid_text), ref, "validation text")
    text = valid_text[:100_000] + EOT + valid_text[100_000:120_000]
    assert_same_ids(tok.encode(text, allowed_special="all"), ref.encode(text, allowed_special="all"), ref,
                    "validation text with a special token")
    assert len(tok.encode_ordinary(valid_text)) < len(valid_text.encode()) / 2.5  # it learned something
    for kind in ("categories", "whitespace", "contractions", "random"):
        check_against_tiktoken(Tokenizer.load(path), ref, adversarial[kind])


def test_content_hash_tells_vocabularies_apart(trained, tok):
    trained_tok, _ = trained
    assert trained_tok.content_hash != tok.content_hash
    renumbered = Tokenizer(trained_tok.mergeable_ranks, {EOT: trained_tok.n_vocab})
    assert renumbered.content_hash != trained_tok.content_hash


# --- the visualiser ------------------------------------------------------------------------------------

def run_show(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tokenizer.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_show_prints_tokens_and_ids():
    result = run_show("--show", "I love NLP")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "4 tokens" in lines[0] and "gpt2" in lines[0]
    assert re.search(r"' love'\s+1842$", result.stdout, re.MULTILINE)
    assert [line.split()[-1] for line in lines[2:]] == ["40", "1842", "399", "19930"]


def test_show_beside_a_trained_vocab(trained):
    tok, path = trained
    text = "Once upon a time, Lily saw a big dog."
    result = run_show("--show", text, f"--vocab={path}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    gpt2_ids, our_ids = Tokenizer.gpt2().encode(text), tok.encode(text)
    assert "gpt2" in lines[0] and f"{len(gpt2_ids)} tokens" in lines[0]
    assert os.path.basename(path).split(".")[0] in lines[0] and f"{len(our_ids)} tokens" in lines[0]
    assert len(lines) == 2 + max(len(gpt2_ids), len(our_ids))
    assert [line.split()[-1] for line in lines[2:2 + len(our_ids)]] == [str(i) for i in our_ids]
    assert str(tok.n_vocab) in lines[0].replace(",", "")


def test_show_missing_vocab_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "missing.tiktoken")
    result = run_show("--show", "hi", f"--vocab={missing}")
    assert result.returncode != 0
    assert "missing.tiktoken" in result.stderr and "Traceback" not in result.stderr
