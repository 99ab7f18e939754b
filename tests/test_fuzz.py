"""
The fuzz harnesses (fuzz/, run under ASan + UBSan by `make fuzz`) kept working, and what their runs found,
kept fixed: a smoke of each harness's test_one_input over a few fixed inputs against the normal build (a
few seconds, no sanitizer), then one regression test per finding.

    python -m pytest -q tests/test_fuzz.py
"""
import importlib
import os
import random
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "fuzz"))
pytest.importorskip("atheris")

from system import native  # noqa: E402

_nanoslm = native()

HARNESSES = ["fuzz_encoder", "fuzz_trainer", "fuzz_data", "fuzz_decoder"]


def smoke_inputs(n=150):
    """Fixed inputs: the empty one, runs of one byte, and seeded random bytes of every length up to 300."""
    rng = random.Random(1337)
    inputs = [b"", b"\x00" * 64, b"\xff" * 64, bytes(range(256))]
    return inputs + [bytes(rng.randrange(256) for _ in range(rng.randrange(300))) for _ in range(n)]


@pytest.mark.parametrize("name", HARNESSES)
def test_harness_smoke(name):
    harness = importlib.import_module(name)
    assert harness._nanoslm is _nanoslm  # without NANOSLM_FUZZ_BUILD, the normal build
    for data in smoke_inputs():
        harness.test_one_input(data)


def test_a_harness_refuses_to_fuzz_the_wrong_build(tmp_path):
    """Under fuzz/run.sh a harness must test the sanitized build; one that imported another stops."""
    import subprocess
    env = dict(os.environ, NANOSLM_FUZZ_BUILD=str(tmp_path))  # an empty folder: the import finds the normal one
    run = subprocess.run([sys.executable, "-c", "import harness; harness.native()"], cwd=os.path.join(ROOT, "fuzz"),
                         env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "not the sanitized build" in run.stderr


# -----------------------------------------------------------------------------
# findings, each fixed


def test_gather_batch_refuses_the_largest_block_size():
    """fuzz_data: block_size 2**63 - 1 overflowed int64 (block_size + 1, UBSan) in gather_batch's error."""
    data = np.arange(10, dtype=np.uint16)
    x = y = np.zeros((1, 1), dtype=np.int64)
    with pytest.raises(IndexError, match="leaves no room for block_size 9223372036854775807"):
        _nanoslm.gather_batch(data, np.zeros(1, dtype=np.int64), 2**63 - 1, x, y)


def test_a_special_token_far_past_the_vocabulary_costs_one_entry():
    """fuzz_encoder: special id 2**31 - 1 made the Encoder build a table of 2**31 strings (64 GB; past
    libFuzzer's malloc limit, an OOM kill outside it). Specials now sit in their own map."""
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    enc = _nanoslm.Encoder([bytes([b]) for b in range(256)], [("<|end|>", 2**31 - 1), ("<|x|>", 300)])
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB: under 100 MB more
    assert enc.n_vocab == 2**31
    assert enc.encode("a<|end|>", ["<|end|>"]) == [97, 2**31 - 1]
    assert enc.decode_bytes([97, 2**31 - 1, 300]) == b"a<|end|><|x|>"
    for unused in (256, 299, 2**31 - 2):
        with pytest.raises(IndexError, match=f"token id {unused} is not in the vocabulary"):
            enc.decode_bytes([unused])


def test_encode_to_array_refuses_an_append_id_outside_the_vocabulary():
    """fuzz_encoder: append_id 2**32 was written as 0 (uint32 wrap) after each text, silently."""
    enc = _nanoslm.Encoder([bytes([b]) for b in range(256)], [("<|endoftext|>", 256)])
    assert enc.encode_to_array(["ab", "c"], [], 1, 256).tolist() == [97, 98, 256, 99, 256]
    assert enc.encode_to_array(["ab", "c"], [], 1, -1).tolist() == [97, 98, 99]
    for bad in (257, 2**32):
        with pytest.raises(ValueError, match=f"append_id {bad} is not in the vocabulary"):
            enc.encode_to_array(["ab"], [], 1, bad)


def test_two_special_tokens_cannot_share_an_id():
    """fuzz_encoder: specials ("<|endoftext|>", 263) and ("<|", 263) were taken; encode gave 263 for
    "<|endoftext|>" and decode_bytes turned it into "<|" (Tokenizer refused this; the native Encoder did not)."""
    byte_tokens = [bytes([b]) for b in range(256)]
    with pytest.raises(ValueError, match="special token id 263 is given to two tokens"):
        _nanoslm.Encoder(byte_tokens, [("<|endoftext|>", 263), ("<|", 263)])
    enc = _nanoslm.Encoder(byte_tokens, [("<|endoftext|>", 263), ("<|endoftext|>", 263)])  # the same twice: fine
    assert enc.decode_bytes(enc.encode("a<|endoftext|>", ["<|endoftext|>"])) == b"a<|endoftext|>"


def layerless_decoder_config(**sizes):
    """A Decoder config with no layers (embedding, final norm, head) and its weights: sizes overridden by
    **sizes, the weights always those of the small default (a config that must be refused never reads them)."""
    config = dict(n_layer=0, n_head=1, n_embd=2, hidden=4, vocab_size=3, block_size=2, batch_size=1, rmsnorm=True,
                  swiglu=False, rope=False, eps=1e-5)
    rng = np.random.default_rng(0)
    weights = dict(wte=rng.standard_normal((3, 2)).astype(np.float32), lm_head=rng.standard_normal((3, 2)).astype(
        np.float32), ln_f_weight=np.ones(2, np.float32), wpe=np.zeros((2, 2), np.float32))
    return dict(config, **sizes), weights


def test_the_decoder_refuses_sizes_whose_products_overflow_an_int():
    """fuzz_decoder: hidden 2**30 with swiglu made `2 * hidden` (the fc rows) overflow int (UBSan), before any
    weight was checked. Every product of sizes the step indexes with must fit a 32-bit int (and the check itself
    must not overflow: 3 * n_embd * n_embd for n_embd 2**31 - 1 leaves int64, found by the next run)."""
    for sizes in (dict(hidden=2**30, swiglu=True), dict(hidden=2**31 - 1), dict(n_embd=2**16, vocab_size=2**16), dict(n_embd=2**31 - 1),
                  dict(batch_size=2**16, block_size=2**16)):
        config, weights = layerless_decoder_config(**sizes)
        with pytest.raises(ValueError, match="too large: a product of its sizes does not fit a 32-bit index"):
            _nanoslm.Decoder(config, weights, [], 1, "")


def test_a_decoder_without_layers_allocates_nothing_by_hidden():
    """fuzz_decoder: with n_layer 0, hidden is checked against no weight, yet step() allocated batch_size *
    hidden floats for the MLP's buffers (2**30 - 1: 8 GB; an OOM kill). Run under a 2 GB address-space limit,
    the step must now work."""
    import subprocess
    script = f"""
import resource, sys
sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
import numpy as np
from test_fuzz import _nanoslm, layerless_decoder_config
used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + 2**31, resource.RLIM_INFINITY))
config, weights = layerless_decoder_config(hidden=2**30 - 1)
decoder = _nanoslm.Decoder(config, weights, [], 1, "")
logits = np.zeros((1, 3), np.float32)
decoder.step(np.array([2]), 0, logits)
assert np.isfinite(logits).all() and logits.any()
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_a_decoder_config_missing_a_key_is_a_value_error():
    """fuzz_decoder: a missing key raised KeyError from the binding where every other bad config is a ValueError."""
    for key in ("n_layer", "hidden", "rmsnorm", "eps"):
        config, weights = layerless_decoder_config()
        del config[key]
        with pytest.raises(ValueError, match=f"the decoder's config has no {key}"):
            _nanoslm.Decoder(config, weights, [], 1, "")
