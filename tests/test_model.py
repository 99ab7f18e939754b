"""model.py and configurator.py: shapes, parameter count, causality, the KV cache, sampling filters,
settings parsing. Small models on CPU; runs in seconds."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configurator import ConfigError, configure, settings_of  # noqa: E402
from model import GPT, GPTConfig, sample_next  # noqa: E402

GPT2_STYLE = dict()
LLAMA_STYLE = dict(pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False, bias=False)
WITH_BIAS = dict(bias=True, tie_embeddings=False)
QK_NORM = dict(LLAMA_STYLE, qk_norm=True)
RELU2 = dict(mlp="relu2")
STYLES = [GPT2_STYLE, LLAMA_STYLE, WITH_BIAS, QK_NORM, RELU2]


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=101, block_size=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@pytest.mark.parametrize("style", STYLES)
def test_shapes_and_loss(style):
    model = tiny(**style)
    idx = torch.randint(0, 101, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 101) and loss is None
    none, loss = model(idx, idx)
    assert none is None and loss.shape == () and torch.isfinite(loss)
    # the loss path equals cross-entropy of the logits path, ignore_index included
    targets = idx.clone()
    targets[:, :5] = -100
    _, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 101), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)


def test_param_count_by_hand():
    model = tiny()  # n_layer 2, n_embd 32, vocab 101, block 16, no bias, tied, GELU 4x
    C = 32
    per_layer = C + 3 * C * C + C * C + C + 4 * C * C + 4 * C * C  # ln_1, c_attn, c_proj, ln_2, c_fc, c_proj
    total = 101 * C + 16 * C + 2 * per_layer + C  # wte, wpe, blocks, ln_f; lm_head shares wte
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 101 * C - 16 * C
    untied = tiny(tie_embeddings=False)
    assert untied.num_params(non_embedding=False) == total + 101 * C
    # 6 FLOPs per multiplying parameter: wpe is looked up; tied, wte is also the output projection
    assert model.flops_per_token(16) == 6 * (total - 16 * C) + 12 * 2 * C * 16
    assert untied.flops_per_token(16) == model.flops_per_token(16)  # its own lm_head; wte only looked up


def test_bad_config_values():
    with pytest.raises(ValueError, match="pos"):
        GPTConfig(pos="alibi")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    for bad, message in ((dict(n_head=0), "n_head=0 must be positive"), (dict(n_embd=-16), "n_embd=-16"),
                         (dict(n_layer=-1), "n_layer=-1"), (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)")):
        with pytest.raises(ValueError, match=message):
            GPTConfig(**bad)
    model = tiny()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("style", STYLES)
def test_future_tokens_do_not_change_past_logits(style):
    model = tiny(**style)
    a = torch.randint(0, 101, (2, 16))
    b = a.clone()
    b[:, 9:] = torch.randint(0, 101, (2, 7))
    la, _ = model(a)
    lb, _ = model(b)
    torch.testing.assert_close(la[:, :9], lb[:, :9])
    assert not torch.allclose(la[:, 9:], lb[:, 9:])


@pytest.mark.parametrize("style", STYLES)
def test_kv_cache_equals_full_recompute(style):
    model = tiny(**style)
    idx = torch.randint(0, 101, (3, 5))
    # 30 new tokens: past block_size 16, so the cropping path is covered too
    greedy = model.generate(idx, 30, temperature=0)
    assert torch.equal(greedy, model.generate(idx, 30, temperature=0, use_cache=False))
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    a = model.generate(idx, 30, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(idx, 30, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert torch.equal(a, b) and a.shape == (3, 35)
    c = model.generate(idx, 30, generator=torch.Generator().manual_seed(4), **kw)
    assert not torch.equal(a, c)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    """Each head's queries and keys are RMS-normalised (then scaled by their gains): scaling the query and key
    projections changes nothing with qk_norm, and the output without it."""
    for qk_norm in (True, False):
        model = tiny(**dict(LLAMA_STYLE, qk_norm=qk_norm))
        idx = torch.randint(0, 101, (2, 16))
        before, _ = model(idx)
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight[:64].mul_(7.0)  # the q and k rows (n_embd 32 each)
        after, _ = model(idx)
        assert torch.allclose(before, after, atol=1e-4) == qk_norm
    assert model.transformer.h[0].attn.q_norm is None
    with torch.no_grad():
        model = tiny(**QK_NORM)
        idx = torch.randint(0, 101, (2, 16))
        before, _ = model(idx)
        model.transformer.h[0].attn.k_norm.mul_(3.0)  # the gains sharpen the attention
        assert not torch.allclose(before, model(idx)[0], atol=1e-4)


def test_relu2_mlp_is_relu_squared():
    model = tiny(**RELU2)
    mlp = model.transformer.h[0].mlp
    x = torch.randn(2, 5, 32)
    expected = mlp.c_proj(torch.relu(mlp.c_fc(x)) ** 2)
    torch.testing.assert_close(mlp(x), expected)
    assert mlp.c_fc.weight.shape == (128, 32)  # 4x wide, ungated


def test_zero_output_projections_start_every_block_as_the_identity():
    model = tiny(**LLAMA_STYLE)
    model.zero_output_projections_()
    idx = torch.randint(0, 101, (2, 16))
    x = model.transformer.wte(idx)
    expected = model.lm_head(model.transformer.ln_f(x))  # the blocks add nothing
    torch.testing.assert_close(model(idx)[0], expected)


def test_generate_stops_at_eot():
    model = tiny()
    idx = torch.randint(0, 101, (1, 4))
    first = int(model.generate(idx, 1, temperature=0)[0, -1])
    out = model.generate(idx, 20, temperature=0, eot_token=first)
    assert out.shape == (1, 5) and int(out[0, -1]) == first


def test_greedy_and_filters():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.3, 0.2]]))
    assert sample_next(logits, temperature=0).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {int(sample_next(logits, generator=g, **kw)) for _ in range(300)}  # noqa: E731
    assert draws() == {0, 1, 2, 3}
    assert draws(top_k=1) == {1}
    assert draws(top_k=2) == {1, 2}
    # top_p keeps the most likely tokens until their probability reaches top_p: 0.4, then 0.4 + 0.3
    assert draws(top_p=0.5) == {1, 2}
    assert draws(top_p=0.4) == {1}
    assert draws(top_p=0.75) == {1, 2, 3}
    assert draws(top_p=0.01) == {1}
    assert draws(top_p=0.0) == {1}  # the most likely token stays even then


# --- configurator ---------------------------------------------------------------------------------------

DEFAULTS = dict(batch_size=12, learning_rate=6e-4, out_dir="out", compile=False, device="auto", betas=(0.9, 0.95),
                max_iters=100)


def test_configure_overrides_and_types(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nbatch_size = 32\nlearning_rate = 1e-3\n_helper = 5\n")
    s = configure(DEFAULTS, [str(cfg), "--batch_size=64", "--out_dir=runs/a", "--compile", "--learning_rate=1",
                             "--device=cuda:1", "--betas=(0.8, 0.9)"])
    assert s["batch_size"] == 64 and s["out_dir"] == "runs/a" and s["compile"] is True
    assert s["learning_rate"] == 1.0 and isinstance(s["learning_rate"], float)
    assert s["device"] == "cuda:1" and s["betas"] == (0.8, 0.9) and s["max_iters"] == 100
    assert configure(DEFAULTS, ["--out_dir=2024"])["out_dir"] == "2024"
    assert configure(DEFAULTS, ["--compile=false"])["compile"] is False


def test_configure_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean batch_size"):
        configure(DEFAULTS, ["--batchsize=3"])
    with pytest.raises(ConfigError, match="must be int"):
        configure(DEFAULTS, ["--batch_size=3.5"])
    with pytest.raises(ConfigError, match="not found"):
        configure(DEFAULTS, [str(tmp_path / "missing.py")])
    bad = tmp_path / "bad.py"
    bad.write_text("learning_rat = 0.1\n")
    with pytest.raises(ConfigError, match="did you mean learning_rate"):
        configure(DEFAULTS, [str(bad)])
    with pytest.raises(ConfigError, match="expected --max_iters=value"):
        configure(DEFAULTS, ["--max_iters"])


def test_configure_refuses_what_it_cannot_check(tmp_path):
    with pytest.raises(ConfigError, match="batch_size cannot be None"):
        configure(DEFAULTS, ["--batch_size=None"])
    assert configure(dict(DEFAULTS, top_k=None), ["--top_k=5"])["top_k"] == 5  # None default: any type
    with pytest.raises(ConfigError, match="must be int"):
        configure(DEFAULTS, ["--batch_size={[1]: 2}"])  # not a literal (unhashable key): taken as text
    assert configure(DEFAULTS, ["--out_dir={[1]: 2}"])["out_dir"] == "{[1]: 2}"
    cfg = tmp_path / "c.py"
    cfg.write_text("from math import sqrt\nSCALE = 2\nbatch_size = {'a': 1}\n")
    with pytest.raises(ConfigError, match="batch_size is a dict"):
        configure(DEFAULTS, [str(cfg)])
    cfg.write_text("import math\nfrom math import sqrt\nWIDTH = 4\nbatch_size = WIDTH * 8\n"
                   "def helper():\n    pass\n")
    assert configure(DEFAULTS, [str(cfg)])["batch_size"] == 32


def test_settings_of_keeps_plain_values_only():
    ns = {"a": 1, "_b": 2, "torch": torch, "f": len, "s": "x", "IM_END": "<|im_end|>", "ROLES": ("user",)}
    assert settings_of(ns) == {"a": 1, "s": "x"}


# --- the C++ decoding step (csrc/decode.cpp) ---------------------------------------------------------------

def sharp(**kw):
    """A tiny model with sharper logits than at init, so that greedy choices are not near-ties."""
    model = tiny(**kw)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(8)
        for name, p in model.named_parameters():
            if name.endswith(("q_norm", "k_norm")):  # gains that differ, so that using them is tested
                p.uniform_(0.5, 2.0)
    return model


def without_native(model):
    model.native_decoder = lambda caches: None  # the instance attribute shadows the method
    return model


# head sizes 20 and 16, widths 40 and 64: the vector kernels' tails and their whole-register paths
NATIVE_SHAPES = [dict(n_embd=40, n_head=2, vocab_size=101), dict(n_embd=64, n_head=4, vocab_size=300)]


def runs_on_this_cpu(isa):
    import _nanoslm
    if isa not in _nanoslm.decode_instruction_sets():
        pytest.skip(f"this CPU does not run {isa}")
    return isa


@pytest.mark.parametrize("isa", ["avx512vnni", "avx512", "avx2", "baseline"])  # each build of the vector kernels
@pytest.mark.parametrize("shape", NATIVE_SHAPES)
@pytest.mark.parametrize("style", STYLES)
def test_native_decode_step_equals_pytorch(style, shape, isa):
    model = sharp(block_size=32, **shape, **style)
    prompt = torch.randint(0, shape["vocab_size"], (1, 7))
    with torch.inference_mode():
        native_caches, plain_caches = model.new_caches(1), model.new_caches(1)
        model.hidden_states(prompt, native_caches)
        model.hidden_states(prompt, plain_caches)
        step = model.native_decoder(native_caches, runs_on_this_cpu(isa))
        assert step is not None
        for pos, token in enumerate([5, 17, 99, 0], start=7):
            tok = torch.tensor([token])
            native = step(tok, pos).clone()
            plain = model.lm_head(model.hidden_states(tok[:, None], plain_caches, start=pos))[:, -1]
            torch.testing.assert_close(native, plain, atol=1e-5, rtol=1e-4)
        for a, b in zip(native_caches, plain_caches):
            assert a.length == b.length == 11
            torch.testing.assert_close(a.k[:, :, :11], b.k[:, :, :11], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a.v[:, :, :11], b.v[:, :, :11], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("style", STYLES)
def test_native_generation_equals_pytorch_token_for_token(style):
    model = sharp(**style)
    plain = without_native(sharp(**style))
    idx = torch.randint(0, 101, (1, 5))
    # 30 new tokens: past block_size 16, so the cache is refilled and the native step resumes after
    assert torch.equal(model.generate(idx, 30, temperature=0), plain.generate(idx, 30, temperature=0))
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    a = model.generate(idx, 30, generator=torch.Generator().manual_seed(3), **kw)
    b = plain.generate(idx, 30, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)


def test_native_decoder_applies_only_where_it_is_exact():
    model = tiny()
    with torch.inference_mode():
        assert model.native_decoder(model.new_caches(1)) is not None
        assert model.native_decoder(model.new_caches(2)) is None  # batches run on PyTorch's matrix products
        model.train()
        assert model.native_decoder(model.new_caches(1)) is None  # dropout is PyTorch's
        model.eval().double()
        assert model.native_decoder(model.new_caches(1)) is None  # fp32 only
        model.float()
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().t().contiguous().t())
        assert model.native_decoder(model.new_caches(1)) is None  # contiguous tensors only
    no_layers = tiny(n_layer=0)  # nothing for the C++ step to hold on to: PyTorch generates
    assert no_layers.generate(torch.tensor([[1, 2]]), 3, temperature=0).shape == (1, 5)


def test_native_decoder_rejects_bad_input():
    model = tiny()
    with torch.inference_mode():
        caches = model.new_caches(1)
        model.hidden_states(torch.tensor([[1, 2, 3]]), caches)
        step = model.native_decoder(caches)
        with pytest.raises(IndexError, match="outside the vocabulary"):
            step(torch.tensor([101]), 3)
        with pytest.raises(IndexError, match="block_size"):
            step(torch.tensor([1]), 16)
        import _nanoslm
        config = dict(n_layer=0, n_head=0, n_embd=32, hidden=128, vocab_size=101, block_size=16, batch_size=1,
                      rmsnorm=False, swiglu=False, rope=False, eps=1e-5)
        with pytest.raises(ValueError, match="multiple of n_head"):  # not a division by zero
            _nanoslm.Decoder(config, {}, [], 1)
        with pytest.raises(ValueError, match="even head size"):
            _nanoslm.Decoder(dict(config, n_head=32, rope=True), {}, [], 1)
        with pytest.raises(ValueError, match="not one this CPU runs"):
            model.native_decoder(model.new_caches(1), "avx1024")
        assert _nanoslm.decode_instruction_sets()[-1] == "baseline"
        with pytest.raises(ValueError, match="missing wpe"):  # an incomplete model: a clear error, no crash
            _nanoslm.Decoder(dict(n_layer=0, n_head=2, n_embd=32, hidden=128, vocab_size=101, block_size=16,
                                  batch_size=1, rmsnorm=False, swiglu=False, rope=False, eps=1e-5),
                             dict(wte=model.transformer.wte.weight.detach().numpy()), [], 1)


@pytest.mark.parametrize("style", STYLES)
def test_packed_weights_are_the_same_model_in_one_block(style, tmp_path):
    from safetensors.torch import load_model, save_model
    import _nanoslm
    model, unpacked = sharp(**style), sharp(**style)
    assert model.pack_weights_() is model
    params = list(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), unpacked.state_dict().values()))
    starts = [p.data_ptr() for p in params]
    ends = [p.data_ptr() + p.numel() * 4 for p in params]
    assert starts[0] % (2 << 20) == 0 and all(start % 64 == 0 for start in starts)
    assert all(0 <= start - end < 64 for end, start in zip(ends, starts[1:]))  # one block, in order, no gaps
    save_model(model, str(tmp_path / "model.safetensors"))  # each parameter its own storage: no sharing refused
    load_model(unpacked, str(tmp_path / "model.safetensors"))
    assert (model.lm_head.weight is model.transformer.wte.weight) == model.config.tie_embeddings  # as it was
    idx = torch.randint(0, 101, (1, 5))
    assert torch.equal(model.generate(idx, 20, temperature=0), unpacked.generate(idx, 20, temperature=0))
    # still trainable: an optimizer step moves the packed weights as it moves the others
    for m in (model.train(), unpacked.train()):
        torch.manual_seed(1)
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
        _, loss = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
    for a, b in zip(model.parameters(), unpacked.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="negative"):
        _nanoslm.weight_block(-1)


def test_pack_weights_leaves_other_models_alone():
    model = tiny().double()
    before = [p.data_ptr() for p in model.parameters()]
    model.pack_weights_()
    assert [p.data_ptr() for p in model.parameters()] == before


# --- the chunked projection + cross-entropy of the CPU (ChunkedLinearCrossEntropy) -------------------------

@pytest.mark.parametrize("n_ignored", [0, 7, 40])
@pytest.mark.parametrize("chunk_elements", [1 << 25, 600 * 37])  # one chunk; several, the last one short
def test_chunked_loss_equals_cross_entropy(monkeypatch, n_ignored, chunk_elements):
    from ops import ChunkedLinearCrossEntropy, lm_head_loss, plain_lm_head_loss
    monkeypatch.setattr(ChunkedLinearCrossEntropy, "chunk_elements", chunk_elements)
    torch.manual_seed(0)
    N, C, V = 1300, 24, 37  # 1300 rows: chunks of 600, 600 and 100 when chunked
    x = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, C, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[torch.randperm(N)[:n_ignored * N // 40]] = -100  # 40: every target ignored
    losses, grads = [], []
    for loss_fn in (lm_head_loss, plain_lm_head_loss):
        loss = loss_fn(x, w, targets)
        losses.append(loss)
        if n_ignored < 40:
            grads.append(torch.autograd.grad(3.0 * loss, (x, w)))
    if n_ignored == 40:
        assert losses[0].isnan() and losses[1].isnan()  # as F.cross_entropy: 0 / 0
        return
    torch.testing.assert_close(losses[0], losses[1])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference)


def test_chunked_loss_reuses_its_buffer_across_calls():
    from ops import ChunkedLinearCrossEntropy, lm_head_loss, plain_lm_head_loss
    torch.manual_seed(0)
    big = ChunkedLinearCrossEntropy.logits_buffer(900, 50, torch.float32, torch.device("cpu"))
    for N, V in [(700, 50), (300, 23)]:  # a part of the buffer, then a part of that part, viewed anew
        x, w = torch.randn(N, 16, requires_grad=True), torch.randn(V, 16, requires_grad=True)
        targets = torch.randint(0, V, (N,))
        ours = torch.autograd.grad(lm_head_loss(x, w, targets), (x, w))
        reference = torch.autograd.grad(plain_lm_head_loss(x, w, targets), (x, w))
        for a, b in zip(ours, reference):
            torch.testing.assert_close(a, b)
    again = ChunkedLinearCrossEntropy.logits_buffer(300, 23, torch.float32, torch.device("cpu"))
    assert again.data_ptr() == big.data_ptr()  # no fresh allocation (and page faults) per step
