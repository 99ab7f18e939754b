"""export.py: a model and tokenizer exported to Hugging Face transformers give our logits, our greedy
tokens and our ids, for both the GPT-2 and the Llama layout; other layouts are refused."""
import gzip
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import chat  # noqa: E402
from export import ExportError, architecture, check_dest, export_hf, gpt2_model, load_exactly  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {
    "gpt2": dict(),
    "gpt2-bias-untied": dict(bias=True, tie_embeddings=False),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu"),
    "llama-bias-untied": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=True, tie_embeddings=False),
    "qwen3": dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True),
    "qwen3-untied": dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False),
    "gpt2-relu2": dict(mlp="relu2"),
}


def stories(n_chars):
    with gzip.open(os.path.join(ROOT, "data", "tinystories_sample", "train.txt.gz"), "rt", encoding="utf-8") as f:
        return f.read(n_chars)


def random_model(vocab_size, **kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=vocab_size, block_size=96, **kw)).eval()
    with torch.no_grad():  # move every weight off its initial value, norms and biases included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def gpt2_tok():
    return Tokenizer.gpt2()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exported_model_matches(layout, gpt2_tok, tmp_path):
    model = random_model(gpt2_tok.n_vocab, **LAYOUTS[layout])
    export_hf(model, gpt2_tok, str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    expected = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    assert type(hf).__name__ == expected[layout.split("-")[0]]
    idx = torch.randint(0, gpt2_tok.n_vocab, (2, 64))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    prompt = idx[:1, :6]
    greedy_ours = model.generate(prompt, 50, temperature=0)
    greedy_hf = hf.generate(prompt, max_new_tokens=50, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(greedy_ours, greedy_hf)


def test_exported_tokenizers_give_our_ids(gpt2_tok, tmp_path):
    text = stories(300_000)
    trained = Tokenizer.train([text], vocab_size=700)
    for tok in (gpt2_tok, trained):
        dest = tmp_path / tok.name
        export_hf(random_model(tok.n_vocab), tok, str(dest))
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(dest))
        assert hf_tok(text)["input_ids"] == tok.encode(text, allowed_special="all")
        assert hf_tok.decode(tok.encode(text[:5000], allowed_special="all")) == text[:5000]
        assert hf_tok.eos_token == "<|endoftext|>"


def test_chat_template_gives_our_ids_and_generation_stops_at_im_end(gpt2_tok, tmp_path):
    tok = chat.add_chat_tokens(gpt2_tok)
    hf_model, _ = export_hf(random_model(tok.n_vocab), tok, str(tmp_path / "hf"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!\n  A dog?"},
                    {"role": "assistant", "content": " Once upon a time,\n\na dog. "}, {"role": "user", "content": "More"}]
    for messages, prompt in ((conversation, True), (conversation[:3], False)):
        ours = chat.render_conversation(tok, messages, generation_prompt=prompt)[0]
        theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True, return_dict=False)
        assert list(theirs) == ours
    assert hf_model.generation_config.eos_token_id == [tok.special_tokens["<|im_end|>"], tok.eot_token]
    assert hf_tok.model_max_length == 96 and hf_tok.pad_token == "<|endoftext|>"
    export_hf(random_model(gpt2_tok.n_vocab), gpt2_tok, str(tmp_path / "plain"))  # no chat tokens: no template
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "plain")).chat_template is None


def test_a_missing_weight_is_never_masked(gpt2_tok):
    hf = gpt2_model(random_model(gpt2_tok.n_vocab))  # no biases of ours: GPT-2's are zeros
    state = dict(hf.state_dict())
    assert not state.pop("transformer.h.0.attn.c_attn.bias").any()
    with pytest.raises(ExportError, match=r"missing \['transformer.h.0.attn.c_attn.bias'\]"):
        load_exactly(gpt2_model(random_model(gpt2_tok.n_vocab)), state)


def test_dest_that_would_delete_other_things_is_refused(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "quickstart"
    (run_dir / "best").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "runs")
    for dest, reason in ((run_dir, "holds the run"), (tmp_path / "runs", "holds the run"), (".", "holds the run"),
                         (tmp_path, "holds the run")):
        with pytest.raises(ExportError, match=reason):
            check_dest(str(dest), str(run_dir))
    with pytest.raises(ExportError, match="holds the working directory"):
        check_dest(str(tmp_path))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep")
    with pytest.raises(ExportError, match="is not an export"):
        check_dest(str(notes), str(run_dir))
    check_dest(str(tmp_path / "new"), str(run_dir))  # a new directory, or an empty one, is fine
    assert (run_dir / "best").is_dir() and (notes / "todo.txt").read_text() == "keep"


def test_layouts_without_an_equivalent_are_refused():
    with pytest.raises(ExportError, match="pos=learned, norm=rmsnorm, mlp=gelu"):
        architecture(GPTConfig(norm="rmsnorm"))
    with pytest.raises(ExportError, match="mlp=swiglu"):
        architecture(GPTConfig(mlp="swiglu"))
    with pytest.raises(ExportError, match="mlp=relu2, qk_norm=False"):
        architecture(GPTConfig(pos="rope", norm="rmsnorm", mlp="relu2"))  # Llama's MLP is gated
    with pytest.raises(ExportError, match="qk_norm=True"):
        architecture(GPTConfig(qk_norm=True))  # GPT-2 has no qk_norm
    with pytest.raises(ExportError, match="Qwen3's MLP has no biases"):
        architecture(GPTConfig(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=True))
    assert architecture(GPTConfig(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True)) == "qwen3"


def test_export_command_line(tmp_path):
    # a real run: prepare a little text with a trained vocabulary, train a few steps, export, load offline
    src = tmp_path / "stories.txt"
    src.write_text(stories(200_000), encoding="utf-8")
    steps = [["prepare.py", f"--input={src}", "--vocab_size=400", f"--out_dir={tmp_path}", "--name=d"],
             ["train.py", f"--data_dir={tmp_path / 'd'}", f"--out_dir={tmp_path / 'run'}", "--device=cpu",
              "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=3",
              "--eval_iters=1", "--pos=rope", "--norm=rmsnorm", "--mlp=swiglu"],
             ["export.py", f"--out_dir={tmp_path / 'run'}", f"--dest={tmp_path / 'hf'}"]]
    for step in steps:
        proc = subprocess.run([sys.executable, *step], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.vocab_size == 400
    assert hf_tok("Once upon a time")["input_ids"] == Tokenizer.load(str(tmp_path / "d" / "tokenizer.tiktoken")).encode(
        "Once upon a time")

    missing = subprocess.run([sys.executable, "export.py", f"--out_dir={tmp_path / 'none'}",
                              f"--dest={tmp_path / 'hf'}"], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "no checkpoint" in missing.stderr and "Traceback" not in missing.stderr
    wrong = subprocess.run([sys.executable, "export.py", "--to=onnx"], cwd=ROOT, capture_output=True, text=True)
    assert wrong.returncode != 0 and "only export format" in wrong.stderr
    # exporting again replaces the directory whole, leaving nothing beside it; a file in the way is kept
    (tmp_path / "hf" / "stale.txt").write_text("from before")
    again = subprocess.run([sys.executable, *steps[-1]], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert not (tmp_path / "hf" / "stale.txt").exists() and (tmp_path / "hf" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".hf", "hf"))) == ["hf"]
    (tmp_path / "a_file").write_text("keep me")
    blocked = subprocess.run([sys.executable, "export.py", f"--out_dir={tmp_path / 'run'}",
                              f"--dest={tmp_path / 'a_file'}"], cwd=ROOT, capture_output=True, text=True)
    assert blocked.returncode != 0 and "is a file" in blocked.stderr and "Traceback" not in blocked.stderr
    assert (tmp_path / "a_file").read_text() == "keep me"
