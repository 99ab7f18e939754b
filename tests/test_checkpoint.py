"""checkpoint.py and the files of a run: a damaged or hostile file is one line naming it and what to do,
never a traceback, and nothing on disk is touched; the one loader serves sample.py, export.py and finetune.py.

    python -m pytest -q tests/test_checkpoint.py
"""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
from files import CheckpointError
from test_train import ROOT, TINY, run, stories
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A prepared corpus (512-token vocabulary) and a 4-iteration run on it with best/ and last/."""
    base = tmp_path_factory.mktemp("ckpt")
    src = base / "s.txt"
    src.write_text("<|endoftext|>\n".join(stories(0, 200)), encoding="utf-8")
    run("prepare.py", f"--input={src}", "--vocab_size=512", f"--out_dir={base}", "--name=data")
    out = base / "run"
    run("train.py", *TINY, f"--data_dir={base / 'data'}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2")
    return base


def fresh_copy(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "run", run_dir)
    return run_dir


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def sample(run_dir, *args):
    return run("sample.py", f"--out_dir={run_dir}", "--max_new_tokens=4", "--num_samples=1", "--device=cpu", *args,
               check=False)


@pytest.mark.parametrize("name, damage", [
    ("model.safetensors", lambda data: data[:len(data) // 2]),       # cut short
    ("model.safetensors", lambda data: b"\xff" * 8 + data[8:]),      # an absurd header length
    ("model.safetensors", lambda data: data[:6]),                     # not even a header
    ("config.json", lambda data: data[:len(data) // 2]),             # broken JSON
    ("config.json", lambda data: b'{"model": 1}'),                    # JSON, not a config
])
def test_a_damaged_checkpoint_file_is_one_line_naming_it(trained, tmp_path, name, damage):
    run_dir = fresh_copy(trained, tmp_path)
    path = run_dir / "best" / name
    path.write_bytes(damage(path.read_bytes()))
    before = {p: digest(p) for p in run_dir.rglob("*") if p.is_file()}
    proc = sample(run_dir)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    message = proc.stderr.strip()
    assert message.count("\n") == 0 and f"{path} is damaged" in message and "--checkpoint=last" in message, message
    assert before == {p: digest(p) for p in run_dir.rglob("*") if p.is_file()}
    assert sample(run_dir, "--checkpoint=last").returncode == 0  # the advice works


def test_weights_of_another_model_are_refused(trained, tmp_path):
    run_dir = fresh_copy(trained, tmp_path)
    config = json.loads((run_dir / "best" / "config.json").read_text())
    config["model"]["n_embd"] = 64
    (run_dir / "best" / "config.json").write_text(json.dumps(config))
    proc = sample(run_dir)
    assert proc.returncode != 0 and "does not hold the weights of the model its config.json describes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_damaged_state_is_refused_on_resume_and_nothing_is_written(trained, tmp_path):
    run_dir = fresh_copy(trained, tmp_path)
    state = run_dir / "last" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    before = {p: digest(p) for p in run_dir.rglob("*") if p.is_file()}
    proc = run("train.py", *TINY, f"--data_dir={trained / 'data'}", f"--out_dir={run_dir}", "--max_iters=6",
               "--init_from=resume", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{state} is damaged" in proc.stderr and "--checkpoint=best" in proc.stderr, proc.stderr
    assert before == {p: digest(p) for p in run_dir.rglob("*") if p.is_file()}


class Payload:
    """What a hostile state.pt would carry: unpickling it runs code."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_state_with_a_pickle_payload_is_refused_without_running_it(tmp_path):
    last = tmp_path / "last"
    last.mkdir()
    torch.save({"optimizer": {}, "iter_num": 1, "evil": Payload()}, last / "state.pt")
    with pytest.raises(CheckpointError, match="holds Python objects beyond tensors"):
        checkpoint.read_state(str(last))
    assert not os.path.exists("pwned") and not (tmp_path / "pwned").exists()
    with open(last / "state.pt", "wb") as f:  # a plain pickle, not even a torch file
        pickle.dump({"iter_num": 1}, f)
    with pytest.raises(CheckpointError, match="state.pt is damaged"):
        checkpoint.read_state(str(last))


def test_a_damaged_adapter_file_is_one_error(tmp_path):
    path = tmp_path / "last" / "adapter.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"adapter.safetensors is damaged .*--checkpoint=best"):
        checkpoint.read_tensors(str(path))


def test_damaged_tokenizer_files_are_one_error(tmp_path):
    tok = Tokenizer.train(stories(0, 50), vocab_size=300)
    path = str(tmp_path / "tok.tiktoken")
    tok.save(path)
    lines = open(path, "rb").read().splitlines(keepends=True)
    with open(path, "wb") as f:  # a rank missing in the middle: a hole in the vocabulary
        f.writelines(lines[:100] + lines[101:])
    with pytest.raises(ValueError, match="tok.tiktoken is damaged: rank 100 is missing"):
        Tokenizer.load(path)
    with open(path, "wb") as f:  # an absurd rank: no 2**31-entry table is allocated for it
        f.writelines(lines[:-1] + [lines[-1].split(b" ")[0] + b" 2000000000\n"])
    with pytest.raises(ValueError, match="tok.tiktoken is damaged: rank 298 is missing"):
        Tokenizer.load(path)
    tok.save(path)
    with open(str(tmp_path / "tok.special.json"), "w") as f:
        f.write('{"special_tok')
    with pytest.raises(ValueError, match="tok.special.json is damaged"):
        Tokenizer.load(path)


def test_a_lying_token_file_header_is_one_error(tmp_path):
    from data import HEADER_BYTES, read_header, write_tokens
    path = str(tmp_path / "train.bin")
    write_tokens(path, list(range(100)))
    data = bytearray(open(path, "rb").read())
    data[16:24] = (2 ** 63 - 1).to_bytes(8, "little")  # n_tokens: 2**63 - 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="header promises 9,223,372,036,854,775,807 tokens"):
        read_header(path)
    open(path, "wb").write(bytes(data[:HEADER_BYTES - 4]))
    with pytest.raises(ValueError, match="too short for a token file header"):
        read_header(path)


def test_one_loader_for_every_kind_of_run(trained, tmp_path):
    model, tok, config = checkpoint.load_run(str(trained / "run"))
    assert not model.training and tok.n_vocab == 512 == config["tokenizer"]["n_vocab"]
    with pytest.raises(CheckpointError, match="no checkpoint 'merged' in .*; it has best, last"):
        checkpoint.load_run(str(trained / "run"), "merged")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        checkpoint.load_run(str(tmp_path / "nothing"))


def test_scripts_answer_damage_in_one_line_via_export(trained, tmp_path):
    pytest.importorskip("transformers")
    run_dir = fresh_copy(trained, tmp_path)
    path = run_dir / "best" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    proc = subprocess.run([sys.executable, "export.py", f"--out_dir={run_dir}", f"--dest={tmp_path / 'hf'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and f"{path} is damaged" in proc.stderr
    assert not (tmp_path / "hf").exists()
