"""
Fuzzes BPE training: BpeTrainer(special_tokens).add_texts(texts, num_threads), any number of times, then
train(num_merges), over arbitrary text, special tokens, thread counts and merge counts.

    FUZZ_SECONDS=600 fuzz/run.sh fuzz/fuzz_trainer.py      # make fuzz runs every harness

Bad input must raise (harness.REFUSALS); training that succeeds must give a vocabulary the Encoder takes:
merge k joins two earlier tokens into token 256 + k, no two tokens share bytes, and the trained vocabulary
encodes every training text back to itself.
"""
import atheris

from fuzz_encoder import some_text
from harness import REFUSALS, main, native

_nanoslm = native()

SPECIALS = ["<|endoftext|>", "<|x|>", "", "e", " ", "\n"]


def special_tokens(fdp):
    specials = []
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        name = fdp.PickValueInList(SPECIALS) if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(3)
        if fdp.ConsumeIntInRange(0, 15) == 0:
            name = name.encode()[1:]  # bytes, maybe not UTF-8: hostile
        specials.append(name)
    return specials


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    specials = special_tokens(fdp)
    try:
        trainer = _nanoslm.BpeTrainer(specials)
    except REFUSALS:
        return
    texts = []
    try:
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            batch = [some_text(fdp, [s for s in specials if isinstance(s, str) and s])
                     for _ in range(fdp.ConsumeIntInRange(0, 4))]
            trainer.add_texts(batch, fdp.ConsumeIntInRange(-1, 4))
            texts += batch
    except REFUSALS:
        return
    num_merges = fdp.ConsumeIntInRange(-3, 400) if fdp.ConsumeIntInRange(0, 9) else fdp.PickValueInList(
        [-2**31, 2**31 - 1, 2**31, 2**64])
    try:
        merges = trainer.train(num_merges)
    except REFUSALS:
        return
    assert len(merges) <= max(num_merges, 0)
    token_bytes = [bytes([b]) for b in range(256)]
    for left, right in merges:
        assert left < len(token_bytes) and right < len(token_bytes), (left, right, len(token_bytes))
        token_bytes.append(token_bytes[left] + token_bytes[right])
    assert len(set(token_bytes)) == len(token_bytes), "two merges made the same token"
    if not all(isinstance(s, str) for s in specials):
        return  # bytes special tokens may split a character: the texts' pieces are then not text
    enc = _nanoslm.Encoder(token_bytes, [])
    for text in texts:
        assert enc.decode_bytes(enc.encode_ordinary(text)) == text.encode(), text


if __name__ == "__main__":
    main(test_one_input, also_instrument=[some_text])
