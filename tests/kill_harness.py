"""
Kill at any moment: SIGKILL prepare.py, train.py and finetune.py at random moments -- many of them in the middle
of a checkpoint or token-file write -- resume each time, and check that every best/ and last/ on disk loads
after every kill, that the resumed run ends with the very weights (or token files) of an uninterrupted one, and
that no temporary file or directory is left behind.

    python tests/kill_harness.py --script=train --kills=100 --seed=0
    python tests/kill_harness.py --script=all --kills=50            # prepare, train and finetune in turn

Each script gets a tiny set-up in a temporary directory (300 bundled stories, a 512-token vocabulary, a 2-layer
32-wide model that checkpoints every 4 iterations) and one uninterrupted reference run. Then rounds: a fresh
output directory, the script started (train.py and finetune.py with --init_from=auto, so a run killed before
its first checkpoint starts afresh; prepare.py with the same arguments) and killed, again and again, until a
start runs to its end; its outputs are then compared with the reference's. After every kill, each best/ and
last/ must load (prepare.py: a meta.json present means complete token files equal to the reference's), and
the run must still have a checkpoint to resume from if it had one before. Three kinds of kill:
  timer  SIGKILL from here after a uniform random delay within the reference run's duration;
  poll   SIGKILL from here as soon as the output directory shows its k-th new temporary name (.last.tmp*, ...);
  step   the script SIGKILLs itself just before or just after the k-th call of one file operation
         (os.replace, os.rename, shutil.rmtree, tempfile.mkdtemp, torch.save, safetensors' save, os.fsync, ...),
         picked at random from those the reference run made: the moments between two renames of one swap.
The scripts run under this file's `child` launcher, which counts and names those calls; it changes nothing else.
A kill "landed during a write" when it left a temporary behind (a .tmp name, a .old directory, prepare.py's
state file). tests/test_kill.py runs a few planned kills per script; the exit status is 1 when anything failed.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from stories import stories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("prepare", "train", "finetune")
TEMPORARY = re.compile(r"\.tmp|\.old$|^\.prepare_state\.json$")  # names that only an unfinished write leaves
TRAIN = ["--device=cpu", "--num_threads=1", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64",
         "--batch_size=8", "--eval_iters=2", "--log_interval=1", "--warmup_iters=5", "--learning_rate=3e-3",
         "--max_iters=24", "--eval_interval=4", "--init_from=auto"]
FINETUNE = ["--device=cpu", "--num_threads=1", "--batch_size=8", "--eval_iters=2", "--log_interval=1",
            "--warmup_iters=2", "--learning_rate=1e-2", "--lora_r=4", "--max_iters=16", "--eval_interval=4",
            "--eval_instructions=0", "--init_from=auto"]


# --- the child: a script run with its file operations counted, and SIGKILLed at one of them ------------------

def label(when, name, args, kwargs):
    """'before os.rename last .last.old': the call, with the random parts of temporary names starred."""
    parts = [str(a) for a in args if isinstance(a, (str, os.PathLike))] + [str(kwargs.get("prefix", ""))]
    names = [re.sub(r"\.[a-z0-9_]{8}\.tmp$", ".*.tmp", re.sub(r"tmp[a-z0-9_]{8}$", "tmp*", os.path.basename(p)))
             for p in parts if p]
    return " ".join([when, name, *names])


def child(kill_at, trace, script, args):
    """Run script as __main__ with args; kill_at "LABEL@K" SIGKILLs it at the K-th event whose label starts with
    LABEL ("" and K=0: never). Every event's label is appended to trace."""
    import runpy

    import safetensors.torch
    import torch
    wanted, k = kill_at.rsplit("@", 1)
    k, seen = int(k), [0]
    log = open(trace, "a")

    def event(text):
        log.write(text + "\n")
        log.flush()
        if k and text.startswith(wanted):
            seen[0] += 1
            if seen[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)

    def watch(module, name, shown):
        real = getattr(module, name)

        def watched(*a, **kw):
            event(label("before", shown, a, kw))
            result = real(*a, **kw)
            event(label("after", shown, a, kw))
            return result
        setattr(module, name, watched)

    for module, names, prefix in ((os, ("replace", "rename", "remove", "unlink", "fsync"), "os"),
                                  (shutil, ("rmtree",), "shutil"), (tempfile, ("mkdtemp", "mkstemp"), "tempfile"),
                                  (torch, ("save",), "torch"), (json, ("dump",), "json"),
                                  (safetensors.torch, ("save_file", "save_model"), "safetensors")):
        for name in names:
            watch(module, name, f"{prefix}.{name}")
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


# --- the set-up and the scripts' command lines -----------------------------------------------------------------

def make_setup(work):
    """The inputs every script needs, in work: stories.txt, and chat.jsonl / chat_val.jsonl (short
    continue-the-story conversations that fit a 64-token context)."""
    with open(os.path.join(work, "stories.txt"), "w", encoding="utf-8") as f:
        f.write("<|endoftext|>\n".join(stories(0, 300)))
    for name, first in (("chat", 300), ("chat_val", 500)):
        with open(os.path.join(work, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for story in stories(first, 200):
                words = story.split()
                if len(words) >= 11:
                    f.write(json.dumps({"prompt": "Continue: " + " ".join(words[:5]),
                                        "response": " ".join(words[5:11])}) + "\n")


def command(name, work, out):
    """(script path, its arguments, the directory it writes) for a run of name into out."""
    if name == "prepare":
        return os.path.join(ROOT, "prepare.py"), [f"--input={work}/stories.txt", "--vocab_size=512",
                                                  f"--out_dir={out}", "--name=data"], os.path.join(out, "data")
    if name == "train":
        return os.path.join(ROOT, "train.py"), [*TRAIN, f"--data_dir={work}/reference/prepare/data",
                                                f"--out_dir={out}"], out
    return os.path.join(ROOT, "finetune.py"), [*FINETUNE, f"--base_dir={work}/reference/train",
                                               f"--data={work}/chat.jsonl", f"--val_data={work}/chat_val.jsonl",
                                               f"--out_dir={out}"], out


def start(name, work, out, kill_at="@0"):
    """The script running under the child launcher; its events go to out.trace, its output to out.log."""
    script, args, _ = command(name, work, out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".log", "ab") as log:
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), "child", kill_at, out + ".trace",
                                 script, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def reference(name, work):
    """Run name once uninterrupted into work/reference/<name>; return (seconds it took, its event labels)."""
    out = os.path.join(work, "reference", name)
    if os.path.isfile(out + ".json"):  # run already, for a script that builds on it
        with open(out + ".json") as f:
            return tuple(json.load(f))
    started = time.monotonic()
    proc = start(name, work, out)
    if proc.wait() != 0:
        raise RuntimeError(f"the reference {name} run failed:\n{open(out + '.log').read()[-3000:]}")
    with open(out + ".trace") as f:
        result = time.monotonic() - started, f.read().splitlines()
    with open(out + ".json", "w") as f:
        json.dump(result, f)
    return result


# --- what must hold after every kill, and at the end ---------------------------------------------------------

def temporaries(directory):
    """Relative paths of the temporaries under directory."""
    found = []
    for parent, dirs, files in os.walk(directory):
        for entry in dirs + files:
            if TEMPORARY.search(entry):
                found.append(os.path.relpath(os.path.join(parent, entry), directory))
    return sorted(found)


def check_checkpoints(out):
    """Every best/ and last/ in out loads with load_run, and its state.pt with read_state; so does the
    .<kind>.old a swap may leave while <kind>/ is missing. Returns the problems found."""
    from checkpoint import load_run, read_config, read_state, read_tensors
    problems = []
    for kind in ("best", "last"):
        path, old = os.path.join(out, kind), os.path.join(out, f".{kind}.old")
        try:
            if os.path.isdir(path):
                load_run(out, kind)
                read_state(path)
            elif os.path.isdir(old):  # what checkpoint_dir resumes from
                read_config(old)
                read_state(old)
                weights = "adapter" if os.path.isfile(os.path.join(old, "adapter.safetensors")) else "model"
                read_tensors(os.path.join(old, f"{weights}.safetensors"))
        except Exception as e:  # noqa: BLE001 -- any failure to load is what this looks for
            problems.append(f"{kind}: {type(e).__name__}: {e}")
    return problems


def check_token_files(data, ref_data):
    """With meta.json present the directory is complete: it loads (data.py's checks) and equals the reference."""
    if not os.path.isfile(os.path.join(data, "meta.json")):
        return []
    from data import TokenDataset
    try:
        TokenDataset(data).load_tokenizer()
    except Exception as e:  # noqa: BLE001
        return [f"token files: {type(e).__name__}: {e}"]
    return compare_files(data, ref_data, skip_temporaries=True)


def files_under(directory, skip_temporaries=False):
    return sorted(os.path.relpath(os.path.join(p, f), directory) for p, _, fs in os.walk(directory) for f in fs
                  if not (skip_temporaries and TEMPORARY.search(os.path.relpath(os.path.join(p, f), directory))))


def compare_files(directory, ref, skip_temporaries=False):
    """Byte-for-byte: the same files, with the same bytes."""
    names, ref_names = files_under(directory, skip_temporaries), files_under(ref)
    if names != ref_names:
        return [f"files differ from the reference's: {sorted(set(names) ^ set(ref_names))}"]
    return [f"{n} differs from the reference's" for n in names
            if open(os.path.join(directory, n), "rb").read() != open(os.path.join(ref, n), "rb").read()]


def tensors_differ(a, b, where):
    import torch
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys"]
        return [d for key in a for d in tensors_differ(a[key], b[key], f"{where}.{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tensors_differ(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def compare_runs(out, ref):
    """best/ and last/: every weight tensor equal (torch.equal), the optimizer state and counters too; the
    same files as the reference run's (log.jsonl and loss.png hold timings, so only their names count)."""
    import torch
    from checkpoint import read_tensors
    problems = []
    if files_under(out) != files_under(ref):
        problems.append(f"files differ from the reference's: {sorted(set(files_under(out)) ^ set(files_under(ref)))}")
    for kind in ("best", "last"):
        for weights in ("model.safetensors", "adapter.safetensors"):
            path, ref_path = os.path.join(out, kind, weights), os.path.join(ref, kind, weights)
            if os.path.isfile(ref_path) and os.path.isfile(path):
                problems += [f"{kind}/{weights}: {d}" for d in
                             tensors_differ(read_tensors(path), read_tensors(ref_path), "weights")]
        path, ref_path = os.path.join(out, kind, "state.pt"), os.path.join(ref, kind, "state.pt")
        if os.path.isfile(path) and os.path.isfile(ref_path):
            state, ref_state = (torch.load(p, map_location="cpu", weights_only=True) for p in (path, ref_path))
            keys = ("optimizer", "iter_num", "best_val_loss", "tokens_seen", "max_iters")
            problems += [f"{kind}/state.pt: {d}" for d in
                         tensors_differ({k: state[k] for k in keys}, {k: ref_state[k] for k in keys}, "state")]
    return problems


# --- the kill loop ----------------------------------------------------------------------------------------------

def wait_or_kill(proc, kind, rng, out_dir, seconds, k):
    """Let proc run, then SIGKILL it (timer: after seconds; poll: at the k-th new temporary name in out_dir;
    step: it kills itself). Returns its exit status."""
    if kind == "step":
        return proc.wait()
    deadline, seen = time.monotonic() + seconds, set()
    while proc.poll() is None:
        if kind == "timer" and time.monotonic() >= deadline:
            break
        if kind == "poll":
            try:
                seen |= set(temporaries(out_dir))
            except OSError:  # a directory renamed under os.walk
                pass
            if len(seen) >= k:
                break
        time.sleep(0.002 if kind == "poll" else 0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def run_script(name, work, kills, rng, plan=None, max_kills_per_round=25, say=print):
    """Kill name kills times (plan: the kinds to use in order, else random), resuming each time; returns the
    tally, with its "failures" (empty when everything held)."""
    seconds, events = reference(name, work)
    ref_dir = command(name, work, os.path.join(work, "reference", name))[2]
    tally = {"script": name, "kills": 0, "during_write": 0, "resumes": 0, "rounds": 0, "checks": 0,
             "by_kind": {"timer": 0, "poll": 0, "step": 0}, "failures": []}
    while tally["kills"] < kills and not tally["failures"]:
        if tally["rounds"] >= 2 * kills + 5:
            tally["failures"].append(f"{name}: only {tally['kills']} kills in {tally['rounds']} rounds")
            break
        tally["rounds"] += 1
        out = os.path.join(work, f"{name}_round{tally['rounds']}")
        written = command(name, work, out)[2]
        for stale in (out, out + ".log", out + ".trace"):  # of an earlier call's round
            shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else \
                os.path.exists(stale) and os.remove(stale)
        in_round, resumable = 0, False
        while True:
            kind = None
            if tally["kills"] < kills and in_round < max_kills_per_round:
                kind = plan[tally["kills"]] if plan else rng.choice(("timer", "timer", "poll", "step", "step"))
            kill_at, where = "@0", ""
            if kind == "step" or (isinstance(kind, tuple) and kind[0] == "step"):
                event = kind[1] if isinstance(kind, tuple) else rng.choice(events)
                k = kind[2] if isinstance(kind, tuple) else rng.randint(1, max(1, events.count(event)))
                kill_at, where, kind = f"{event}@{k}", f" at {event!r} #{k}", "step"
            proc = start(name, work, out, kill_at)
            status = wait_or_kill(proc, kind, rng, written, rng.uniform(0, seconds), rng.randint(1, 6))
            if status == 0 and plan and kind == "step":
                tally["failures"].append(f"{name}: the planned kill{where} never came: the run finished first")
            if status == 0:
                break
            if status != -signal.SIGKILL:
                tally["failures"].append(f"{name}: a start after {tally['kills']} kills exited with {status}:\n"
                                         + open(out + ".log").read()[-2000:])
                break
            tally["kills"] += 1
            in_round += 1
            tally["by_kind"][kind] += 1
            left = temporaries(written) if os.path.isdir(written) else []
            tally["during_write"] += bool(left)
            problems = check_token_files(written, ref_dir) if name == "prepare" else check_checkpoints(written)
            if name != "prepare":  # a checkpoint once written is never lost: the run goes on from one
                from checkpoint import checkpoint_dir
                was_resumable, resumable = resumable, os.path.isfile(
                    os.path.join(checkpoint_dir(written, "last"), "state.pt"))
                if was_resumable and not resumable:
                    problems.append("no checkpoint to resume from is left: the run starts again from scratch")
            tally["checks"] += 1
            tally["failures"] += [f"{name} kill {tally['kills']} ({kind}{where}; left {left}): {p}" for p in problems]
            say(f"{name}: kill {tally['kills']} ({kind}{where}){' during a write: ' + str(left) if left else ''}")
        if tally["failures"]:
            break
        problems = compare_files(written, ref_dir) if name == "prepare" else compare_runs(written, ref_dir)
        with open(out + ".log", errors="replace") as f:
            tally["resumes"] += sum(line.count("resuming") for line in f)
        left = temporaries(written)
        problems += [f"temporaries left at the end: {left}"] if left else []
        tally["failures"] += [f"{name} round {tally['rounds']} end: {p}" for p in problems]
        say(f"{name}: round {tally['rounds']} finished after {in_round} kills: "
            f"{'identical to the reference' if not problems else 'MISMATCH'}")
        if not problems:
            shutil.rmtree(written, ignore_errors=True)
    return tally


def setup_references(work, names):
    """The inputs, and the reference runs the scripts build on (finetune.py needs train.py's, which needs
    prepare.py's)."""
    make_setup(work)
    needed = {"prepare": [], "train": ["prepare"], "finetune": ["prepare", "train"]}
    for name in sorted({n for s in names for n in needed[s]}, key=SCRIPTS.index):
        reference(name, work)


def summary(tally):
    kinds = ", ".join(f"{k} {v}" for k, v in tally["by_kind"].items())
    return (f"{tally['script']}: {tally['kills']} kills ({kinds}), {tally['during_write']} during a write, "
            f"{tally['resumes']} resumed from what a kill left, {tally['rounds']} rounds, "
            f"{tally['checks']} checks after a kill, "
            f"{len(tally['failures'])} failures")


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["child"]:
        return child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--script", choices=[*SCRIPTS, "all"], default="all")
    p.add_argument("--kills", type=int, default=50, help="kills per script (default 50)")
    p.add_argument("--seed", type=int, default=0, help="of the kinds, delays and steps of the kills (default 0)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (its path is printed)")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    names = SCRIPTS if args.script == "all" else (args.script,)
    work = tempfile.mkdtemp(prefix="kill_harness_")
    print(f"working in {work}")
    tallies = []
    try:
        setup_references(work, names)
        for i, name in enumerate(names):
            tallies.append(run_script(name, work, args.kills, random.Random(args.seed * 1000 + i)))
            for failure in tallies[-1]["failures"]:
                print(f"FAILED {failure}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(summary(t) for t in tallies))
    mismatches = sum(len(t["failures"]) for t in tallies)
    print(f"mismatches and failures: {mismatches}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
