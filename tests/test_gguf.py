"""export.py --to=gguf (gguf_file.py): GGUF files read back with gguf's own reader give llama.cpp's tensor names,
our weights (f32 exactly, f16 and q8_0 within their rounding) and the metadata llama.cpp needs; every option
without a llama.cpp equivalent is refused by name; and where llama-cpp-python is installed (`make llama`),
llama.cpp's greedy tokens and token ids equal ours for the GPT-2, Llama and Qwen3 layouts."""
import gzip
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

import chat
from checkpoint import load_run
from gguf_file import GGUFError, gguf_architecture, gguf_tensors, interleave_rotary_pairs, write_gguf
from lora import merge_lora
from model import GPT, GPTConfig, apply_rotary, rotary_tables
from tokenizer import Tokenizer, byte_level_alphabet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {  # layout: (options, llama.cpp's architecture)
    "gpt2": (dict(), "gpt2"),
    "gpt2-bias-untied": (dict(bias=True, tie_embeddings=False), "gpt2"),
    "llama": (dict(pos="rope", norm="rmsnorm", mlp="swiglu"), "llama"),
    "llama-bias-untied": (dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=True, tie_embeddings=False), "llama"),
    "qwen3": (dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True), "qwen3"),
    "qwen3-untied": (dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False), "qwen3"),
}
F32, F16, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0


def stories(n_chars):
    with gzip.open(os.path.join(ROOT, "data", "tinystories_sample", "train.txt.gz"), "rt", encoding="utf-8") as f:
        return f.read(n_chars)


@pytest.fixture(scope="module")
def tok():
    """A trained 300-token vocabulary (<|endoftext|> = 299) with the chat tokens: 302 tokens."""
    return chat.add_chat_tokens(Tokenizer.train([stories(100_000)], vocab_size=300))


def random_model(vocab_size, scale=0.05, **kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**dict(dict(n_layer=2, n_head=4, n_embd=64, vocab_size=vocab_size, block_size=96), **kw)))
    with torch.no_grad():  # move every weight off its initial value, norms and biases included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def field(reader, key):
    return reader.fields[key].contents()


def values(tensor):
    """A GGUFReader tensor as fp32, (out, in) as PyTorch holds it."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))


# --- what the file holds --------------------------------------------------------------------------------

@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_through_ggufs_reader(layout, gguf_type, tok, tmp_path):
    options, arch = LAYOUTS[layout]
    model = random_model(tok.n_vocab + 20, **options)
    assert write_gguf(model, tok, str(tmp_path / "m.gguf"), gguf_type, name="tiny") == arch
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    c = model.config

    expected = gguf_tensors(model, arch)
    names = [t.name for t in reader.tensors]
    assert sorted(names) == sorted(expected)
    known = {gguf.TENSOR_NAMES[kind].format(bid=i) for kind in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]
             for i in range(c.n_layer)}
    assert {name.rsplit(".", 1)[0] for name in names} <= known  # llama.cpp's names for the architecture
    assert ("output.weight" in names) == (not c.tie_embeddings)  # tied: llama.cpp reuses token_embd
    assert ("blk.1.attn_q.bias" in names) == (arch != "gpt2" and c.bias)
    for t in reader.tensors:
        want = expected[t.name].numpy()
        assert tuple(reversed(t.shape.tolist())) == want.shape, t.name
        if want.ndim == 1 or t.name == "position_embd.weight":
            assert t.tensor_type == F32 and np.array_equal(values(t), want), t.name
        elif gguf_type == "f32":
            assert t.tensor_type == F32 and np.array_equal(values(t), want), t.name
        elif gguf_type == "f16":
            assert t.tensor_type == F16, t.name
            np.testing.assert_allclose(values(t), want, rtol=1e-3, atol=1e-6)
        else:  # a scale per 32 values, their largest / 127 (in f16): each within about half a step
            assert t.tensor_type == Q8_0, t.name
            blocks = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            assert (np.abs(values(t) - want).reshape(-1, 32) <= blocks * 0.6).all(), t.name

    assert field(reader, "general.architecture") == arch and field(reader, "general.name") == "tiny"
    assert field(reader, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[gguf_type]
    assert field(reader, f"{arch}.context_length") == 96 and field(reader, f"{arch}.embedding_length") == 64
    assert field(reader, f"{arch}.block_count") == 2 and field(reader, f"{arch}.feed_forward_length") == c.mlp_hidden
    assert field(reader, f"{arch}.attention.head_count") == field(reader, f"{arch}.attention.head_count_kv") == 4
    if arch == "gpt2":
        assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    else:
        assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
        assert field(reader, f"{arch}.rope.freq_base") == 10000.0 and field(reader, f"{arch}.rope.dimension_count") == 16
    assert len(field(reader, "tokenizer.ggml.tokens")) == c.vocab_size


def test_q8_0_falls_back_to_f16_where_a_row_is_not_whole_blocks(tok, tmp_path):
    model = random_model(tok.n_vocab, n_embd=48)  # rows of 48 inputs: one and a half 32-value blocks
    write_gguf(model, tok, str(tmp_path / "m.gguf"), "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.attn_qkv.weight"] == types["token_embd.weight"] == F16
    assert types["blk.0.ffn_down.weight"] == Q8_0  # 192 inputs: six blocks
    assert types["blk.0.attn_norm.weight"] == F32


def test_weights_map_to_llama_cpps_layout(tok):
    """The mapping checked piece by piece against model.py: fused c_attn splits into q, k, v (GPT-2 keeps it
    whole), c_fc is gate rows then up rows, the Llama q and k rows are interleaved per head, and GPT-2 gets
    zero biases where we have none."""
    gpt2 = random_model(tok.n_vocab, **LAYOUTS["gpt2"][0])
    theirs = gguf_tensors(gpt2, "gpt2")
    assert torch.equal(theirs["blk.0.attn_qkv.weight"], gpt2.transformer.h[0].attn.c_attn.weight)
    assert not theirs["blk.0.attn_qkv.bias"].any() and theirs["blk.0.attn_qkv.bias"].shape == (192,)
    assert torch.equal(theirs["position_embd.weight"], gpt2.transformer.wpe.weight)
    for layout in ("llama-bias-untied", "qwen3"):
        options, arch = LAYOUTS[layout]
        model = random_model(tok.n_vocab, **options)
        theirs, block = gguf_tensors(model, arch), model.transformer.h[1]
        q, k, v = block.attn.c_attn.weight.chunk(3)
        permute = (lambda w: interleave_rotary_pairs(w, 4)) if arch == "llama" else (lambda w: w)
        assert torch.equal(theirs["blk.1.attn_q.weight"], permute(q))
        assert torch.equal(theirs["blk.1.attn_k.weight"], permute(k))
        assert torch.equal(theirs["blk.1.attn_v.weight"], v)
        assert torch.equal(theirs["blk.1.ffn_gate.weight"], block.mlp.c_fc.weight[:model.config.mlp_hidden])
        assert torch.equal(theirs["blk.1.ffn_up.weight"], block.mlp.c_fc.weight[model.config.mlp_hidden:])
        if model.config.bias:
            assert torch.equal(theirs["blk.1.attn_q.bias"], permute(block.attn.c_attn.bias[:64]))
        if model.config.qk_norm:
            assert torch.equal(theirs["blk.1.attn_k_norm.weight"], block.attn.k_norm)


def test_interleaved_rows_rotate_as_ours():
    """Rows [0 1 2 3] of a head of 4 become [0 2 1 3]; then llama.cpp's rotation of adjacent pairs (2i, 2i+1)
    -- written out here as a reference -- gives our half-split rotation's result, in the same interleaved order."""
    assert interleave_rotary_pairs(torch.arange(8.0), 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    hs, T, n_head = 16, 7, 3
    x = torch.randn(1, n_head, T, hs)
    ours = apply_rotary(x, *rotary_tables(hs, T, 10000.0))

    def to_rows(t):  # (1, nh, T, hs) -> (nh * hs, T): the rows of a q projection's output
        return t[0].permute(0, 2, 1).reshape(n_head * hs, T)

    rows = interleave_rotary_pairs(to_rows(x), n_head).reshape(n_head, hs // 2, 2, T)
    freqs = 1.0 / 10000.0 ** (torch.arange(0, hs, 2).float() / hs)
    angles = freqs[:, None] * torch.arange(T).float()  # (hs/2, T): pair i at position p turns by p * freq_i
    a, b = rows[:, :, 0], rows[:, :, 1]
    theirs = torch.stack((a * angles.cos() - b * angles.sin(), b * angles.cos() + a * angles.sin()), dim=2)
    torch.testing.assert_close(theirs.reshape(n_head * hs, T), interleave_rotary_pairs(to_rows(ours), n_head))


def test_tokenizer_metadata(tok, tmp_path):
    write_gguf(random_model(tok.n_vocab + 20), tok, str(tmp_path / "chat.gguf"), "f32")  # 20 rows no token uses
    reader = gguf.GGUFReader(str(tmp_path / "chat.gguf"))
    alphabet = byte_level_alphabet()
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert tokens[ord("A")] == "A" and tokens[ord(" ")] == "Ġ" and tokens[ord("\n")] == "Ċ"  # GPT-2's alphabet
    for i in range(256, 299):
        assert tokens[i] == "".join(alphabet[b] for b in tok.token_bytes(i)) and types[i] == gguf.TokenType.NORMAL
    for text, i in tok.special_tokens.items():
        assert tokens[i] == text and types[i] == gguf.TokenType.CONTROL
    assert tokens[302:] == [f"[PAD{i}]" for i in range(302, 322)] and set(types[302:]) == {gguf.TokenType.UNUSED}
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(merges) == 300 - 256 - 1 and all(len(m.split(" ")) == 2 for m in merges)
    assert "".join(merges[0].split(" ")) == tokens[256]  # the first merge makes the first merged token
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    eot, im_end = tok.special_tokens["<|endoftext|>"], tok.special_tokens["<|im_end|>"]
    assert field(reader, "tokenizer.ggml.bos_token_id") == eot and field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.ggml.eos_token_id") == field(reader, "tokenizer.ggml.eot_token_id") == im_end
    assert field(reader, "tokenizer.chat_template") == chat.jinja_template(tok)

    plain = Tokenizer.gpt2()  # a model without the chat tokens: a document ends at <|endoftext|>, no template
    write_gguf(random_model(plain.n_vocab), plain, str(tmp_path / "plain.gguf"), "f16")
    reader = gguf.GGUFReader(str(tmp_path / "plain.gguf"))
    assert field(reader, "tokenizer.ggml.eos_token_id") == field(reader, "tokenizer.ggml.bos_token_id") == 50256
    assert "tokenizer.chat_template" not in reader.fields and "tokenizer.ggml.eot_token_id" not in reader.fields
    assert len(field(reader, "tokenizer.ggml.merges")) == 50000 and field(reader, "tokenizer.ggml.tokens")[50256] == (
        "<|endoftext|>")


# --- what is refused ------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(mlp="relu2"), "mlp=relu2"),
    (dict(qk_norm=True), "qk_norm=True with pos=learned"),
    (dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=True), "qk_norm=True with bias=True"),
    (dict(norm="rmsnorm"), "pos=learned, norm=rmsnorm, mlp=gelu"),
    (dict(pos="rope"), "pos=rope, norm=layernorm, mlp=gelu"),
    (dict(mlp="swiglu"), "mlp=swiglu"),
    (dict(pos="rope", norm="rmsnorm", mlp="relu2"), "pos=rope, norm=rmsnorm, mlp=relu2"),
    (dict(n_layer=0), "n_layer=0"),
])
def test_options_without_a_llama_cpp_equivalent_are_refused_by_name(options, message):
    with pytest.raises(GGUFError, match=message):
        gguf_architecture(GPTConfig(**options))


def test_bad_type_and_dest_are_refused_and_a_failed_write_leaves_nothing(tok, tmp_path, monkeypatch):
    model = random_model(tok.n_vocab)
    with pytest.raises(GGUFError, match="gguf_type='q4_0': choose one of f32, f16, q8_0"):
        write_gguf(model, tok, str(tmp_path / "m.gguf"), "q4_0")
    with pytest.raises(GGUFError, match="is a directory"):
        write_gguf(model, tok, str(tmp_path), "f16")
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(GGUFError, match="is not a GGUF file"):
        write_gguf(model, tok, str(tmp_path / "notes.txt"), "f16")
    with pytest.raises(GGUFError, match="tokenizer has 302 tokens but the model only 300"):
        write_gguf(random_model(300), tok, str(tmp_path / "m.gguf"), "f16")
    assert (tmp_path / "notes.txt").read_text() == "keep"

    write_gguf(model, tok, str(tmp_path / "m.gguf"), "f32")
    before = (tmp_path / "m.gguf").read_bytes()

    def fail(self, **kw):
        raise OSError("disk full")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(model, tok, str(tmp_path / "m.gguf"), "f16")  # over the previous export: it stays whole
    with pytest.raises(OSError, match="disk full"):
        write_gguf(model, tok, str(tmp_path / "new.gguf"), "f16")
    assert (tmp_path / "m.gguf").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "notes.txt"]


# --- llama.cpp runs it as we do -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make llama builds it)")


def llama(llama_cpp, path, n_ctx=96):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, n_threads_batch=1,
                           verbose=False)


@pytest.mark.parametrize("layout", ["gpt2", "gpt2-bias-untied", "llama", "llama-bias-untied", "qwen3"])
def test_llama_cpp_greedy_tokens_equal_ours(layout, tok, llama_cpp, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from llama_cpp_peer import decode
    options, _ = LAYOUTS[layout]
    model = random_model(tok.n_vocab, scale=0.2, **options)  # weights far enough from init to vary the tokens
    write_gguf(model, tok, str(tmp_path / "m.gguf"), "f32")
    prompt = tok.encode("Once upon a time, there was a little dog")
    ours = model.generate(torch.tensor([prompt]), 50, temperature=0)[0, len(prompt):].tolist()
    _, _, theirs = decode(str(tmp_path / "m.gguf"), prompt, 50, n_threads=1)
    assert theirs == ours and len(set(ours)) > 20  # (with q and k not interleaved, llama's first token differs)


def test_llama_cpp_tokenizes_as_we_do(tok, llama_cpp, tmp_path):
    text = stories(3_000) + "<|im_start|>user\nHi<|im_end|>\n"
    for name, vocab in (("trained", tok), ("gpt2", Tokenizer.gpt2())):
        write_gguf(random_model(vocab.n_vocab, n_layer=1), vocab, str(tmp_path / f"{name}.gguf"), "f16")
        llm = llama(llama_cpp, tmp_path / f"{name}.gguf")
        ids = vocab.encode(text, allowed_special="all")
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, name
        assert llm.detokenize(ids, special=True).decode() == text, name
        llm.close()


def test_llama_cpp_chat_template_gives_our_ids_and_ends_turns_at_im_end(tok, llama_cpp, tmp_path):
    write_gguf(random_model(tok.n_vocab), tok, str(tmp_path / "chat.gguf"), "f16")
    llm = llama(llama_cpp, tmp_path / "chat.gguf")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!\n  A dog?"}]
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(  # what create_chat_completion uses
        template=llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="<|endoftext|>")
    prompt = formatter(messages=messages).prompt
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == chat.render_conversation(
        tok, messages, generation_prompt=True)[0]
    vocab = llm._model.vocab
    assert llama_cpp.llama_vocab_eos(vocab) == llama_cpp.llama_vocab_eot(vocab) == tok.special_tokens["<|im_end|>"]
    assert llama_cpp.llama_vocab_is_eog(vocab, tok.eot_token)  # a document's end stops generation too
    llm.close()


# --- the command line -----------------------------------------------------------------------------------

def run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_export_command_line_with_a_lora_run(tmp_path):
    # a real run: a trained vocabulary, a few steps of pretraining, two of LoRA fine-tuning; the fine-tune
    # exports with its adapter folded in and the chat template
    (tmp_path / "stories.txt").write_text(stories(200_000), encoding="utf-8")
    rows = [json.dumps({"prompt": f"Dog {i}?", "response": "The dog ran."})
            for i in range(8)]
    (tmp_path / "chat.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    steps = [["prepare.py", f"--input={tmp_path / 'stories.txt'}", "--vocab_size=400", f"--out_dir={tmp_path}",
              "--name=d"],
             ["train.py", f"--data_dir={tmp_path / 'd'}", f"--out_dir={tmp_path / 'run'}", "--device=cpu",
              "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4", "--max_iters=3",
              "--eval_iters=1", "--pos=rope", "--norm=rmsnorm", "--mlp=swiglu", "--num_threads=1"],
             ["finetune.py", f"--base_dir={tmp_path / 'run'}", f"--data={tmp_path / 'chat.jsonl'}",
              f"--val_data={tmp_path / 'chat.jsonl'}", f"--out_dir={tmp_path / 'chat'}", "--device=cpu",
              "--num_threads=1", "--max_iters=2", "--warmup_iters=1", "--eval_interval=2", "--eval_iters=1",
              "--batch_size=4", "--eval_instructions=0", "--learning_rate=1e-2", "--lora_r=4"],
             ["export.py", f"--out_dir={tmp_path / 'chat'}", "--to=gguf", f"--dest={tmp_path / 'out' / 'chat.gguf'}",
              "--gguf_type=q8_0"]]
    for step in steps:
        proc = run(*step)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "llama" in proc.stdout and "q8_0" in proc.stdout
    reader = gguf.GGUFReader(str(tmp_path / "out" / "chat.gguf"))
    assert field(reader, "general.architecture") == "llama" and field(reader, "general.name") == "chat"
    assert field(reader, "tokenizer.ggml.eot_token_id") == 401 and "tokenizer.chat_template" in reader.fields
    merged, _, _ = load_run(str(tmp_path / "chat"))
    merge_lora(merged)
    base, _, _ = load_run(str(tmp_path / "run"))
    ours, before = gguf_tensors(merged, "llama"), gguf_tensors(base, "llama")
    stored = {t.name: values(t) for t in reader.tensors}
    np.testing.assert_allclose(stored["blk.0.attn_q.weight"], ours["blk.0.attn_q.weight"].numpy(), atol=2e-3)
    assert (ours["blk.0.attn_q.weight"] - before["blk.0.attn_q.weight"]).abs().max() > 1e-3  # the adapter counts

    wrong = run("export.py", f"--out_dir={tmp_path / 'run'}", "--to=gguf", "--gguf_type=q4_k")
    assert wrong.returncode != 0 and "gguf_type='q4_k': choose one of f32, f16, q8_0" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    directory = run("export.py", f"--out_dir={tmp_path / 'run'}", "--to=gguf", f"--dest={tmp_path / 'out'}")
    assert directory.returncode != 0 and "is a directory" in directory.stderr and "Traceback" not in directory.stderr
