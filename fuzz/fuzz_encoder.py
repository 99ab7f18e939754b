"""
Fuzzes the tokenizer's native entry points: pretokenize, char_class and valid_utf8_prefix; and the Encoder,
built from an arbitrary vocabulary and special tokens, with encode_ordinary / encode / encode_batch /
encode_to_array / decode_bytes over arbitrary text, allowed_special, thread counts and ids.

    FUZZ_SECONDS=600 fuzz/run.sh fuzz/fuzz_encoder.py      # make fuzz runs every harness

Bad input must raise (harness.REFUSALS); a call that succeeds must be right: the pieces of pretokenize join
back to the text, decode_bytes(encode(text)) is the text's UTF-8, and the batch entry points give what
encode() gives one text at a time.
"""
import atheris

from harness import REFUSALS, main, native

_nanoslm = native()

WORDS = ["hello", " world", "é", " 日本", "😀", "'s", "'ll", "  ", "\n\n", " 123", "<|endoftext|>", "<|x|>", "\x00"]
SPECIAL_NAMES = ["<|endoftext|>", "<|x|>", "<|", "é", " world", "\n"]

# -----------------------------------------------------------------------------
# inputs: realistic pieces spliced with arbitrary ones


def some_text(fdp, specials=()):
    """Arbitrary text spliced with words, special tokens and runs long enough for the heap merge (> 128 bytes)."""
    parts = []
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        kind = fdp.ConsumeIntInRange(0, 5)
        if kind == 0:
            parts.append(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40)))
        elif kind == 1:
            parts.append(fdp.PickValueInList(WORDS))
        elif kind == 2 and specials:
            parts.append(fdp.PickValueInList(list(specials)))
        elif kind == 3:
            parts.append(fdp.PickValueInList(WORDS) * fdp.ConsumeIntInRange(1, 300))
        elif kind == 4:
            parts.append(fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 4)))  # may hold lone surrogates
        else:
            parts.append(fdp.ConsumeBytes(8).decode("latin-1"))
    return "".join(parts)


def some_id(fdp, n):
    """An id near the vocabulary's size n, or an edge of the integer types it crosses as."""
    if fdp.ConsumeIntInRange(0, 9):
        return fdp.ConsumeIntInRange(-1, n + 3)
    return fdp.PickValueInList([-2**63, -1, 2**31 - 1, 2**32 - 1, 2**32, 2**64])


def vocabulary(fdp):
    """(token_bytes, special_tokens): the 256 bytes at shifted ranks, then tokens (prefixes of WORDS, so merges
    chain, or arbitrary bytes: b"" is an unused rank, a repeat is refused), then (name, id) special tokens."""
    shift = fdp.ConsumeIntInRange(0, 255)
    token_bytes = [bytes([(b + shift) % 256]) for b in range(256)]
    if fdp.ConsumeIntInRange(0, 30) == 0:
        del token_bytes[fdp.ConsumeIntInRange(0, 255)]  # a byte missing: refused
    for _ in range(fdp.ConsumeIntInRange(0, 40)):
        if fdp.ConsumeBool():
            word = fdp.PickValueInList(WORDS).encode()
            token_bytes.append(word[:fdp.ConsumeIntInRange(2, max(2, len(word)))])
        else:
            token_bytes.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 6)))
    specials = []
    for i in range(fdp.ConsumeIntInRange(0, 3)):
        name = fdp.PickValueInList(SPECIAL_NAMES) if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(4)
        if fdp.ConsumeIntInRange(0, 15) == 0:
            name = name.encode()[1:]  # bytes, maybe not UTF-8: hostile
        specials.append((name, len(token_bytes) + i if fdp.ConsumeBool() else some_id(fdp, len(token_bytes))))
    return token_bytes, specials


# -----------------------------------------------------------------------------
# the entry points


def check_free_functions(fdp):
    text = some_text(fdp)
    try:
        pieces = _nanoslm.pretokenize(text)
        assert "".join(pieces) == text and all(pieces), (text, pieces)
    except REFUSALS:
        pass
    try:
        assert _nanoslm.char_class(some_id(fdp, 0x110000)) in (0, 1, 2, 3)
    except REFUSALS:
        pass
    data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
    n = _nanoslm.valid_utf8_prefix(data)
    assert 0 <= n <= len(data)
    data[:n].decode("utf-8")  # the prefix is valid ...
    for k in range(1, 5):  # ... and as long as can be
        if n + k <= len(data):
            try:
                data[n:n + k].decode("utf-8")
                raise AssertionError(f"valid_utf8_prefix({data!r}) = {n} stops before a valid character")
            except UnicodeDecodeError:
                pass


def check_encoder(fdp):
    token_bytes, specials = vocabulary(fdp)
    try:
        enc = _nanoslm.Encoder(token_bytes, specials)
    except REFUSALS:
        return
    names = [name for name, _ in specials]
    table = dict(enumerate(token_bytes))  # what decode_bytes must give per id (a dict: ids may be sparse)
    table.update((i, name.encode() if isinstance(name, str) else name) for name, i in specials)
    texts = [some_text(fdp, [n for n in names if isinstance(n, str)]) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    allowed = [fdp.PickValueInList(names + SPECIAL_NAMES) for _ in range(fdp.ConsumeIntInRange(0, 3))] if names else []
    num_threads = fdp.ConsumeIntInRange(-1, 4)
    append_id = some_id(fdp, enc.n_vocab)
    ids = [some_id(fdp, enc.n_vocab) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    round_trips = all(isinstance(n, str) for n in names)  # bytes names decode to bytes that are not text
    try:
        one_by_one = []
        for text in texts:
            ordinary = enc.encode_ordinary(text)
            assert enc.decode_bytes(ordinary) == text.encode(), text
            one_by_one.append(enc.encode(text, allowed))
            assert not round_trips or enc.decode_bytes(one_by_one[-1]) == text.encode(), (text, allowed)
        assert enc.encode_batch(texts, allowed, num_threads) == one_by_one
        array = enc.encode_to_array(texts, allowed, num_threads, append_id)
        expected = [i for row in one_by_one for i in row + ([append_id] if append_id >= 0 else [])]
        assert append_id < enc.n_vocab, f"encode_to_array took append_id {append_id} (n_vocab {enc.n_vocab})"
        assert array.dtype == "uint32" and array.tolist() == expected, (len(array), len(expected), append_id)
    except REFUSALS:
        pass
    try:
        decoded = enc.decode_bytes(ids)
        assert decoded == b"".join(table[i] for i in ids), ids
    except REFUSALS:
        assert any(not 0 <= i < enc.n_vocab or not table.get(i) for i in ids), ids


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        check_free_functions(fdp)
    else:
        check_encoder(fdp)


if __name__ == "__main__":
    main(test_one_input)
