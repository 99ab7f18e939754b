"""quantize.py and the C++ decoding step's int8 kernels: the quantisation itself, the int8 step against its
plain reference (PyTorch's step on the dequantised weights, its inputs rounded as the step rounds them) on
every instruction set this CPU runs, with widths that are not multiples of a group or a vector, and sample.py
--quantize=int8.

    python -m pytest -q tests/test_quantize.py
"""
import pytest
import torch

from quantize import dequantize_int8, quantize_int8, quantize_model_
from test_checkpoint import sample, trained  # noqa: F401  (trained: a fixture)
from test_model import LLAMA_STYLE, QK_NORM, RELU2, STYLES, WITH_BIAS, runs_on_this_cpu, sharp, without_native


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("n_in", [32, 40, 64, 100, 7])  # whole groups, a shorter last group, less than one
def test_quantize_int8_is_symmetric_per_group(group, n_in):
    torch.manual_seed(0)
    w = torch.randn(5, n_in) * torch.logspace(-3, 1, 5)[:, None]  # rows of very different sizes
    w[2] = 0.0  # an all-zero row: scale 0, nothing divided by it
    q, scales = quantize_int8(w, group)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scales.dtype == torch.float32 and scales.shape == (5, -(-n_in // group))
    assert q.abs().max() <= 127
    back = dequantize_int8(q, scales, group)
    expanded = scales.repeat_interleave(group, dim=1)[:, :n_in]
    assert torch.all((back - w).abs() <= expanded / 2 + 1e-6 * w.abs())  # within half a step of each group
    for g in range(scales.size(1)):  # every group's largest weight: exact, at +-127
        part = w[:, g * group:(g + 1) * group]
        top = part.abs().argmax(dim=1)
        rows = torch.arange(5)
        torch.testing.assert_close(back[:, g * group:(g + 1) * group][rows, top], part[rows, top])
    assert torch.equal(back[2], torch.zeros(n_in))
    with pytest.raises(ValueError, match="groups of 32 or 64"):
        quantize_int8(w, 16)


# widths 40 and 64 (SwiGLU hidden 104 and 168; GELU 160 and 256): a shorter last group and whole ones
SHAPES = [dict(n_embd=40, n_head=2, vocab_size=101), dict(n_embd=64, n_head=4, vocab_size=300)]


def assert_close_but_for_one_tie(steps):
    """[(native, plain)] logits of successive steps equal within float rounding, but for at most one step.

    The C++ step and PyTorch round each input of an int8 product to an integer from slightly different floats
    (their sums run in other orders); where x / scale lies within a few ulps of a half, one rounds up and the
    other down (about one step in 3,000, measured), and that step's logits move by a fraction of a percent.
    So: every step to 1e-5, except at most one, which must still be within 1% of the logits' range. A wrong
    kernel misses in every step, by far more."""
    loose = 0
    for native, plain in steps:
        if not torch.allclose(native, plain, atol=1e-5, rtol=1e-4):
            loose += 1
            torch.testing.assert_close(native, plain, atol=1e-2 * plain.abs().max().item(), rtol=0)
    assert loose <= 1, f"{loose} of {len(steps)} steps differ beyond float rounding"


@pytest.mark.parametrize("isa", ["avx512vnni", "avx512", "avx2", "baseline"])  # each build of the int8 kernels
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("style", STYLES)
def test_int8_step_equals_pytorch_on_the_dequantised_weights(style, shape, group, isa):
    """The C++ int8 step against PyTorch on the dequantised weights with the inputs rounded as the step rounds
    them (quantize.quantize_inputs). Both read and write the same caches, so that each step is compared from
    the same state."""
    model = quantize_model_(sharp(block_size=32, **shape, **style), group)
    prompt = torch.randint(0, shape["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(1))
    steps = []
    with torch.inference_mode():
        caches = model.new_caches(1)
        model.hidden_states(prompt, caches)
        step = model.native_decoder(caches, runs_on_this_cpu(isa))
        for pos, token in enumerate([5, 17, 99, 0, 64, 3], start=7):
            tok = torch.tensor([token])
            native = step(tok, pos).clone()  # writes the caches at pos, and PyTorch's step then writes it again
            for cache in caches:
                cache.length = pos
            plain = model.lm_head(model.hidden_states(tok[:, None], caches, start=pos))[:, -1]
            steps.append((native, plain))
    assert_close_but_for_one_tie(steps)


def test_the_int8_step_rounds_its_inputs_to_int8():
    """The step multiplies int8 weights by int8 inputs: PyTorch with the inputs left in fp32 differs from it
    by far more than float rounding, and PyTorch with them rounded does not."""
    model = quantize_model_(sharp(block_size=32, n_embd=64, n_head=4))
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    with torch.inference_mode():
        caches = model.new_caches(1)
        model.hidden_states(prompt, caches)
        native = model.native_decoder(caches)(torch.tensor([6]), 7).clone()
        for cache in caches:
            cache.length = 7
        rounded = model.lm_head(model.hidden_states(torch.tensor([[6]]), caches, start=7))[:, -1]
        for module in model.modules():
            module._forward_pre_hooks.clear()  # the fp32 inputs: quantize.py's weights-only reference
        for cache in caches:
            cache.length = 7
        unrounded = model.lm_head(model.hidden_states(torch.tensor([[6]]), caches, start=7))[:, -1]
    assert_close_but_for_one_tie([(native, rounded)])
    assert not torch.allclose(native, unrounded, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("style", [dict(), LLAMA_STYLE])  # tied and untied embeddings
def test_the_int8_step_reads_the_int8_weights(style):
    """With the fp32 matrices wiped after quantising, the C++ step still computes the same logits: it reads the
    int8 values and scales (the embedding's too), not the dequantised copies."""
    model = quantize_model_(sharp(block_size=32, **style))
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.inference_mode():
        caches = model.new_caches(1)
        model.hidden_states(prompt, caches)
        expected = model.native_decoder(caches)(torch.tensor([9]), 5).clone()
        for module in (m for m in model.modules() if hasattr(m, "weight_int8")):
            module.weight.zero_()
        got = model.native_decoder(caches)(torch.tensor([9]), 5)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        assert model.transformer.wte.weight_int8 is not None
        tied = model.transformer.wte.weight is model.lm_head.weight
        assert (model.transformer.wte.weight_int8 is model.lm_head.weight_int8) == tied


@pytest.mark.parametrize("style", [dict(), QK_NORM, RELU2, WITH_BIAS])
def test_int8_generation_equals_pytorch_token_for_token(style):
    model = quantize_model_(sharp(**style))
    plain = without_native(quantize_model_(sharp(**style)))
    idx = torch.randint(0, 101, (1, 5), generator=torch.Generator().manual_seed(2))
    # 30 new tokens: past block_size 16, so the cache is refilled and the int8 step resumes after
    assert torch.equal(model.generate(idx, 30, temperature=0), plain.generate(idx, 30, temperature=0))


def test_quantised_weights_are_not_saved_and_the_model_stays_one():
    model = quantize_model_(sharp())
    assert not any("int8" in k or "scales" in k for k in model.state_dict())
    assert model.int8_group == 32
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model_(model)
    packed = model.pack_weights_()  # sample.py packs the fp32 weights after quantising: both stay right
    assert packed is model
    with torch.inference_mode():
        caches = model.new_caches(1)
        model.hidden_states(torch.tensor([[1, 2]]), caches)
        reference = without_native(quantize_model_(sharp()))
        plain_caches = reference.new_caches(1)
        reference.hidden_states(torch.tensor([[1, 2]]), plain_caches)
        torch.testing.assert_close(model.native_decoder(caches)(torch.tensor([7]), 2),
                                   reference.lm_head(reference.hidden_states(torch.tensor([[7]]), plain_caches,
                                                                             start=2))[:, -1], atol=1e-5, rtol=1e-4)


def test_what_cannot_be_quantised_is_one_clear_error():
    from lora import add_lora, lora_layer_names
    model = sharp()
    add_lora(model, lora_layer_names("attn"), r=2, alpha=4.0, dropout=0.0)
    with pytest.raises(ValueError, match="merge LoRA adapters"):
        quantize_model_(model)
    import _nanoslm
    plain = sharp()
    with torch.inference_mode():
        caches = plain.new_caches(1)
        step_inputs = dict(n_layer=0, n_head=2, n_embd=32, hidden=128, vocab_size=101, block_size=16, batch_size=1,
                           rmsnorm=False, swiglu=False, rope=False, eps=1e-5)
        wte = plain.transformer.wte.weight.detach().numpy()
        with pytest.raises(ValueError, match="group must be 0"):
            _nanoslm.Decoder(dict(step_inputs, group=16), dict(wte=wte), [], 1, "")
        with pytest.raises(ValueError, match="missing wte_q"):  # int8 asked for, fp32 given
            _nanoslm.Decoder(dict(step_inputs, group=32), dict(wte=wte), [], 1, "")
        q, scales = quantize_int8(plain.transformer.wte.weight, 32)
        with pytest.raises(ValueError, match="wte_q must be a C-contiguous int8 array"):
            _nanoslm.Decoder(dict(step_inputs, group=32), dict(wte_q=q.numpy().T, wte_scales=scales.numpy()), [], 1,
                             "")
        with pytest.raises(ValueError, match="wte_scales must be"):
            _nanoslm.Decoder(dict(step_inputs, group=32), dict(wte_q=q.numpy(), wte_scales=scales.numpy()[:5]),
                             [], 1, "")
    assert caches  # (the model's own caches are untouched by the refused decoders)


def test_sample_py_quantize_int8(trained):
    """sample.py --quantize=int8 generates what the quantised model generates (greedy), and a format it does not
    know is one clear error."""
    from checkpoint import load_run
    out = sample(trained / "run", "--quantize=int8", "--temperature=0", "--max_new_tokens=12", "--start=Once")
    assert out.returncode == 0, out.stderr
    model, tok, _ = load_run(str(trained / "run"), "best", "cpu")
    quantize_model_(model)
    new = []
    for token in model.generate_stream(torch.tensor([tok.encode("Once")]), 12, temperature=0,
                                       eot_token=tok.eot_token):
        if int(token) == tok.eot_token:
            break
        new.append(int(token))
    assert out.stdout == "Once" + tok.decode(new) + "\n"
    bad = sample(trained / "run", "--quantize=int4")
    assert bad.returncode == 1 and "quantize='int4'" in bad.stderr and "int8" in bad.stderr
