"""
A run's files: checkpoints saved whole or not at all, loaded back with one loader (a pretrained model, a full
fine-tune, or a LoRA adapter on its base), every file checked on the way in, and the run's log with its loss
curve.

    from checkpoint import load_run
    model, tok, config = load_run("out/quickstart")                  # best/, or last/ when there is no best/
    model, tok, config = load_run("out/chat", "last")               # a LoRA run comes with its base model
    model, tok, config = load_run("out/quickstart", adapter="out/chat")   # a base plus another run's adapter

A checkpoint directory (out_dir/best, out_dir/last) holds config.json (the model, the tokenizer's hash, the
settings), model.safetensors -- or, for a LoRA run, adapter.safetensors -- and state.pt (the optimizer, the
iteration, each process's random state; read with weights_only: no pickle is run). A damaged or mismatched
file is one CheckpointError naming it and saying what to do; nothing on disk is touched when loading.
"""
import json
import os
import re
import shutil
import sys
import tempfile
import time

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from chat import add_chat_tokens
from files import (CheckpointError, atomic_path, atomic_write, file_sha256, remove_stale_writes, replace_directory,
                   writing)
from lora import add_lora, grow_vocab, load_adapter_tensors
from model import GPT, GPTConfig
from tokenizer import Tokenizer, special_tokens_path


# --- reading a checkpoint's files, each checked ------------------------------------------------------------

def first_line(error):
    """The first line of an exception's message (its type's name when it has none), at most 200 characters."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def damaged(path, reason):
    """The error for a file that cannot be read as what it should be: which file, why, what to do."""
    which = os.path.basename(os.path.dirname(os.path.abspath(path)))
    other = {"best": "last", "last": "best"}.get(which)
    advice = f"use --checkpoint={other} (or resume from it), or train again" if other else "train again"
    return CheckpointError(f"{path} is damaged ({reason}): {advice}")


def read_config(path):
    """The config.json of a checkpoint directory, as a dict."""
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint (no config.json): train one with train.py") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise damaged(config_path, f"not JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "tokenizer" not in config:
        raise damaged(config_path, "no model or tokenizer section")
    return config


def read_tensors(path, device="cpu"):
    """{name: tensor} of a safetensors file."""
    try:
        return load_file(path, device=str(device))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; train again") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise damaged(path, first_line(e)) from None


def load_weights(model, path):
    """Copy path (model.safetensors) into model: every tensor, each of the model's shape."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; train again")
    try:
        load_model(model, path)
    except (SafetensorError, OSError) as e:
        raise damaged(path, first_line(e)) from None
    except RuntimeError as e:  # names or shapes that are not the model's
        raise CheckpointError(f"{path} does not hold the weights of the model its config.json describes "
                              f"({first_line(e)}); train again") from None


def read_state(path):
    """state.pt: the optimizer, counters and random states, loaded without running any pickled code."""
    state_path = os.path.join(path, "state.pt")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{state_path} is missing: this checkpoint can be sampled from, not resumed") from None
    except Exception as e:  # a truncated zip (RuntimeError), a pickle with code in it (UnpicklingError), ...
        reason = "it holds Python objects beyond tensors, which are not loaded" if "Weights only" in str(e) \
            else first_line(e)
        raise damaged(state_path, reason) from None
    if not isinstance(state, dict) or "optimizer" not in state or "iter_num" not in state:
        raise damaged(state_path, "not a training state")
    return state


# --- saving -------------------------------------------------------------------------------------------------

def rng_state():
    """(CPU, CUDA) random-number generator states of this process."""
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0)


def checkpoint_dir(out_dir, kind):
    """out_dir/last or out_dir/best, or the copy left by a save that was interrupted mid-swap."""
    path = os.path.join(out_dir, kind)
    old = os.path.join(out_dir, f".{kind}.old")
    if not os.path.isdir(path) and os.path.isdir(old):
        return old
    return path


def save_checkpoint(out_dir, kind, model, optimizer, info, adapter=None):
    """Write out_dir/<kind>/ whole or not at all: into a temporary directory, then swapped in by renames.
    The model goes to model.safetensors; or, given an adapter (a dict of tensors: finetune.py's LoRA weights),
    only the adapter goes, to adapter.safetensors. optimizer None: a checkpoint to sample from, not to resume.
    A write that fails (a full disk) is one files.WriteError, and the checkpoint on disk stays as it was."""
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=f".{kind}.tmp")
    final = os.path.join(out_dir, kind)
    kept = (f"The {kind}/ checkpoint already there is kept as it was: free some space, then continue with "
            "--init_from=resume" if os.path.isdir(checkpoint_dir(out_dir, kind)) else
            "Free some space and run again")
    try:
        with writing(final, kept):
            write_checkpoint(tmp, model, optimizer, info, adapter)
        replace_directory(tmp, final)
    except BaseException:  # an error or a second Ctrl-C: no stray temporary checkpoint is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(tmp, model, optimizer, info, adapter):
    """save_checkpoint's files, into the directory tmp."""
    if adapter is None:
        save_model(model, os.path.join(tmp, "model.safetensors"))
    else:
        save_file(adapter, os.path.join(tmp, "adapter.safetensors"))
    ranks = info.get("rng_ranks") or [rng_state()]  # under DDP: every process's, each resumes from its own
    optimizer_state = info.get("optimizer_state") or (optimizer.state_dict() if optimizer is not None else {})
    torch.save({"optimizer": optimizer_state,
                "iter_num": info["iter_num"], "best_val_loss": info["best_val_loss"],
                "tokens_seen": info["tokens_seen"], "max_iters": info.get("max_iters"),
                "elapsed": info.get("elapsed"),
                "rng_cpu_ranks": [cpu for cpu, _ in ranks], "rng_cuda_ranks": [cuda for _, cuda in ranks],
                "scaler": info.get("scaler", {})},
               os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(info["config"], f, indent=1)


def seconds_to_save(out_dir, model, optimizer, info, adapter=None):
    """Seconds one save_checkpoint and the loss plot take in out_dir, what max_time counts for each
    checkpoint: saved into a temporary directory, removed after (one left by a crash goes at the next start)."""
    plot_loss_curve(out_dir)  # the first plot imports matplotlib: a cost paid once, not at each evaluation
    probe = tempfile.mkdtemp(dir=out_dir, prefix=".timing.tmp")
    timed = time.time()
    try:
        save_checkpoint(probe, "last", model, optimizer, info, adapter)
        plot_loss_curve(out_dir)
        return time.time() - timed
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def remove_stale_temporaries(out_dir):
    """Delete the temporary checkpoint directories (.last.tmp*) of a run killed mid-save (SIGKILL, power
    loss): save_checkpoint swaps a directory in only once it is whole, so they hold nothing to keep; and the
    temporary files of atomic writes (log.jsonl, the tokenizer) cut off the same way."""
    remove_stale_writes(out_dir)
    for name in os.listdir(out_dir):
        if re.fullmatch(r"\.\w+\.tmp\w+", name) and os.path.isdir(os.path.join(out_dir, name)):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


# --- resuming a run -----------------------------------------------------------------------------------------

def check_compatible(saved, current, path):
    """Refuse a checkpoint whose model shape or tokenizer differs from this run's."""
    diffs = [f"{k}: checkpoint {saved['model'].get(k)!r}, this run {v!r}"
             for k, v in current["model"].items() if saved["model"].get(k) != v and k not in ("dropout", "kernels")]
    if diffs:
        raise CheckpointError(f"the checkpoint in {path} is of another model:\n  " + "\n  ".join(diffs) +
                              "\nuse the settings it was trained with, or a new out_dir")
    if saved["tokenizer"]["content_hash"] != current["tokenizer"]["content_hash"]:
        raise CheckpointError(f"the checkpoint in {path} was trained with another tokenizer: "
                              f"{saved['tokenizer']['name']!r} (hash {saved['tokenizer']['content_hash'][:12]}), "
                              f"but this run's is {current['tokenizer']['name']!r} "
                              f"(hash {current['tokenizer']['content_hash'][:12]})")


def load_training_state(path, optimizer, scaler=None, rank=0, expand_optimizer_state=None):
    """Restore the optimizer, the float16 loss scale and process rank's RNG from path/state.pt (no pickle);
    return the state (iter_num, ...). A process the checkpoint has no RNG of (more processes than saved it)
    keeps its own seeded one. expand_optimizer_state: undoes a compacted optimizer state (finetune.py's)."""
    state = read_state(path)
    optimizer_state = state["optimizer"]
    if expand_optimizer_state is not None:
        optimizer_state = expand_optimizer_state(optimizer_state)
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise damaged(os.path.join(path, "state.pt"), f"its optimizer state does not fit this model: {e}") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    cpus, cudas = state.get("rng_cpu_ranks"), state.get("rng_cuda_ranks")
    if not cpus:  # a checkpoint from before per-process states: process 0's alone
        cpus, cudas = [state["rng_cpu"]], [state["rng_cuda"]]
    if rank >= len(cpus):
        return state
    rng_cpu, rng_cuda = cpus[rank], cudas[rank]
    torch.set_rng_state(rng_cpu)
    if torch.cuda.is_available() and rng_cuda.numel():
        torch.cuda.set_rng_state(rng_cuda)
    return state


def resume(path, model, optimizer, run_config, scaler=None, rank=0):
    """Load train.py's checkpoint at path into model and optimizer after checking it is of this run's model
    and tokenizer; returns the training state."""
    check_compatible(read_config(path), run_config, path)
    load_weights(model, os.path.join(path, "model.safetensors"))
    return load_training_state(path, optimizer, scaler, rank)


# --- the tokenizer a run was trained with -------------------------------------------------------------------

def tokenizer_info(meta):
    """What a checkpoint records of the data's tokenizer (meta.json): its name, hash and size."""
    return {"name": meta["tokenizer"], "content_hash": meta["tokenizer_hash"], "n_vocab": meta["n_vocab"]}


def copy_tokenizer(meta, data_dir, out_dir):
    """A trained vocabulary travels with the run (out_dir/tokenizer.tiktoken), so sample.py needs no data."""
    if not meta.get("tokenizer_file"):
        return
    source = os.path.join(data_dir, meta["tokenizer_file"])
    for src, name in ((source, "tokenizer.tiktoken"), (special_tokens_path(source), "tokenizer.special.json")):
        if os.path.isfile(src):
            with open(src, "rb") as f:
                atomic_write(os.path.join(out_dir, name), f.read())


def run_tokenizer(run_dir, info):
    """The tokenizer a run was trained with: GPT-2's, or the copy train.py left in the run directory."""
    if info["name"] == "gpt2":
        tok = Tokenizer.gpt2()
    else:
        path = os.path.join(run_dir, "tokenizer.tiktoken")
        if not os.path.isfile(path):
            raise CheckpointError(f"{run_dir} was trained with tokenizer {info['name']!r} but holds no "
                                  "tokenizer.tiktoken")
        tok = Tokenizer.load(path)
    if tok.content_hash != info["content_hash"]:
        raise CheckpointError(f"the tokenizer for {run_dir} does not match the one it was trained with")
    return tok


# --- loading a run for use: the one loader ------------------------------------------------------------------

def find_checkpoint(run_dir, which="best"):
    """The checkpoint directory run_dir/<which>, or run_dir/last when best/ is missing."""
    path = os.path.join(run_dir, which)
    if not os.path.isdir(path) and which == "best":
        path = os.path.join(run_dir, "last")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        present = sorted(d for d in os.listdir(run_dir) if os.path.isfile(os.path.join(run_dir, d, "config.json"))
                         ) if os.path.isdir(run_dir) else []
        if present:
            raise CheckpointError(f"no checkpoint {which!r} in {run_dir}; it has {', '.join(present)}")
        raise CheckpointError(f"no checkpoint in {run_dir}: train one with `python train.py ...` "
                              f"(looked for {config_path})")
    return path


def is_adapter(path):
    return os.path.isfile(os.path.join(path, "adapter.safetensors"))


def load_run(run_dir, which="best", device="cpu", adapter=""):
    """(model in eval mode, tokenizer, config dict) of run_dir/<which> (last/ when there is no best/): a
    pretrained or fully fine-tuned model, or a LoRA fine-tune with the base model its config.json names.
    adapter: a LoRA run (or its checkpoint directory) to put on run_dir's model instead."""
    path = find_checkpoint(run_dir, which)
    if adapter:
        return load_adapter(adapter, device, base_dir=run_dir, base_which=which)
    if is_adapter(path):
        return load_adapter(path, device)
    config = read_config(path)
    model = GPT(GPTConfig(**config["model"]))
    load_weights(model, os.path.join(path, "model.safetensors"))
    tok = run_tokenizer(run_dir, config["tokenizer"])
    if tok.n_vocab > model.config.vocab_size:
        raise CheckpointError(f"tokenizer has {tok.n_vocab} tokens but the model only {model.config.vocab_size}")
    return model.to(device).eval(), tok, config


def base_weights_hash(run_dir, which):
    """sha256 of a whole model's weights file, which a LoRA fine-tune of it records; an adapter is refused."""
    path = find_checkpoint(run_dir, which)
    if is_adapter(path):
        raise CheckpointError(f"{path} holds a LoRA adapter, not a whole model: merge it first "
                              f"(python finetune.py --out_dir={run_dir} --merge) and fine-tune {run_dir}/merged")
    return file_sha256(os.path.join(path, "model.safetensors"))


def load_adapter(path, device="cpu", base_dir=None, base_which=None):
    """(model with its adapter, in eval mode; chat tokenizer; config) from a LoRA checkpoint directory (or a
    run directory: its best/) and the base model it was trained on: base_dir/base_which, or the run its
    config.json records. Refuses a base whose weights or tokenizer differ from those the adapter was
    trained on."""
    if not is_adapter(path):
        path = find_checkpoint(path, "best")
    if not is_adapter(path):
        raise CheckpointError(f"{path} holds no adapter.safetensors: it is not a LoRA fine-tune of finetune.py")
    config = read_config(path)
    base = config["finetune"]["base"]
    base_dir, base_which = base_dir or base["run_dir"], base_which or base["checkpoint"]
    model_hash = base_weights_hash(base_dir, base_which)
    model, base_tok, _ = load_run(base_dir, base_which, device)
    if model_hash != base["model_hash"] or base_tok.content_hash != base["tokenizer_hash"]:
        what = "weights" if model_hash != base["model_hash"] else "tokenizer"
        raise CheckpointError(f"the adapter in {path} was trained on another base model: the {what} of "
                              f"{find_checkpoint(base_dir, base_which)} differ from those it was trained on "
                              f"({base['run_dir']}/{base['checkpoint']}, model sha256 {base['model_hash'][:12]}, "
                              f"tokenizer {base['tokenizer_hash'][:12]}); use that base, or fine-tune again")
    tok = add_chat_tokens(base_tok)
    if tok.content_hash != config["tokenizer"]["content_hash"]:
        raise CheckpointError(f"the chat tokenizer rebuilt for {path} differs from the one it was trained with")
    n_base = grow_vocab(model, tok.n_vocab)
    lora = config["finetune"]["lora"]
    add_lora(model, lora["targets"], lora["r"], lora["alpha"], 0.0)
    load_adapter_tensors(model, read_tensors(os.path.join(path, "adapter.safetensors"), device), n_base)
    return model.to(device).eval(), tok, config


# --- the run's log and its loss curve ------------------------------------------------------------------------

def append_log(out_dir, record):
    """One line more in out_dir/log.jsonl (a line a full disk cuts short is skipped when read back)."""
    path = os.path.join(out_dir, "log.jsonl")
    with writing(path, "The records before this one are kept: free some space, then continue with "
                       "--init_from=resume"), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(out_dir):
    """The records of out_dir/log.jsonl; a line cut short (a crash, a full disk) is skipped with a warning."""
    path = os.path.join(out_dir, "log.jsonl")
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"warning: {path}:{lineno} is not a log record; skipped", file=sys.stderr)
    return records


def truncate_log(out_dir, resumed_iter, evaluates_again=True):
    """On resume, drop the log records of iterations the checkpoint had not reached, and the evaluation at
    resumed_iter itself when the resumed run makes it again (so the curve gets no doubled point).
    resumed_iter 0: a run starting afresh, whose log starts empty."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return
    kept = [r for r in read_log(out_dir) if r["iter"] < resumed_iter or
            (r["iter"] == resumed_iter and not (evaluates_again and "val_loss" in r))]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def plot_loss_curve(out_dir):
    """out_dir/loss.png: train and val loss against tokens seen, from log.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_log(out_dir)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["tokens"] for r in steps], [r["loss"] for r in steps], alpha=0.4, label="train (per step)")
    ax.plot([r["tokens"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
    ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(os.path.basename(os.path.normpath(out_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(os.path.join(out_dir, "loss.png")) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
