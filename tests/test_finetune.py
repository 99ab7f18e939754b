"""finetune.py: the chat template and its label mask, the data checks and the instruction generator, LoRA
(starts as the base, merges exactly, trains only its own weights, saves small), left-padded batch generation,
and a short CPU fine-tune end to end (response loss falls; sample.py --chat, --adapter, --merge; a changed
base model is refused)."""
import json
import os
import random
import shutil
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file, save_file

import chat
import configurator
import files
import finetune as ft
import instruct
import lora
import training
from model import GPT, GPTConfig
from tokenizer import Tokenizer
from test_train import ROOT, interrupt_after_steps, stories

LLAMA_STYLE = dict(pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False)
STYLES = [dict(), LLAMA_STYLE, dict(bias=True)]


@pytest.fixture(scope="module")
def gpt2_chat():
    return chat.add_chat_tokens(Tokenizer.gpt2())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread only adds waiting, and on a busy machine a lot of it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(script, *args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**dict(dict(n_layer=2, n_head=2, n_embd=32, vocab_size=101, block_size=48), **kw))).eval()


# --- the chat template ----------------------------------------------------------------------------------

def test_chat_tokens_and_template_ids(gpt2_chat):
    tok = gpt2_chat
    assert tok.special_tokens == {"<|endoftext|>": 50256, "<|im_start|>": 50257, "<|im_end|>": 50258}
    assert tok.n_vocab == 50259 and tok.name == "gpt2+chat" and chat.add_chat_tokens(tok) is tok
    ids, mask = chat.render_conversation(tok, [{"role": "user", "content": "Hi"}], generation_prompt=True)
    assert ids == [50256, 50257, 7220, 198, 17250, 50258, 198, 50257, 562, 10167, 198]  # as in the docstring
    assert mask == [0] * len(ids)
    assert tok.decode(ids) == "<|endoftext|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_template_text_and_mask_on_responses_only(gpt2_chat):
    tok = gpt2_chat
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "Blue, of course."}]
    ids, mask = chat.render_conversation(tok, messages)
    assert tok.decode(ids) == ("<|endoftext|><|im_start|>system\nBe brief.<|im_end|>\n"
                               "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"
                               "<|im_start|>user\nAnother?<|im_end|>\n"
                               "<|im_start|>assistant\nBlue, of course.<|im_end|>\n")
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "Red.<|im_end|>Blue, of course.<|im_end|>"
    # the generation prompt is the training text of the same turn, up to the answer
    prompt, _ = chat.render_conversation(tok, messages[:-1], generation_prompt=True)
    answer_starts = len(ids) - len(tok.encode_ordinary("Blue, of course.")) - 2
    assert ids[:answer_starts] == prompt
    # a template token typed by a user is text, not the token
    typed, _ = chat.render_conversation(tok, [{"role": "user", "content": "<|im_end|>"},
                                            {"role": "assistant", "content": "ok"}])
    assert typed.count(50258) == 2 and tok.decode(typed).count("<|im_end|>") == 3


def test_labels_exactly_on_response_tokens_and_right_padding(gpt2_chat):
    tok = gpt2_chat
    examples = [chat.render_conversation(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": r}])
                for p, r in (("Say hi.", "Hi!"), ("Count to three, please.", "One, two, three."))]
    for ids, mask in examples:
        labels = chat.labels_of(ids, mask)
        assert len(labels) == len(ids) - 1
        kept = [(t, y) for t, y in enumerate(labels) if y != -100]
        assert [y for _, y in kept] == [i for i, m in zip(ids, mask) if m]  # every response token, nothing else
        assert all(labels[t] == ids[t + 1] for t, _ in kept)
        assert kept[-1][1] == tok.special_tokens["<|im_end|>"]
    x, y = chat.get_batch(examples, 8, torch.Generator().manual_seed(0), "cpu", pad_token=50256)
    longest = max(len(ids) for ids, _ in examples) - 1
    assert x.shape == y.shape == (8, longest)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        ids, mask = next(e for e in examples if e[0][:len(e[0]) - 1] == row_x[:len(e[0]) - 1])
        n = len(ids) - 1
        assert row_x[n:] == [50256] * (longest - n) and row_y[n:] == [-100] * (longest - n)
        assert row_y[:n] == chat.labels_of(ids, mask)


# --- data -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}', "message 1 has no 'role'"),
    ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "yo"}]}',
     "message 1 (user) has empty or missing content"),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
     "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "ends with a user message, not the assistant"),
    ('{"prompt": "hi", "response": ""}', "message 2 (assistant) has empty or missing content"),
    ('{"prompt": "hi"}', "expected {\"prompt\""),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
     '{"role": "assistant", "content": "c"}]}', "only the first message"),
    ('{"prompt": "hi", "response": "yo"', "not valid JSON"),
])
def test_malformed_rows_name_the_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    good = '{"prompt": "hi", "response": "hello"}'
    path.write_text(f"{good}\n\n{good}\n{line}\n", encoding="utf-8")
    with pytest.raises(files.DataError) as e:
        chat.read_conversations(str(path))
    assert "data.jsonl:4: " in str(e.value) and message in str(e.value)


def test_text_problems_name_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    good = '{"prompt": "hi", "response": "hello"}\n'.encode()
    path.write_bytes(good + '{"prompt": "caf\xe9", "response": "yo"}\n'.encode("latin-1"))
    with pytest.raises(files.DataError, match="data.jsonl:2: not valid UTF-8"):
        chat.read_conversations(str(path))
    path.write_bytes(good + b'{"prompt": "\\ud800", "response": "yo"}\n')  # JSON escape of a lone surrogate
    with pytest.raises(files.DataError, match=r"data.jsonl:2: message 1 \(user\) is not valid Unicode"):
        chat.read_conversations(str(path))
    path.write_bytes(b"\xef\xbb\xbf" + good + good)  # a byte-order mark is not an error
    assert len(chat.read_conversations(str(path))) == 2


def test_eval_rows_share_out_the_tasks_and_skip_unusable_rows():
    good = ([([], {"task": "words", "words": ["dog"]})] * 3 + [([], {"task": "begins", "begins": "Once"})] * 3
            + [([], {"task": "continue"})] * 3)
    unusable = [([], {"task": "words"}), ([], {"task": "begins", "begins": 5}), ([], {"other": 1})]
    rows = unusable + good
    assert [r["task"] for _, r in instruct.eval_rows(rows, 2)] == ["begins", "continue"]  # fewer than the tasks
    assert [r["task"] for _, r in instruct.eval_rows(rows, 7)] == ["begins"] * 3 + ["continue"] * 2 + ["words"] * 2
    assert instruct.eval_rows(rows, 100) == [r for task in ("begins", "continue", "words") for r in good
                                       if r[1]["task"] == task]
    assert instruct.eval_rows(unusable, 10) == []


def test_both_formats_and_the_seeded_split(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": f"p{i}", "response": f"r{i}", "task": "x"} for i in range(20)]
    rows.append({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                              {"role": "assistant", "content": "a"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    read = chat.read_conversations(str(path))
    assert read[0] == ([{"role": "user", "content": "p0"}, {"role": "assistant", "content": "r0"}], rows[0])
    assert [m["role"] for m in read[-1][0]] == ["system", "user", "assistant"]
    seed = 7
    train, val = chat.split_rows(read, 0.1, seed)
    assert len(val) == 2 and len(train) == 19 and not {id(r) for r in train} & {id(r) for r in val}
    assert chat.split_rows(read, 0.1, seed) == (train, val) and chat.split_rows(read, 0.1, 8) != (train, val)
    with pytest.raises(files.DataError, match="no data file"):
        chat.read_conversations(str(tmp_path / "missing.jsonl"))


def test_instruction_generator(tmp_path):
    story = stories(0, 1)[0]
    rows = instruct.instructions_of(story, random.Random(0), 400)
    assert [r["task"] for r in rows] == ["words", "begins", "continue"]
    for row in rows:
        assert len(row["prompt"]) + len(row["response"]) <= 400
    words, begins, cont = rows
    assert words["prompt"] == f"Write a story that uses the words: {', '.join(words['words'])}."
    assert len(set(words["words"])) == 3 and instruct.obeys(words, words["response"])
    assert begins["prompt"] == f"Write a story that begins with: {begins['begins']}"
    assert begins["response"].startswith(begins["begins"]) and instruct.obeys(begins, begins["response"])
    assert not instruct.obeys(begins, "Once upon a time.") and instruct.obeys(cont, "anything") is None
    long_words = " ".join(["The cat saw extraordinarily magnificent hippopotamuses.", "They photosynthesized "
                           "wonderfully.", "Everybody applauded.", "The end came quickly."] * 3)
    for seed in range(20):  # words this long make a longer prompt than the generator first allows for
        for row in instruct.instructions_of(long_words, random.Random(seed), 150):
            assert len(row["prompt"]) + len(row["response"]) <= 150 and instruct.obeys(row, row["response"]) is not False
    first_half = cont["prompt"][len("Continue this story: "):]
    assert story.startswith(first_half) and cont["response"] in story
    # deterministic, and the held-out split is prepare.py's
    source = tmp_path / "stories.txt"
    source.write_text("<|endoftext|>\n".join(stories(0, 60)), encoding="utf-8")
    outputs = []
    for name in ("a", "b"):
        instruct.write_instruct_data(str(source), str(tmp_path / name), 400, 0.1, 1337)
        outputs.append([(tmp_path / name / f"{s}.jsonl").read_bytes() for s in ("train", "val")])
    assert outputs[0] == outputs[1] and outputs[0][1]
    for split in ("train", "val"):
        chat.read_conversations(str(tmp_path / "a" / f"{split}.jsonl"))  # every row is well formed


# --- LoRA -----------------------------------------------------------------------------------------------

def lora_model(style, seed=0, targets="attn,mlp"):
    model = tiny(seed, **style)
    n_base = lora.grow_vocab(model, 103)
    lora.add_lora(model, lora.lora_layer_names(targets), r=4, alpha=8.0, dropout=0.0)
    lora.train_new_rows_only(model, n_base)
    return model, n_base


@pytest.mark.parametrize("style", [dict(), dict(tie_embeddings=False)])
def test_lora_optimizer_state_keeps_only_the_new_rows(style):
    model, n_base = lora_model(style)
    weights = lora.token_row_weights(model)
    optimizer = training.make_optimizer(model.parameters(), "cpu", 1e-3, 0.1, (0.9, 0.95), no_decay=weights.values())
    model.train()
    for seed in range(2):
        x = torch.randint(0, 103, (2, 8), generator=torch.Generator().manual_seed(seed))
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    full = optimizer.state_dict()
    compact = lora.compact_optimizer_state(optimizer, model, n_base)
    rows = lora.token_row_moments(optimizer, model)
    assert len(rows) == len(weights)
    for i in rows:
        assert not full["state"][i]["exp_avg"][:n_base].any()  # the base rows' moments are exactly zero
        assert compact["state"][i]["exp_avg"].shape[0] == 103 - n_base and full["state"][i]["exp_avg"].shape[0] == 103
    expanded = lora.expand_optimizer_state(compact, optimizer, model, n_base)
    assert expanded["state"].keys() == full["state"].keys()
    for i, moments in full["state"].items():
        for key, value in moments.items():
            assert torch.equal(expanded["state"][i][key], value), (i, key)
    unchanged = lora.expand_optimizer_state(full, optimizer, model, n_base)  # a full state (an older checkpoint)
    assert all(torch.equal(unchanged["state"][i]["exp_avg"], full["state"][i]["exp_avg"]) for i in rows)


@pytest.mark.parametrize("style", STYLES)
def test_lora_at_init_equals_base_and_merged_equals_unmerged(style):
    base = tiny(**style)
    model, n_base = lora_model(style)
    assert n_base == 101 and model.config.vocab_size == 103 and model.lm_head.weight.shape == (103, 32)
    idx = torch.randint(0, 101, (2, 20))
    base_logits, _ = base(idx)
    logits, _ = model(idx)
    torch.testing.assert_close(logits[..., :101], base_logits, rtol=0, atol=1e-6)
    # the new rows start as the mean of the old ones
    wte = model.transformer.wte.weight
    torch.testing.assert_close(wte[101], wte[:101].mean(dim=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        wte[101:] += 0.5
    adapted, _ = model(idx)
    assert not torch.allclose(adapted[..., :101], base_logits, atol=1e-3)
    with torch.inference_mode():  # the C++ decoding step knows plain layers only: it stands aside for adapters
        assert model.native_decoder(model.new_caches(1)) is None
    adapted_tokens = model.generate(idx[:1], 12, temperature=0)
    lora.merge_lora(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    merged, _ = model(idx)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(idx[:1], 12, temperature=0), adapted_tokens)  # merged: the C++ step
    assert set(model.state_dict()) == set(tiny(vocab_size=103, **style).state_dict())  # a plain GPT again


@pytest.mark.parametrize("style", [dict(), LLAMA_STYLE])
def test_only_adapter_weights_and_new_rows_learn(style):
    model, n_base = lora_model(style)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = training.make_optimizer(model.parameters(), "cpu", 1e-2, 0.1, (0.9, 0.95),
                                  no_decay=lora.token_row_weights(model).values())
    x = torch.randint(0, 103, (4, 16))
    for _ in range(3):
        _, loss = model(x, x)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        rows = set(lora.token_row_weights(model))
        assert set(grads) == {n for n, _ in model.named_parameters() if ".lora_" in n} | rows
        for name in rows:
            assert not grads[name][:n_base].any() and grads[name][n_base:].any()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    for name, value in after.items():
        changed = not torch.equal(value, before[name])
        if ".lora_" in name:
            assert changed or "lora_A" in name, name  # B moves off zero; A may too
        elif name in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(value[:n_base], before[name][:n_base]) and changed, name
        else:
            assert not changed, name


def test_adapter_file_is_small_and_round_trips(tmp_path):
    model, n_base = lora_model(dict(), targets="attn.c_attn,mlp.c_proj")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
    tensors = lora.adapter_tensors(model, n_base)
    assert set(tensors) == {f"transformer.h.{i}.{layer}.lora_{m}" for i in (0, 1) for m in "AB"
                            for layer in ("attn.c_attn", "mlp.c_proj")} | {"new_rows.transformer.wte.weight"}
    assert tensors["new_rows.transformer.wte.weight"].shape == (2, 32)
    path = tmp_path / "adapter.safetensors"
    save_file(tensors, str(path))
    full = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny().state_dict().items() if k != "lm_head.weight"}, str(full))
    assert sum(t.numel() for t in tensors.values()) == 2 * (4 * (32 + 96) + 4 * (128 + 32)) + 2 * 32
    assert os.path.getsize(path) < os.path.getsize(full) / 3
    fresh, _ = lora_model(dict(), seed=1, targets="attn.c_attn,mlp.c_proj")
    with torch.no_grad():
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k and "wte" not in k},
                              strict=False)
        fresh.transformer.wte.weight[:n_base] = model.transformer.wte.weight[:n_base]
    lora.load_adapter_tensors(fresh, load_file(str(path)), n_base)
    idx = torch.randint(0, 103, (2, 12))
    torch.testing.assert_close(fresh(idx)[0], model(idx)[0])
    other, _ = lora_model(dict(), targets="attn")
    with pytest.raises(files.CheckpointError, match="does not fit"):
        lora.load_adapter_tensors(other, load_file(str(path)), n_base)
    with pytest.raises(configurator.ConfigError, match="unknown layer 'attn.q'"):
        lora.lora_layer_names("attn.q")


# --- left padding ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", STYLES)
def test_left_padded_batch_generation_equals_one_by_one(style):
    model = tiny(**style)
    prompts = [torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 1, 12, 8)]
    for use_cache in (True, False):
        width = max(map(len, prompts))
        idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = (torch.arange(width) >= width - torch.tensor([len(p) for p in prompts])[:, None]).long()
        batch = model.generate(idx, 20, temperature=0, attention_mask=mask, use_cache=use_cache)
        for row, p in zip(batch, prompts):
            alone = model.generate(torch.tensor([p]), 20, temperature=0)
            assert row[width:].tolist() == alone[0, len(p):].tolist()
        # the padded rows' hidden states are those of the prompts alone
        states = model.hidden_states(idx, attention_mask=mask)
        for row, p in zip(states, prompts):
            torch.testing.assert_close(row[width - len(p):], model.hidden_states(torch.tensor([p]))[0],
                                       rtol=1e-5, atol=1e-5)
    # generate_batch: the same, cut at the stop token
    stop = int(model.generate(torch.tensor([prompts[0]]), 3, temperature=0)[0, -1])
    replies = instruct.generate_batch(model, prompts, 20, stop_token=stop, pad_token=0)
    for (reply, stopped), p in zip(replies, prompts):
        alone = model.generate(torch.tensor([p]), 20, temperature=0, eot_token=stop)[0, len(p):].tolist()
        assert reply == (alone[:alone.index(stop)] if stop in alone else alone) and stopped == (stop in alone)
    with pytest.raises(ValueError, match="does not fit block_size"):
        model.generate(idx, 40, attention_mask=mask)


def test_generate_batch_gives_each_prompt_its_own_room():
    model = tiny()  # block_size 48
    prompts = [list(range(1, 41)), [5, 6], [7, 8, 9, 10]]  # the widest leaves 8 tokens, the others 46 and 44
    alone = [model.generate(torch.tensor([p]), 48 - len(p), temperature=0)[0, len(p):].tolist() for p in prompts]
    stop = min(set(range(101)) - {t for a in alone for t in a})  # a token none of them makes: none stops
    replies = instruct.generate_batch(model, prompts, 100, stop_token=stop, pad_token=0)
    assert replies == [(a, False) for a in alone] and [len(a) for a in alone] == [8, 46, 44]
    assert instruct.generate_batch(model, [list(range(48)), [5, 6]], 100, stop, 0) == [([], False), (alone[1], False)]


def test_gradient_accumulation_weighs_every_response_token_alike():
    model = tiny()
    g = torch.Generator().manual_seed(0)

    def batch(responses):  # rows of 8 positions, the first n of each labelled
        x = torch.randint(0, 101, (len(responses), 8), generator=g)
        y = torch.full_like(x, -100)
        for row, n in enumerate(responses):
            y[row, :n] = torch.randint(0, 101, (n,), generator=g)
        return x, y
    batches = [batch([3, 1]), batch([8, 8, 6])]
    loss = ft.backward_over(model, batches, torch.amp.GradScaler("cpu", enabled=False), nullcontext())
    accumulated = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    _, whole = model(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    whole.backward()
    assert loss == pytest.approx(whole.item(), rel=1e-5) and accumulated
    for name, p in model.named_parameters():
        if name in accumulated:
            torch.testing.assert_close(accumulated[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


# --- end to end: a short fine-tune on CPU ---------------------------------------------------------------

TINY_BASE = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=48", "--block_size=96", "--batch_size=8",
             "--eval_iters=2", "--log_interval=10", "--warmup_iters=5", "--num_threads=1"]
FINETUNE = ["--device=cpu", "--num_threads=1", "--batch_size=8", "--eval_iters=4", "--log_interval=5",
            "--warmup_iters=5", "--eval_batch_size=20", "--eval_instructions=12"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny base model pretrained for seconds, and generated instructions short enough for its context."""
    base = tmp_path_factory.mktemp("finetune")
    source = base / "stories.txt"
    source.write_text("<|endoftext|>\n".join(stories(0, 300)), encoding="utf-8")
    run("prepare.py", f"--input={source}", "--vocab_size=512", f"--out_dir={base}", "--name=data")
    run("train.py", *TINY_BASE, f"--data_dir={base / 'data'}", f"--out_dir={base / 'base'}", "--max_iters=60",
        "--eval_interval=60", "--learning_rate=3e-3")
    run("finetune.py", "--make_data", f"--stories={source}", f"--make_data_dir={base / 'instruct'}",
        "--max_chars=150")
    return base


def probability_rows(table):
    """[(token id, probability)] of sample.py --show_probs output."""
    return [(int(line.split()[-3]), float(line.split()[-2])) for line in table.splitlines()[2:] if line.strip()]


def test_short_finetune_learns_and_loads_everywhere(base_run, tmp_path):
    out = tmp_path / "chat"
    data = [f"--base_dir={base_run / 'base'}", f"--data={base_run / 'instruct' / 'train.jsonl'}",
            f"--val_data={base_run / 'instruct' / 'val.jsonl'}"]
    proc = run("finetune.py", *FINETUNE, *data, f"--out_dir={out}", "--max_iters=40", "--eval_interval=20",
               "--learning_rate=1e-2", "--lora_r=4")
    with open(out / "log.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 20, 40]
    losses = [r["val_loss"] for r in evals]  # 5.31, 5.15, 5.11 here: the tiny base leaves little to learn
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.1, evals
    report = json.loads((out / "eval.json").read_text())
    assert report["val_response_loss"]["fine-tuned"] < report["val_response_loss"]["base"]
    assert set(report["results"]) == {"base, plain prompt", "base, chat template", "fine-tuned"}
    assert "uses all words" in proc.stdout and "Traceback" not in proc.stderr
    adapter = out / "best" / "adapter.safetensors"
    assert not (out / "best" / "model.safetensors").exists()
    assert os.path.getsize(adapter) < os.path.getsize(base_run / "base" / "best" / "model.safetensors") / 2
    chat_tok = Tokenizer.load(str(out / "tokenizer.tiktoken"))
    assert chat_tok.special_tokens["<|im_end|>"] == 513

    # sample.py: the run alone, the base plus --adapter, and the merged checkpoint give the same next-token
    # probabilities after the chat template; and a chat reply streams
    ask = ["--chat", "--start=Write a story that uses the words: dog, ball, sun.", "--device=cpu"]
    table = ["--show_probs", "--show_top=5"]
    lora = probability_rows(run("sample.py", f"--out_dir={out}", *ask, *table).stdout)
    based = probability_rows(run("sample.py", f"--out_dir={base_run / 'base'}", f"--adapter={out}", *ask,
                                 *table).stdout)
    run("finetune.py", f"--out_dir={out}", "--merge", "--device=cpu")
    merged = probability_rows(run("sample.py", f"--out_dir={out}", "--checkpoint=merged", *ask, *table).stdout)
    assert lora == based and len(lora) == 5
    briefly = probability_rows(run("sample.py", f"--out_dir={out}", *ask, *table, "--system=Be brief.").stdout)
    assert briefly != lora  # the system message is part of the context the table is for
    assert [i for i, _ in merged] == [i for i, _ in lora]
    assert all(abs(p - q) < 2e-4 for (_, p), (_, q) in zip(merged, lora))
    # export.py folds the adapter in, and the exported chat template gives the same prompt and probabilities
    transformers = pytest.importorskip("transformers")
    run("export.py", f"--out_dir={out}", f"--dest={tmp_path / 'hf'}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    messages = [{"role": "user", "content": "Write a story that uses the words: dog, ball, sun."}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == chat.render_conversation(chat_tok, messages, generation_prompt=True)[0]
    with torch.no_grad():
        probs = hf(torch.tensor([list(ids)])).logits[0, -1].softmax(-1)
    assert all(abs(probs[i].item() - p) < 2e-4 for i, p in lora)
    not_chat = run("sample.py", f"--out_dir={base_run / 'base'}", *ask, check=False)
    assert not_chat.returncode != 0 and "no chat tokens" in not_chat.stderr

    # an adapter on a base whose weights changed is refused, naming the reason
    changed = tmp_path / "changed"
    os.makedirs(changed / "best")
    for name in ("config.json",):
        (changed / "best" / name).write_bytes((base_run / "base" / "best" / name).read_bytes())
    for name in ("tokenizer.tiktoken", "tokenizer.special.json"):
        (changed / name).write_bytes((base_run / "base" / name).read_bytes())
    weights = load_file(str(base_run / "base" / "best" / "model.safetensors"))
    weights["transformer.ln_f.weight"] = weights["transformer.ln_f.weight"] * 1.01
    save_file(weights, str(changed / "best" / "model.safetensors"))
    refused = run("sample.py", f"--out_dir={changed}", f"--adapter={out}", *ask, check=False)
    assert refused.returncode != 0 and "trained on another base model" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_full_finetune_and_clear_errors(base_run, tmp_path):
    out = tmp_path / "full"
    data = [f"--base_dir={base_run / 'base'}", f"--data={base_run / 'instruct' / 'train.jsonl'}", "--val_data="]
    run("finetune.py", *FINETUNE, *data, f"--out_dir={out}", "--mode=full", "--max_iters=4", "--eval_interval=4",
        "--eval_instructions=0")
    assert (out / "best" / "model.safetensors").exists() and not (out / "best" / "adapter.safetensors").exists()
    reply = run("sample.py", f"--out_dir={out}", "--chat", "--start=Hi", "--num_samples=1", "--max_new_tokens=5")
    assert "tok/s" in reply.stderr and "Hi" not in reply.stdout  # the reply alone, not the prompt
    again = run("finetune.py", *FINETUNE, *data, f"--out_dir={out}", "--mode=full", "--max_iters=4", check=False)
    assert again.returncode != 0 and "already holds a run" in again.stderr
    merge_full = run("finetune.py", f"--out_dir={out}", "--merge", check=False)
    assert merge_full.returncode != 0 and "holds no adapter" in merge_full.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"messages": [{"role": "user", "content": "x"}]}\n')
    proc = run("finetune.py", *FINETUNE, f"--base_dir={base_run / 'base'}", f"--data={bad}", "--val_data=",
               f"--out_dir={tmp_path / 'x'}", check=False)
    assert proc.returncode != 0 and "bad.jsonl:2: the conversation ends with a user message" in proc.stderr
    no_stories = run("finetune.py", "--make_data", f"--stories={tmp_path / 'none.txt'}", check=False)
    assert no_stories.returncode != 0 and "none.txt" in no_stories.stderr
    zero = run("finetune.py", *FINETUNE, *data, f"--out_dir={tmp_path / 'z'}", "--eval_interval=0", check=False)
    assert zero.returncode != 0 and "eval_interval=0 must be positive" in zero.stderr
    assert "Traceback" not in proc.stderr + again.stderr + merge_full.stderr + no_stories.stderr + zero.stderr
    only_best = tmp_path / "only_best"  # --eval_only evaluates best/, with or without last/
    shutil.copytree(out, only_best)
    shutil.rmtree(only_best / "last")
    evaluated = run("finetune.py", *FINETUNE, *data, f"--out_dir={only_best}", "--mode=full", "--eval_only",
                    "--eval_instructions=0")
    assert "val response loss" in evaluated.stdout and "skipped: eval_instructions=0" in evaluated.stdout


def test_interrupted_finetune_resumes_to_identical_adapter(base_run, tmp_path):
    data = [f"--base_dir={base_run / 'base'}", f"--data={base_run / 'instruct' / 'train.jsonl'}",
            f"--val_data={base_run / 'instruct' / 'val.jsonl'}"]
    common = [*FINETUNE, *data, "--max_iters=16", "--lr_decay_iters=16", "--eval_interval=8", "--log_interval=1",
              "--eval_instructions=0", "--lora_r=4", "--lora_dropout=0.1"]  # dropout: the RNG must resume too
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run("finetune.py", *common, f"--out_dir={straight}")
    interrupt_after_steps("finetune.py", [*common, f"--out_dir={broken}", "--max_iters=100000"], broken, 3)
    saved = torch.load(broken / "last" / "state.pt", weights_only=True)
    stopped_at = saved["iter_num"]
    assert max(m["exp_avg"].shape[0] for m in saved["optimizer"]["state"].values()) < 513  # no base token rows
    assert 3 <= stopped_at < 16
    resumed = run("finetune.py", *common, f"--out_dir={broken}", "--init_from=resume")
    assert f"resuming from {broken / 'last'} at iteration {stopped_at}" in resumed.stdout
    a, b = load_file(str(straight / "last" / "adapter.safetensors")), load_file(str(broken / "last" / "adapter.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_finetune_max_time_fixes_its_schedule(base_run, tmp_path):
    data = [f"--base_dir={base_run / 'base'}", f"--data={base_run / 'instruct' / 'train.jsonl'}",
            f"--val_data={base_run / 'instruct' / 'val.jsonl'}"]
    out = tmp_path / "timed"
    proc = run("finetune.py", *FINETUNE, *data, f"--out_dir={out}", "--max_time=0.1", "--eval_interval=20",
               "--eval_instructions=0", "--lora_r=4")
    n = torch.load(out / "last" / "state.pt", weights_only=True)["max_iters"]
    assert f"max_time 0.1 min: {n} iterations" in proc.stdout and n >= 5
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    steps = [r for r in records if "loss" in r]
    from training import get_lr
    end = get_lr(n - 1, 1e-3, 1e-4, 5, n)  # the schedule ran to its end (near min_lr, unless n is a few steps)
    assert steps[-1]["iter"] == n and steps[-1]["lr"] == pytest.approx(end)
    assert not [name for name in os.listdir(out) if ".tmp" in name]  # the timing's probe checkpoint is gone
