"""train.py and sample.py end to end on CPU: the loss falls, a killed run resumes to the very same weights,
two gloo processes train like one, bad checkpoints and diverging runs stop with clear errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from configurator import ConfigError

from stories import stories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=5", "--num_threads=1"]


def run(script, *args, check=True, timeout=240, env=None):
    proc = subprocess.run([PY, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else dict(os.environ, **env))
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def interrupt_after_steps(script, args, out_dir, steps):
    """Run script, and once its log holds steps training steps send SIGINT, as Ctrl-C would: it must save
    last/ and exit saying so."""
    proc = subprocess.Popen([PY, script, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out_dir, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(log) and sum(1 for line in open(log) if '"loss"' in line) >= steps:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert "stopped at iteration" in stdout, stdout + stderr
    assert proc.returncode == 128 + signal.SIGINT  # saved, but not finished: not a success


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """Two prepared corpora with trained 512-token vocabularies learnt from different stories."""
    base = tmp_path_factory.mktemp("data")
    dirs = []
    for name, first in (("a", 0), ("b", 300)):
        src = base / f"{name}.txt"
        src.write_text("<|endoftext|>\n".join(stories(first, 300)), encoding="utf-8")
        run("prepare.py", f"--input={src}", "--vocab_size=512", f"--out_dir={base}", f"--name={name}")
        dirs.append(str(base / name))
    return dirs


def log_records(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out_dir, kind="last"):
    return load_file(os.path.join(out_dir, kind, "model.safetensors"))


def test_loss_falls_and_outputs_are_written(data_dirs, tmp_path):
    out = str(tmp_path / "run")
    proc = run("train.py", *TINY, f"--data_dir={data_dirs[0]}", f"--out_dir={out}", "--max_iters=60",
               "--eval_interval=30", "--learning_rate=3e-3")
    evals = [r for r in log_records(out) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 30, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.8, evals
    assert 0 < evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    steps = [r for r in log_records(out) if "loss" in r]
    assert len(steps) == 60 and all(r["tok_per_s"] > 0 for r in steps)
    for name in ("loss.png", "tokenizer.tiktoken", "best/model.safetensors", "last/state.pt", "last/config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert "tok/s" in proc.stdout
    umask = os.umask(0)
    os.umask(umask)
    for kind in ("best", "last"):  # checkpoint directories get mkdir's permissions, not mkdtemp's 0700
        assert os.stat(os.path.join(out, kind)).st_mode & 0o777 == 0o777 & ~umask
    # the state file loads without pickle
    state = torch.load(os.path.join(out, "last", "state.pt"), weights_only=True)
    assert state["iter_num"] == 60
    # --eval_only evaluates the checkpoint (not fresh weights) and leaves the log alone
    before = log_records(out)
    evaluated = run("train.py", *TINY, f"--data_dir={data_dirs[0]}", f"--out_dir={out}", "--eval_only")
    assert f"iter 60: train loss {evals[-1]['train_loss']:.4f}, val loss {evals[-1]['val_loss']:.4f}" in evaluated.stdout
    assert log_records(out) == before
    nothing = run("train.py", *TINY, f"--data_dir={data_dirs[0]}", f"--out_dir={tmp_path / 'none'}", "--eval_only",
                  check=False)
    assert nothing.returncode != 0 and "no checkpoint" in nothing.stderr

    # sample.py: text, the probability table, and clear errors
    text = run("sample.py", f"--out_dir={out}", "--start=Once upon a time", "--num_samples=2",
               "--max_new_tokens=20", "--device=cpu")
    assert text.stdout.count("Once upon a time") == 2 and "tok/s" in text.stderr
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Tom had a red ball", encoding="utf-8")
    from_file = run("sample.py", f"--out_dir={out}", f"--start=FILE:{prompt}", "--num_samples=1",
                    "--max_new_tokens=5")
    assert from_file.stdout.startswith("Tom had a red ball")
    greedy = [run("sample.py", f"--out_dir={out}", "--start=One day", "--num_samples=1", "--temperature=0",
                  "--max_new_tokens=15", f"--use_cache={c}").stdout for c in (True, False)]
    assert greedy[0] == greedy[1]
    table = run("sample.py", f"--out_dir={out}", "--start=Once upon a", "--show_probs", "--show_top=5").stdout
    rows = [line for line in table.splitlines()[2:] if line.strip()]
    probs = [float(line.split()[-2]) for line in rows]
    assert len(rows) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    missing = run("sample.py", f"--out_dir={tmp_path / 'nothing'}", check=False)
    assert missing.returncode != 0 and "no checkpoint" in missing.stderr and "Traceback" not in missing.stderr
    for option, message in (("--temperature=-1", "temperature=-1"), ("--top_p=0", "top_p=0"),
                            ("--top_k=-5", "top_k=-5"), ("--show_top=100000", "show_top=100000"),
                            (f"--start=FILE:{tmp_path}", "cannot read the prompt file"),
                            ("--checkpoint=bets", "no checkpoint 'bets'")):
        bad = run("sample.py", f"--out_dir={out}", option, "--show_probs", check=False)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


@pytest.mark.parametrize("sampling", ["random", "epochs"])
def test_interrupted_run_resumes_to_identical_weights(data_dirs, tmp_path, sampling):
    common = [*TINY, f"--data_dir={data_dirs[0]}", "--max_iters=24", "--lr_decay_iters=24", "--eval_interval=8",
              "--dropout=0.1", f"--sampling={sampling}"]  # dropout: the RNG state must be restored too
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    run("train.py", *common, f"--out_dir={straight}")
    interrupt_after_steps("train.py", [*common, f"--out_dir={broken}", "--max_iters=100000"], broken, 5)
    stopped_at = torch.load(os.path.join(broken, "last", "state.pt"), weights_only=True)["iter_num"]
    assert 5 <= stopped_at < 24
    run("train.py", *common, f"--out_dir={broken}", "--init_from=resume")
    a, b = weights(straight), weights(broken)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert log_records(broken)[-1]["val_loss"] == log_records(straight)[-1]["val_loss"]
    points = lambda run_dir: [(r["iter"], "val_loss" in r) for r in log_records(run_dir)]  # noqa: E731
    assert points(broken) == points(straight)  # each iteration and evaluation logged once
    run("train.py", *common, f"--out_dir={straight}", "--init_from=auto")  # done already: evaluates again
    assert points(broken) == points(straight)


def test_checkpoint_keeps_the_float16_loss_scale(tmp_path):
    import checkpoint
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    info = {"iter_num": 3, "best_val_loss": 1.0, "tokens_seen": 0, "scaler": scaler.state_dict(), "config": {}}
    checkpoint.save_checkpoint(str(tmp_path), "last", model, optimizer, info)
    resumed = torch.amp.GradScaler("cpu")  # 65536.0 and 2000 by default
    checkpoint.load_training_state(str(tmp_path / "last"), torch.optim.AdamW(model.parameters()), resumed)
    assert resumed.get_scale() == 1024.0 and resumed.get_growth_interval() == 7


def test_resume_drops_the_log_the_checkpoint_had_not_reached(tmp_path, capsys):
    import checkpoint
    records = [{"iter": 0, "val_loss": 5.0}, {"iter": 1, "loss": 4.0}, {"iter": 2, "loss": 3.9},
               {"iter": 2, "val_loss": 3.8}, {"iter": 3, "loss": 3.7}]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records[:3]) + '{"iter": 2, "lo\n' +
                   "".join(json.dumps(r) + "\n" for r in records[3:]))  # a line cut short by a crash
    checkpoint.truncate_log(str(tmp_path), 2, evaluates_again=False)  # resumes at 2, extended: no evaluation there
    assert log_records(str(tmp_path)) == records[:4] and "log.jsonl:4 is not a log record" in capsys.readouterr().err
    checkpoint.truncate_log(str(tmp_path), 2)  # resumes at 2 and evaluates there again
    assert log_records(str(tmp_path)) == records[:3]
    checkpoint.truncate_log(str(tmp_path), 0)  # a fresh start
    assert log_records(str(tmp_path)) == []


def test_a_failed_checkpoint_leaves_no_temporary_directory(tmp_path, monkeypatch):
    import checkpoint

    def full_disk(tmp, final):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "replace_directory", full_disk)
    model = torch.nn.Linear(2, 2)
    info = {"iter_num": 3, "best_val_loss": 1.0, "tokens_seen": 0, "config": {}}
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoint(str(tmp_path), "last", model, torch.optim.AdamW(model.parameters()), info)
    assert os.listdir(tmp_path) == []


def test_stale_temporary_checkpoints_are_removed(tmp_path):
    import checkpoint
    for name in (".last.tmpk3_x9", ".best.tmpq1", "last", "notes.tmpdir"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_bytes(b"x")
    (tmp_path / "log.jsonl").write_text("")
    checkpoint.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["last", "log.jsonl", "notes.tmpdir"]


def test_each_ddp_process_resumes_from_its_own_random_state(data_dirs, tmp_path):
    """With dropout, a 2-process run continued from a checkpoint ends with the weights of one never
    stopped: each process gets back its own random-number generator, not process 0's."""
    common = [*TINY, f"--data_dir={data_dirs[0]}", "--eval_interval=100", "--lr_decay_iters=6", "--dropout=0.2",
              "--gradient_accumulation_steps=2"]
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    for args in ([f"--out_dir={straight}", "--max_iters=6"], [f"--out_dir={resumed}", "--max_iters=3"],
                 [f"--out_dir={resumed}", "--max_iters=6", "--init_from=resume"]):
        proc = subprocess.run([*torchrun, *common, *args], cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = weights(straight), weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_micro_batches_must_share_out_over_the_processes():
    from training import micro_steps_per_process
    assert micro_steps_per_process(4, 64, 2) == 2
    assert micro_steps_per_process(1, 16, 1) == 1
    with pytest.raises(ConfigError, match="add --gradient_accumulation_steps=2 --batch_size=8$"):
        micro_steps_per_process(1, 16, 2)  # config/quickstart.py under torchrun --nproc_per_node=2
    with pytest.raises(ConfigError, match="add --gradient_accumulation_steps=8 --batch_size=32$"):
        micro_steps_per_process(4, 64, 8)
    with pytest.raises(ConfigError, match="add --gradient_accumulation_steps=4$"):
        micro_steps_per_process(3, 5, 2)  # 15 sequences cannot be 4 equal micro-batches


@pytest.mark.parametrize("sampling", ["random", "epochs"])
def test_two_gloo_processes_train_like_one(data_dirs, tmp_path, sampling):
    common = [*TINY, f"--data_dir={data_dirs[0]}", "--max_iters=6", "--eval_interval=100",
              "--gradient_accumulation_steps=2", f"--sampling={sampling}"]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    run("train.py", *common, f"--out_dir={single}")
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    if sampling == "random":  # a CPU config (1 micro-batch a step) under torchrun: the error says what to add,
        proc = subprocess.run([*torchrun, "train.py", *TINY, f"--data_dir={data_dirs[0]}", f"--out_dir={ddp}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=240)  # and nothing is written
        assert proc.returncode != 0 and "add --gradient_accumulation_steps=2 --batch_size=4" in proc.stderr, \
            proc.stderr
        assert not os.path.exists(ddp)
    proc = subprocess.run([*torchrun, "train.py", *common, f"--out_dir={ddp}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout
    one = [r["loss"] for r in log_records(single) if "loss" in r]
    two = [r["loss"] for r in log_records(ddp) if "loss" in r]
    assert len(one) == len(two) == 6
    for x, y in zip(one, two):
        assert abs(x - y) < 1e-4, (one, two)
    a, b = weights(single), weights(ddp)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_checkpoint_of_another_model_or_tokenizer_is_refused(data_dirs, tmp_path):
    out = str(tmp_path / "run")
    run("train.py", *TINY, f"--data_dir={data_dirs[0]}", f"--out_dir={out}", "--max_iters=2")
    again = run("train.py", *TINY, f"--data_dir={data_dirs[0]}", f"--out_dir={out}", "--max_iters=4", check=False)
    assert again.returncode != 0 and "already holds a run" in again.stderr
    shape = run("train.py", *TINY, f"--data_dir={data_dirs[0]}", f"--out_dir={out}", "--n_layer=3",
                "--init_from=resume", check=False)
    assert shape.returncode != 0 and "n_layer: checkpoint 2, this run 3" in shape.stderr
    other_vocab = run("train.py", *TINY, f"--data_dir={data_dirs[1]}", f"--out_dir={out}", "--init_from=resume",
                      "--max_iters=4", check=False)
    assert other_vocab.returncode != 0 and "tokenizer" in other_vocab.stderr, other_vocab.stderr
    assert "Traceback" not in shape.stderr + other_vocab.stderr
    # nothing was overwritten by the refused runs
    assert torch.load(os.path.join(out, "last", "state.pt"), weights_only=True)["iter_num"] == 2


def test_diverging_loss_stops_with_the_iteration(data_dirs, tmp_path):
    proc = run("train.py", *TINY, f"--data_dir={data_dirs[0]}", f"--out_dir={tmp_path / 'nan'}", "--max_iters=50",
               "--learning_rate=1e30", "--warmup_iters=0", "--grad_clip=0.0", "--eval_interval=1000", check=False)
    assert proc.returncode != 0
    assert "at iteration" in proc.stderr and ("nan" in proc.stderr or "inf" in proc.stderr), proc.stderr


def test_unknown_setting_is_a_clear_error(data_dirs, tmp_path):
    proc = run("train.py", "--learning_rat=0.1", check=False)
    assert proc.returncode != 0 and "did you mean learning_rate" in proc.stderr and "Traceback" not in proc.stderr
    for option, message in (("--max_iters=-5", "max_iters=-5 must be 0 or more"),
                            ("--eval_interval=0", "eval_interval=0 must be positive"),
                            ("--n_head=0", "n_head=0 must be positive")):
        proc = run("train.py", *TINY, f"--data_dir={data_dirs[0]}", f"--out_dir={tmp_path / 'x'}", option,
                   check=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_compile_without_a_compiler_trains_eagerly_with_one_warning(data_dirs, tmp_path):
    common = [*TINY, f"--data_dir={data_dirs[0]}", "--max_iters=4", "--eval_interval=4", "--dropout=0.1"]
    eager = run("train.py", *common, f"--out_dir={tmp_path / 'eager'}")
    # torch.compile's CPU backend needs a C++ compiler: name one that does not exist
    fallback = run("train.py", *common, "--compile=True", f"--out_dir={tmp_path / 'fallback'}",
                   env={"CXX": str(tmp_path / "no-such-compiler")})
    warnings = [line for line in fallback.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "torch.compile cannot run here" in warnings[0], fallback.stderr
    assert "Traceback" not in fallback.stderr
    # the trial of the compiled model left no trace: the run is the eager one, number for number
    def losses(run_dir):
        return [(r["iter"], r.get("loss"), r.get("train_loss"), r.get("val_loss")) for r in log_records(run_dir)]
    assert losses(tmp_path / "fallback") == losses(tmp_path / "eager") and len(losses(tmp_path / "eager")) == 6
    assert "warning" not in eager.stderr.lower()


def test_max_time_fixes_the_schedule_from_timing_and_a_resumed_run_keeps_it(data_dirs, tmp_path):
    """max_time: the iteration count comes from timing the first steps (which leave no trace: the run equals
    one given that count as max_iters), is recorded, the learning rate ends decayed, and an interrupted run
    resumed finishes the schedule it fixed (equal to an uninterrupted run of that count)."""
    common = [*TINY, f"--data_dir={data_dirs[0]}", "--eval_interval=50", "--dropout=0.1", "--min_lr=1e-4"]
    timed, counted = tmp_path / "timed", tmp_path / "counted"
    proc = run("train.py", *common, f"--out_dir={timed}", "--max_time=0.1")
    n = torch.load(timed / "last" / "state.pt", weights_only=True)["max_iters"]
    assert f"max_time 0.1 min: {n} iterations" in proc.stdout and n > 10 and "max_iters is not used" in proc.stdout
    steps = [r for r in log_records(str(timed)) if "loss" in r]
    assert steps[-1]["iter"] == n and steps[-1]["lr"] < 1e-4 + 1e-3 * 1e-2  # decayed to min_lr
    run("train.py", *common, f"--out_dir={counted}", f"--max_iters={n}")
    a, b = weights(str(timed)), weights(str(counted))
    for name in a:
        assert torch.equal(a[name], b[name]), name

    broken, straight = tmp_path / "broken", tmp_path / "straight"
    interrupt_after_steps("train.py", [*common, f"--out_dir={broken}", "--max_time=0.1"], str(broken), 5)
    fixed = torch.load(broken / "last" / "state.pt", weights_only=True)["max_iters"]
    resumed = run("train.py", *common, f"--out_dir={broken}", "--max_time=0.1", "--init_from=resume")
    assert f"of {fixed} (fixed by max_time)" in resumed.stdout and "max_time 0.1 min:" not in resumed.stdout
    run("train.py", *common, f"--out_dir={straight}", f"--max_iters={fixed}")
    a, b = weights(str(straight)), weights(str(broken))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_max_time_replans_a_wsd_run_given_more_time_and_it_equals_a_run_of_its_final_count(data_dirs, tmp_path):
    """A wsd run interrupted, then resumed with a longer budget: at its evaluations the count is planned again
    from the pace (the peak rate so far is the same for any count), and the run still ends with the weights of
    one given the final count as max_iters."""
    common = [*TINY, f"--data_dir={data_dirs[0]}", "--eval_interval=5", "--dropout=0.1", "--lr_schedule=wsd",
              "--cooldown=0.4", "--min_lr=0.0"]
    broken, straight = tmp_path / "broken", tmp_path / "straight"
    interrupt_after_steps("train.py", [*common, f"--out_dir={broken}", "--max_time=0.1"], str(broken), 5)
    fixed = torch.load(broken / "last" / "state.pt", weights_only=True)["max_iters"]
    resumed = run("train.py", *common, f"--out_dir={broken}", "--max_time=0.3", "--init_from=resume")
    final = torch.load(broken / "last" / "state.pt", weights_only=True)["max_iters"]
    assert f"of {fixed} (fixed by max_time)" in resumed.stdout
    # resumed at the evaluation of step 5, planned again at step 10: the cooldown (the last 40%) starts later
    assert f"max_time 0.3 min: {final} iterations instead of" in resumed.stdout and final > 2 * fixed, resumed.stdout
    steps = [r for r in log_records(str(broken)) if "loss" in r]
    from training import get_lr
    end = get_lr(final - 1, 1e-3, 0.0, 5, final, True, "wsd", 0.4)  # the last step of the cooldown to 0
    assert steps[-1]["iter"] == final and steps[-1]["lr"] == pytest.approx(end)
    run("train.py", *common, f"--out_dir={straight}", f"--max_iters={final}")
    a, b = weights(str(straight)), weights(str(broken))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_muon_takes_the_block_matrices_and_resumes_exactly(data_dirs, tmp_path):
    from model import GPT, GPTConfig
    from training import make_muon_optimizer
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16, tie_embeddings=False))
    muon, adamw = make_muon_optimizer(model, "cpu", 1e-3, 0.1, (0.9, 0.95)).optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight"} <= {
        names[id(p)] for g in adamw.param_groups for p in g["params"]}

    common = [*TINY, f"--data_dir={data_dirs[0]}", "--optim=muon", "--lr_decay_iters=8", "--eval_interval=4"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run("train.py", *common, f"--out_dir={straight}", "--max_iters=8")
    run("train.py", *common, f"--out_dir={resumed}", "--max_iters=4")
    run("train.py", *common, f"--out_dir={resumed}", "--max_iters=8", "--init_from=resume")
    a, b = weights(straight), weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    adamw_run = run("train.py", *TINY, f"--data_dir={data_dirs[0]}", f"--out_dir={resumed}", "--max_iters=9",
                    "--init_from=resume", check=False)  # the Muon run's optimizer state is not AdamW's
    assert adamw_run.returncode != 0 and "optimizer" in adamw_run.stderr and "Traceback" not in adamw_run.stderr


def test_train_fraction_draws_only_from_the_first_part(data_dirs):
    from data import TokenDataset
    dataset = TokenDataset(data_dirs[0])
    whole = len(dataset.splits["train"])
    dataset.keep_fraction("train", 0.25)
    assert len(dataset.splits["train"]) == int(whole * 0.25)
    first = dataset.splits["train"][:]
    x, y = dataset.get_batch("train", 64, 16, torch.Generator().manual_seed(0))
    starts = [next(i for i in range(len(first) - 16) if list(first[i:i + 16]) == row) for row in x.tolist()]
    assert all(s + 16 < len(first) for s in starts)
    with pytest.raises(ValueError, match="must be in"):
        dataset.keep_fraction("train", 0.0)


def test_our_muon_is_torchs_muon_and_its_float32_path_stays_close():
    """training.Muon against its reference, torch.optim.Muon(adjust_lr_fn="match_rms_adamw"): identical with
    the same (bfloat16) Newton-Schulz products; in float32, as it runs on the CPU, within bfloat16's rounding."""
    from training import Muon, orthogonalize
    torch.manual_seed(0)
    shapes = [(96, 32), (32, 128), (48, 48)]
    start = [torch.randn(*s) for s in shapes]
    grads = [[torch.randn(*s) for s in shapes] for _ in range(3)]

    def after_steps(make):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
        return [p.detach() for p in params]
    reference = after_steps(lambda ps: torch.optim.Muon(ps, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"))
    same = after_steps(lambda ps: Muon(ps, 1e-2, 0.1, ns_dtype=torch.bfloat16))
    ours = after_steps(lambda ps: Muon(ps, 1e-2, 0.1))  # float32 on the CPU
    for r, s, o, p in zip(reference, same, ours, start):
        assert torch.equal(r, s)
        assert (o - p).abs().max() > 1e-3  # it moved
        torch.testing.assert_close(o, r, rtol=0, atol=2e-3)
    x = orthogonalize(torch.randn(64, 16))  # tall: 16 columns, about orthonormal
    singular = torch.linalg.svdvals(x)
    assert singular.min() > 0.5 and singular.max() < 1.5


def test_max_iters_0_resumes_an_older_checkpoint_without_a_recorded_count(data_dirs, tmp_path):
    """A checkpoint from before max_time (no "max_iters" in state.pt) resumed with --max_iters=0: evaluate and
    stop, as 0 asks (0 counted as "no count": the run fell back to the missing one and timed steps for a
    max_time it was never given)."""
    out = tmp_path / "run"
    run("train.py", *TINY, f"--data_dir={data_dirs[0]}", f"--out_dir={out}", "--max_iters=2")
    state = torch.load(out / "last" / "state.pt", weights_only=True)
    del state["max_iters"]
    torch.save(state, out / "last" / "state.pt")
    proc = run("train.py", *TINY, f"--data_dir={data_dirs[0]}", f"--out_dir={out}", "--max_iters=0",
               "--init_from=resume", check=False)
    assert proc.returncode == 0 and "iter 2: train loss" in proc.stdout, proc.stderr
    assert "max_time" not in proc.stdout


def test_learning_rate_schedules():
    from training import get_lr
    lr = {shape: [get_lr(it, 1.0, 0.1, 10, 110, schedule=shape, cooldown=0.2) for it in range(120)]
          for shape in ("cosine", "linear", "wsd", "wsd_sqrt")}
    for shape, values in lr.items():
        assert values[9] == pytest.approx(10 / 11) and values[10] == 1.0, shape  # warmup, then the peak
        assert values[110] == values[119] == 0.1, shape  # min_lr from decay_iters on
        assert all(a >= b for a, b in zip(values[10:], values[11:])), shape  # never rises after the peak
    assert lr["linear"][60] == pytest.approx(0.55) and lr["cosine"][60] == pytest.approx(0.55)
    assert lr["linear"][35] == pytest.approx(1 - 0.9 / 4) and lr["cosine"][35] > lr["linear"][35]
    assert lr["wsd"][89] == 1.0 and lr["wsd"][90] == pytest.approx(1.0)  # stable until the last 20% of the 100 decay iterations
    assert lr["wsd"][100] == pytest.approx(0.55) and lr["wsd"][109] == pytest.approx(1 - 0.9 * 19 / 20)
    assert lr["wsd_sqrt"][:90] == lr["wsd"][:90]  # the same until the cooldown, then 1 - sqrt of its share
    assert lr["wsd_sqrt"][95] == pytest.approx(1 - 0.9 * 0.5) and lr["wsd_sqrt"][100] == pytest.approx(1 - 0.9 * 0.5 ** 0.5)
    assert get_lr(50, 1.0, 0.1, 10, 110, decay=False) == 1.0
    with pytest.raises(ValueError, match="lr_schedule='step'"):
        get_lr(50, 1.0, 0.1, 10, 110, schedule="step")


def test_max_time_replans_only_where_no_used_learning_rate_changes():
    """The count again at an evaluation: the pace since says the run would end late (or early), and a new count
    is taken where every learning rate used so far stays as it was -- before a wsd cooldown, within any warmup,
    at a constant rate -- and where the end moves by more than 2% of the budget."""
    from functools import partial

    from training import get_lr, replanned_iterations

    def lr_at(schedule, it, count, decay=True):
        return get_lr(it, 1.0, 0.0, 10, count, decay, schedule, cooldown=0.4)
    wsd, cosine = partial(lr_at, "wsd"), partial(lr_at, "cosine")
    # 1,000 planned at 0.6 s a step for 10 minutes; at step 200, 150 s in, the steps take 0.5 s (evaluations 1 s,
    # every 100 steps): (600 - 150 - 1) / (0.5 + 0.01) = 880 more
    assert replanned_iterations(10, 150, 200, 1000, 0.5, 1.0, 100, wsd) == 200 + 880
    assert replanned_iterations(10, 150, 200, 1000, 0.5, 1.0, 100, cosine) == 1000  # past the warmup: kept
    assert replanned_iterations(10, 150, 5, 1000, 0.5, 1.0, 100, cosine) == 5 + 880  # within the warmup
    assert replanned_iterations(10, 150, 200, 1000, 0.5, 1.0, 100, partial(cosine, decay=False)) == 1080
    # slower instead (0.9 s a step): 449 / 0.91 = 493 more, 693 in all, whose cooldown starts at 10 + 0.6 * 683 =
    # 420: the 200 steps so far stay at the peak
    assert replanned_iterations(10, 150, 200, 1000, 0.9, 1.0, 100, wsd) == 693
    # at step 650 of 1,000 the cooldown (from step 604) has begun: whatever the pace, the count stays
    assert replanned_iterations(10, 400, 650, 1000, 0.9, 1.0, 100, wsd) == 1000
    assert replanned_iterations(10, 400, 650, 1000, 0.1, 1.0, 100, wsd) == 1000
    # on pace, give or take 2% of the budget (12 s): at 122 s, 0.6 s a step, 981 in all (19 x 0.61 s early): kept
    assert replanned_iterations(10, 122, 200, 1000, 0.6, 1.0, 100, wsd) == 1000
    assert replanned_iterations(10, 122, 200, 1000, 0.57, 1.0, 100, wsd) == 1022  # 22 x 0.58 = 13 s early: taken
    # already past the budget: one more step where that is allowed
    assert replanned_iterations(10, 700, 5, 1000, 0.5, 1.0, 100, wsd) == 6


def test_a_bad_schedule_is_refused_before_training(data_dirs, tmp_path):
    proc = run("train.py", *TINY, f"--data_dir={data_dirs[0]}", f"--out_dir={tmp_path}", "--lr_schedule=wsd",
               "--cooldown=0", check=False)
    assert proc.returncode != 0 and "cooldown in (0, 1]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "last").exists()


def test_muon_split_orthogonalises_q_k_v_and_gate_up_apart():
    """With split, a fused matrix's update is its blocks' updates side by side: the same as Muon on the q, k
    and v (gate and up) matrices held separately; without it, one orthogonalisation of the whole."""
    from model import GPT, GPTConfig
    from training import Muon, make_muon_optimizer
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16, pos="rope",
                          norm="rmsnorm", mlp="swiglu"))
    attn, fc = model.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].mlp.c_fc.weight
    muon, _ = make_muon_optimizer(model, "cpu", 1e-2, 0.0, (0.9, 0.95), split=True).optimizers
    assert {(id(p), g["split"]) for g in muon.param_groups for p in g["params"] if p is attn or p is fc} == {
        (id(attn), 3), (id(fc), 2)}
    for fused, parts in ((attn, 3), (fc, 2)):
        start, grad = fused.detach().clone(), torch.randn_like(fused)
        pieces = [torch.nn.Parameter(p.clone()) for p in start.chunk(parts)]
        for piece, g in zip(pieces, grad.chunk(parts)):
            piece.grad = g.clone()
        Muon(pieces, 1e-2, 0.0).step()
        whole = torch.nn.Parameter(start.clone())
        whole.grad = grad.clone()
        Muon([whole], 1e-2, 0.0).step()
        split = torch.nn.Parameter(start.clone())
        split.grad = grad.clone()
        Muon([{"params": [split], "split": parts}], 1e-2, 0.0).step()
        torch.testing.assert_close(split.detach(), torch.cat([p.detach() for p in pieces]))
        assert not torch.allclose(whole.detach(), split.detach(), atol=1e-4)


def test_muon_lr_scales_muons_groups_through_the_schedule():
    from model import GPT, GPTConfig
    from training import make_muon_optimizer, set_lr
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16))
    optimizer = make_muon_optimizer(model, "cpu", 1e-3, 0.1, (0.9, 0.95), muon_lr=4e-3)
    muon, adamw = optimizer.optimizers
    assert {g["lr"] for g in muon.param_groups} == {4e-3} and {g["lr"] for g in adamw.param_groups} == {1e-3}
    set_lr(optimizer, 5e-4)  # the schedule's value for learning_rate: Muon keeps its ratio
    assert {g["lr"] for g in muon.param_groups} == {2e-3} and {g["lr"] for g in adamw.param_groups} == {5e-4}


def test_split_bits_per_byte_scores_every_token_once_as_one_window_at_a_time_does(data_dirs):
    """training.split_bits_per_byte puts several whole windows through the model at once: the same score as the
    plain reading, one window at a time, each window's first target predicted from the previous window's last
    token, the last (shorter) window included."""
    from data import TokenDataset
    from model import GPT, GPTConfig
    from training import bits_per_byte, split_bits_per_byte
    dataset = TokenDataset(data_dirs[0])
    tokens = torch.from_numpy(dataset.splits["val"].astype("int64"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=13, vocab_size=512)).eval()
    assert (len(tokens) - 1) % 13  # a shorter last window
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 13):
            x = tokens[start:start + 14]
            total += torch.nn.functional.cross_entropy(model(x[None, :-1])[0][0], x[1:], reduction="sum").item()
    expected = bits_per_byte(total / (len(tokens) - 1), dataset.meta["splits"]["val"])
    assert split_bits_per_byte(model, dataset) == pytest.approx(expected, rel=1e-6)
