"""
Fuzzes the CPU decoding step: Decoder(config, weights, layers, n_threads, isa) over odd configs (every flag,
tiny and hostile sizes, fp32 or int8 weights in groups of 32 / 64 as quantize.py makes them, or other
groups), weights that are NaN, of the wrong dtype or shape, strided or missing, read-only caches; then step()
with odd tokens, positions (before, past the cache) and logits buffers. Also weight_block and
decode_instruction_sets.

    FUZZ_SECONDS=600 fuzz/run.sh fuzz/fuzz_decoder.py      # make fuzz runs every harness

Bad input must raise (harness.REFUSALS); a step that runs writes logits of the model's shape, and the same
step again (same tokens, same position) writes the same logits.
"""
import atheris
import numpy as np

from harness import REFUSALS, main, native

_nanoslm = native()
ISAS = _nanoslm.decode_instruction_sets()
ODD = [0, -1, 2**30, 2**31 - 1, 2**31, "4", None]  # sizes no config should have

# -----------------------------------------------------------------------------
# a model: config, weights, layers


def some_config(fdp):
    n_head = fdp.ConsumeIntInRange(1, 3)
    config = dict(n_layer=fdp.ConsumeIntInRange(0, 2), n_head=n_head,
                  n_embd=n_head * fdp.PickValueInList([1, 2, 4, 8, 16, 34]), hidden=fdp.ConsumeIntInRange(1, 40),
                  vocab_size=fdp.ConsumeIntInRange(1, 20), block_size=fdp.ConsumeIntInRange(1, 5),
                  batch_size=fdp.ConsumeIntInRange(1, 2), rmsnorm=fdp.ConsumeBool(), swiglu=fdp.ConsumeBool(),
                  rope=fdp.ConsumeBool(), eps=fdp.PickValueInList([1e-5, 1e-5, 0.0, -1.0, float("nan"), 1e30]),
                  relu2=fdp.ConsumeBool(), qk_norm=fdp.ConsumeBool(),
                  group=fdp.PickValueInList([0] * 4 + [32] * 3 + [64] * 3 + [16, -32, 2**31 - 1]))
    if config["swiglu"] and fdp.ConsumeIntInRange(0, 9):
        config["relu2"] = False  # (both at once is refused)
    for _ in range(fdp.ConsumeIntInRange(0, 9) // 9):  # now and then a hostile size, or a key missing
        key = fdp.PickValueInList(sorted(config))
        if fdp.ConsumeBool():
            config[key] = fdp.PickValueInList(ODD)
        else:
            del config[key]
    return config


def some_floats(fdp, shape, rng, positive=False):
    """float32 values of shape, or a hostile near-miss (other dtype or shape, strided, read-only, NaN, ...)."""
    a = rng.standard_normal(shape).astype(np.float32) * 0.2
    a = np.abs(a) if positive else a
    kind = fdp.ConsumeIntInRange(0, 300)  # a model has ~30 arrays: most models are whole
    if kind == 1:
        a = a.astype(fdp.PickValueInList([np.float64, np.float16, np.int8, np.int64]))
    elif kind == 2:
        a = np.resize(a, tuple(max(0, s + fdp.ConsumeIntInRange(-1, 1)) for s in shape))
    elif kind == 3 and a.ndim >= 1:
        a = np.repeat(a, 2, axis=-1)[..., ::2]  # the values, strided
    elif kind == 4 and a.ndim == 2:
        a = np.asfortranarray(a)
    elif kind == 5:
        a.flags.writeable = False
    elif kind == 6 and a.size:
        a.flat[fdp.ConsumeIntInRange(0, a.size - 1)] = fdp.PickValueInList([np.nan, np.inf, -np.inf, 3e38])
    elif kind == 7:
        return None
    elif kind == 8:
        return a.tolist()
    return a


def put_matrix(fdp, d, key, n_out, n_in, group, rng):
    """d[key] as model.native_decoder gives it: fp32, and with int8 weights also key_q and key_scales."""
    d[key] = some_floats(fdp, (n_out, n_in), rng)
    if group:
        g = group if isinstance(group, int) and group > 0 else 32
        q = rng.integers(-127, 128, (n_out, n_in)).astype(np.int8)
        if fdp.ConsumeIntInRange(0, 20) == 0:
            q = q.astype(fdp.PickValueInList([np.int16, np.uint8, np.float32]))
        d[key + "_q"] = q
        d[key + "_scales"] = some_floats(fdp, (n_out, -(-n_in // g)), rng, positive=True) if fdp.ConsumeIntInRange(
            0, 20) else None


def some_model(fdp, config, rng):
    """(weights, layers) for config; sizes a hostile config lacks or mangles are taken small."""
    def size(key, default):
        value = config.get(key, default)
        return value if isinstance(value, int) and 1 <= value <= 64 else default
    C, n_head, H, V, T, B = (size("n_embd", 4), size("n_head", 1), size("hidden", 4), size("vocab_size", 4),
                             size("block_size", 2), size("batch_size", 1))
    hs, group = max(C // n_head, 1), config.get("group", 0)
    weights = {}
    put_matrix(fdp, weights, "wte", V, C, group, rng)
    put_matrix(fdp, weights, "lm_head", V, C, group, rng)
    weights.update(ln_f_weight=some_floats(fdp, (C,), rng), ln_f_bias=some_floats(fdp, (C,), rng),
                   wpe=some_floats(fdp, (T, C), rng), rope_cos=some_floats(fdp, (T, hs // 2), rng),
                   rope_sin=some_floats(fdp, (T, hs // 2), rng))
    layers = []
    for _ in range(size("n_layer", 1) if config.get("n_layer") != 0 else 0):
        d = dict(ln_1_weight=some_floats(fdp, (C,), rng), ln_1_bias=some_floats(fdp, (C,), rng),
                 attn_bias=some_floats(fdp, (3 * C,), rng), q_norm=some_floats(fdp, (hs,), rng),
                 k_norm=some_floats(fdp, (hs,), rng), attn_proj_bias=some_floats(fdp, (C,), rng),
                 ln_2_weight=some_floats(fdp, (C,), rng), ln_2_bias=some_floats(fdp, (C,), rng),
                 fc_bias=some_floats(fdp, (2 * H if config.get("swiglu") else H,), rng),
                 mlp_proj_bias=some_floats(fdp, (C,), rng),
                 k_cache=some_floats(fdp, (B, n_head, T, hs), rng), v_cache=some_floats(fdp, (B, n_head, T, hs), rng))
        put_matrix(fdp, d, "attn_weight", 3 * C, C, group, rng)
        put_matrix(fdp, d, "attn_proj_weight", C, C, group, rng)
        put_matrix(fdp, d, "fc_weight", 2 * H if config.get("swiglu") else H, C, group, rng)
        put_matrix(fdp, d, "mlp_proj_weight", C, H, group, rng)
        layers.append(d)
    if fdp.ConsumeIntInRange(0, 20) == 0:
        layers.append({})  # more layers than n_layer
    return weights, layers


# -----------------------------------------------------------------------------
# the entry points


def check_step(fdp, decoder, config, rng):
    B, V, T = config["batch_size"], config["vocab_size"], config["block_size"]
    B = B if B <= 64 else 1  # a huge batch_size (n_layer 0 has no cache to match it) gets tokens of another shape
    pos = 0
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        tokens = rng.integers(0, V, (B,)).astype(np.int64)
        if fdp.ConsumeIntInRange(0, 10) == 0:
            tokens[0] = fdp.PickValueInList([-1, V, 2**62])
        if fdp.ConsumeIntInRange(0, 20) == 0:
            tokens = fdp.PickValueInList([tokens.astype(np.float64), tokens[:, None], tokens[:0], [0] * B])
        pos = pos if fdp.ConsumeIntInRange(0, 8) else fdp.PickValueInList([-1, T, T - 1, 2**31 - 1, 2**31])
        logits = some_floats(fdp, (B, V), rng)
        try:
            decoder.step(tokens, pos, logits)
        except REFUSALS:
            continue
        first = np.array(logits, copy=True)
        decoder.step(tokens, pos, logits)  # the caches now hold pos already: it is rewritten with the same
        assert np.array_equal(first, logits, equal_nan=True), "the same step twice gave different logits"
        pos += 1


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    rng = np.random.default_rng(fdp.ConsumeIntInRange(0, 2**16))
    if fdp.ConsumeIntInRange(0, 9) == 0:
        n = fdp.PickValueInList([-1, 0, 1, 1000, 2**62 - 1, 2**63 - 1, 2**63])
        try:
            block = _nanoslm.weight_block(n)
            assert block.dtype == np.float32 and block.shape == (n,)
            block[:] = 1.0  # every float of it is ours to write
        except REFUSALS:
            pass
        return
    config = some_config(fdp)
    weights, layers = some_model(fdp, config, rng)
    isa = fdp.PickValueInList(ISAS * 3 + ["", "", "", "avx512", "avx2", "bogus"])
    try:
        decoder = _nanoslm.Decoder(config, weights, layers, fdp.ConsumeIntInRange(-1, 3), isa)
    except REFUSALS:
        return
    check_step(fdp, decoder, config, rng)


if __name__ == "__main__":
    main(test_one_input)
