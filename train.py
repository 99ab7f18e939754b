"""
Pretrain a GPT with next-token cross-entropy: on CPU, one GPU, or several GPUs with torchrun (DDP).

    python train.py config/quickstart.py                          # CPU, the bundled corpus, minutes
    python train.py config/tinystories.py                         # one GPU
    torchrun --standalone --nproc_per_node=4 train.py config/tinystories.py
    python train.py config/quickstart.py --init_from=resume       # continue an interrupted run

Settings are the globals below; config files and --key=value override them (configurator.py).
out_dir receives: last/ and best/ checkpoints (model.safetensors, state.pt, config.json), log.jsonl,
loss.png, and a copy of the tokenizer when it is not GPT-2's. Ctrl-C saves last/ before exiting.
"""
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_file, save_model

from configurator import ConfigError, configure, require_at_least, settings_of
from data import TokenDataset
from model import GPT, GPTConfig
from tokenizer import atomic_write, replace_directory, special_tokens_path

# --- settings -------------------------------------------------------------------------------------------
# I/O
out_dir = "out/quickstart"  # where checkpoints, the log and the loss curve go
data_dir = "data/bundled"  # written by prepare.py
init_from = "scratch"  # "scratch", "resume" (from out_dir/last) or "auto" (resume if there is a checkpoint)
eval_interval = 200  # iterations between evaluations (and checkpoints)
eval_iters = 20  # batches per evaluation, per split
log_interval = 10  # iterations between log lines
eval_only = False  # evaluate once and exit
# data
batch_size = 16  # sequences per micro-batch
block_size = 256  # tokens per sequence
gradient_accumulation_steps = 1  # micro-batches per optimizer step, summed over all processes
# model (vocab_size comes from the data)
n_layer = 4  # transformer blocks
n_head = 4  # attention heads per block (n_embd must divide by it)
n_embd = 128  # width of the residual stream
dropout = 0.0  # on attention and residual outputs while training
bias = False  # biases in the linear layers and norms
pos = "learned"  # "learned" or "rope"
norm = "layernorm"  # "layernorm" or "rmsnorm"
mlp = "gelu"  # "gelu" or "swiglu"
tie_embeddings = True  # the output head shares the token embedding matrix
# AdamW
learning_rate = 1e-3  # peak, after warmup
max_iters = 2000  # optimizer steps in all
weight_decay = 0.1  # on matrices only, not on norms, biases or embeddings
beta1 = 0.9  # AdamW's momentum
beta2 = 0.95  # AdamW's second-moment decay
grad_clip = 1.0  # clip the gradient norm to this; 0 disables
# learning rate schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters
decay_lr = True  # False: a constant learning_rate
warmup_iters = 100  # iterations of linear warmup from 0
lr_decay_iters = 0  # 0: max_iters
min_lr = 1e-4  # the learning rate at the end of the decay
# system
device = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps"
dtype = "auto"  # "auto" (bfloat16 on CUDA when supported, else float32), "float32", "bfloat16", "float16"
compile = False  # torch.compile the model (falls back to eager, with a warning, where it cannot)
kernels = "auto"  # attention and loss as our Triton kernels: "auto" (on CUDA), "triton" or "torch"
num_threads = 0  # CPU threads for torch; 0: all cores (shared between processes under torchrun)
seed = 1337  # of the initial weights and of every batch drawn
peak_flops = 0.0  # the accelerator's peak FLOP/s for MFU; 0: look it up for known GPUs
# --------------------------------------------------------------------------------------------------------


class TrainError(RuntimeError):
    pass


def setup_distributed():
    """(ddp, rank, local_rank, world_size): torchrun sets RANK, LOCAL_RANK and WORLD_SIZE."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, 0, 0, 1
    backend = "nccl" if torch.cuda.is_available() and device in ("auto",) or device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    return True, dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()


def pick_device(requested, ddp, local_rank):
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    if requested == "cuda" and ddp:
        requested = f"cuda:{local_rank}"
    if requested.startswith("cuda"):
        torch.cuda.set_device(requested)
    return requested


def pick_dtype(requested, device_type):
    if requested == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float32"
    if requested not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={requested!r}: choose auto, float32, bfloat16 or float16")
    return requested


def batch_seed(seed, split, iteration, micro_step):
    """The seed of one micro-batch. Batches depend only on (seed, split, iteration, micro-batch index), so a
    resumed run draws the same data, and N processes draw together what one process draws alone."""
    key = f"{seed}/{split}/{iteration}/{micro_step}".encode()  # not hash(): str hashes vary per process
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def get_lr(it, max_lr, min_lr, warmup_iters, decay_iters, decay=True):
    """Linear warmup to max_lr over warmup_iters, then cosine decay to min_lr at decay_iters; max_lr
    throughout when not decay."""
    if not decay:
        return max_lr
    if it < warmup_iters:
        return max_lr * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def make_optimizer(params, device_type, learning_rate, weight_decay, betas, no_decay=()):
    """AdamW over the params that require grad; weight decay on matrices (embeddings, linear weights), none
    on biases, norm gains and the params in no_decay."""
    params = [p for p in params if p.requires_grad]
    exempt = {id(p) for p in no_decay}
    groups = [{"params": [p for p in params if p.dim() >= 2 and id(p) not in exempt], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2 or id(p) in exempt], "weight_decay": 0.0}]
    extra = {"fused": True} if device_type in ("cuda", "cpu") else {}  # on CPU fused is ~5x the default
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)


def known_peak_flops(device_type, dtype_name):
    if peak_flops:
        return peak_flops
    if device_type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name()
    table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
    for key, flops in table.items():
        if key in name:
            return flops if dtype_name != "float32" else flops / 2
    return 0.0


def tokenizer_info(meta):
    return {"name": meta["tokenizer"], "content_hash": meta["tokenizer_hash"], "n_vocab": meta["n_vocab"]}


def copy_tokenizer(meta, data_dir, out_dir):
    """A trained vocabulary travels with the run (out_dir/tokenizer.tiktoken), so sample.py needs no data."""
    if not meta.get("tokenizer_file"):
        return
    source = os.path.join(data_dir, meta["tokenizer_file"])
    for src, name in ((source, "tokenizer.tiktoken"), (special_tokens_path(source), "tokenizer.special.json")):
        if os.path.isfile(src):
            atomic_write(os.path.join(out_dir, name), open(src, "rb").read())


def bits_per_byte(loss, split_meta):
    """Loss in bits per byte of text: nats/token * tokens/byte / ln 2, comparable across vocabularies."""
    return loss / math.log(2) * split_meta["tokens"] / split_meta["bytes"]


# --- checkpoints ----------------------------------------------------------------------------------------

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
    only the adapter goes, to adapter.safetensors. optimizer None: a checkpoint to sample from, not to resume."""
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=f".{kind}.tmp")
    try:
        if adapter is None:
            save_model(model, os.path.join(tmp, "model.safetensors"))
        else:
            save_file(adapter, os.path.join(tmp, "adapter.safetensors"))
        ranks = info.get("rng_ranks") or [rng_state()]  # under DDP: every process's, each resumes from its own
        optimizer_state = info.get("optimizer_state") or (optimizer.state_dict() if optimizer is not None else {})
        torch.save({"optimizer": optimizer_state,
                    "iter_num": info["iter_num"], "best_val_loss": info["best_val_loss"],
                    "tokens_seen": info["tokens_seen"],
                    "rng_cpu_ranks": [cpu for cpu, _ in ranks], "rng_cuda_ranks": [cuda for _, cuda in ranks],
                    "scaler": info.get("scaler", {})},
                   os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(info["config"], f, indent=1)
        replace_directory(tmp, os.path.join(out_dir, kind))
    except BaseException:  # an error or a second Ctrl-C: no stray temporary checkpoint is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(out_dir):
    """Delete the temporary checkpoint directories (.last.tmp*) of a run killed mid-save (SIGKILL, power
    loss): save_checkpoint swaps a directory in only once it is whole, so they hold nothing to keep."""
    for name in os.listdir(out_dir):
        if re.fullmatch(r"\.\w+\.tmp\w+", name) and os.path.isdir(os.path.join(out_dir, name)):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def check_compatible(saved, current, path):
    """Refuse a checkpoint whose model shape or tokenizer differs from this run's."""
    diffs = [f"{k}: checkpoint {saved['model'].get(k)!r}, this run {v!r}"
             for k, v in current["model"].items() if saved["model"].get(k) != v and k not in ("dropout", "kernels")]
    if diffs:
        raise TrainError(f"the checkpoint in {path} is of another model:\n  " + "\n  ".join(diffs) +
                         "\nuse the settings it was trained with, or a new out_dir")
    if saved["tokenizer"]["content_hash"] != current["tokenizer"]["content_hash"]:
        raise TrainError(f"the checkpoint in {path} was trained with another tokenizer: "
                         f"{saved['tokenizer']['name']!r} (hash {saved['tokenizer']['content_hash'][:12]}), but "
                         f"this run's is {current['tokenizer']['name']!r} "
                         f"(hash {current['tokenizer']['content_hash'][:12]})")


def load_checkpoint(path, model, optimizer, run_config, scaler=None, rank=0):
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    check_compatible(saved, run_config, path)
    load_model(model, os.path.join(path, "model.safetensors"))
    return load_training_state(path, optimizer, scaler, rank)


def rng_state():
    """(CPU, CUDA) random-number generator states of this process."""
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0)


def load_training_state(path, optimizer, scaler=None, rank=0, expand_optimizer_state=None):
    """Restore the optimizer, the float16 loss scale and process rank's RNG from path/state.pt (no pickle);
    return the state (iter_num, ...). A process the checkpoint has no RNG of (more processes than saved it)
    keeps its own seeded one. expand_optimizer_state: undoes a compacted optimizer state (finetune.py's)."""
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    optimizer_state = state["optimizer"]
    if expand_optimizer_state is not None:
        optimizer_state = expand_optimizer_state(optimizer_state)
    optimizer.load_state_dict(optimizer_state)
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


# --- logging --------------------------------------------------------------------------------------------

def append_log(out_dir, record):
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
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
    tmp = os.path.join(out_dir, ".loss.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, os.path.join(out_dir, "loss.png"))


# --- training -------------------------------------------------------------------------------------------

def catch_stop_signals():
    """From now on SIGINT (Ctrl-C) and SIGTERM are noted in the returned list instead of stopping the process,
    so that the loop can save a checkpoint first; a second one stops at once."""
    stop_signal = []

    def request_stop(signum, frame):
        stop_signal.append(signum)
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return stop_signal


def release_stop_signals():
    """After the training loop there is no checkpoint to save first: Ctrl-C and SIGTERM stop at once again."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def compile_or_eager(model, x, y, autocast):
    """torch.compile(model), tried at once on one batch, forward and backward (compiling happens at the first
    call); where it cannot run here (no C++ compiler, an unsupported platform), the model itself, with one
    warning. The trial leaves no gradients behind and consumes no random numbers."""
    dynamo = importlib.import_module("torch._dynamo")
    dynamo.config.suppress_errors = False  # the trial's errors come here, not to dynamo's own log
    compiled = torch.compile(model)
    rng_cpu = torch.get_rng_state()
    rng_cuda = torch.cuda.get_rng_state() if x.is_cuda else None
    try:
        with autocast:
            _, loss = compiled(x, y)
        loss.backward()
    except Exception as e:  # compilers fail in many ways, with errors of many types
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"warning: torch.compile cannot run here ({type(e).__name__}: {reason}); training without it",
              file=sys.stderr)
        dynamo.reset()
        compiled = model
    else:
        dynamo.config.suppress_errors = True  # a graph that fails later runs eagerly instead of ending the run
    finally:
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng_cpu)
        if rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda)
    return compiled


def micro_steps_per_process(accumulation, batch, world_size) -> int:
    """Each process's share of an optimizer step's micro-batches; an error with the flags to add when they do
    not share out evenly (the CPU configs accumulate 1 micro-batch: under torchrun, 2 processes need 2)."""
    if accumulation % world_size == 0:
        return accumulation // world_size
    fitted = math.ceil(accumulation / world_size) * world_size
    flags = f"--gradient_accumulation_steps={fitted}"
    if batch * accumulation % fitted == 0:  # the same sequences per step
        flags += f" --batch_size={batch * accumulation // fitted}"
    raise ConfigError(f"gradient_accumulation_steps={accumulation} must be a multiple of the number of processes "
                      f"({world_size}), which share each step's micro-batches: add {flags}")


def main():
    ddp, rank, local_rank, world_size = setup_distributed()
    master = rank == 0
    dev = pick_device(device, ddp, local_rank)
    device_type = "cuda" if dev.startswith("cuda") else dev
    dtype_name = pick_dtype(dtype, device_type)
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    elif ddp and device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    torch.manual_seed(seed + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    require_at_least(1, batch_size=batch_size, block_size=block_size, eval_interval=eval_interval,
                     eval_iters=eval_iters, log_interval=log_interval,
                     gradient_accumulation_steps=gradient_accumulation_steps)
    require_at_least(0, max_iters=max_iters, warmup_iters=warmup_iters, lr_decay_iters=lr_decay_iters)
    micro_steps = micro_steps_per_process(gradient_accumulation_steps, batch_size, world_size)
    if init_from not in ("scratch", "resume", "auto"):
        raise ConfigError(f"init_from={init_from!r}: choose scratch, resume or auto")

    dataset = TokenDataset(data_dir)
    meta = dataset.meta
    model_config = GPTConfig(block_size=block_size, vocab_size=meta["n_vocab"], n_layer=n_layer, n_head=n_head,
                             n_embd=n_embd, dropout=dropout, bias=bias, pos=pos, norm=norm, mlp=mlp,
                             tie_embeddings=tie_embeddings, kernels=kernels)
    run_config = {"model": model_config.to_dict(), "tokenizer": tokenizer_info(meta),
                  "train": settings_of(globals())}
    model = GPT(model_config).to(dev)
    optimizer = make_optimizer(model.parameters(), device_type, learning_rate, weight_decay, (beta1, beta2))

    iter_num, best_val_loss, tokens_seen = 0, float("inf"), 0
    last = checkpoint_dir(out_dir, "last")
    has_checkpoint = os.path.isfile(os.path.join(last, "state.pt"))
    if init_from == "resume" and not has_checkpoint:
        raise TrainError(f"no checkpoint to resume in {out_dir}: train with --init_from=scratch first")
    if init_from == "scratch" and has_checkpoint and not eval_only:
        raise TrainError(f"{out_dir} already holds a run: continue it with --init_from=resume, "
                         "or pick another --out_dir (nothing was overwritten)")
    if eval_only and not has_checkpoint:
        raise TrainError(f"no checkpoint in {out_dir} to evaluate: train first")
    scaler = torch.amp.GradScaler(device_type, enabled=dtype_name == "float16")
    if has_checkpoint and (init_from in ("resume", "auto") or eval_only):
        state = load_checkpoint(last, model, optimizer, run_config, scaler, rank)
        iter_num, best_val_loss, tokens_seen = state["iter_num"], state["best_val_loss"], state["tokens_seen"]
        if master and not eval_only:
            print(f"resuming from {last} at iteration {iter_num}")
            truncate_log(out_dir, iter_num, evaluates_again=iter_num % eval_interval == 0 or iter_num >= max_iters)
    elif master:
        truncate_log(out_dir, 0)  # a fresh run: the log of one that left no checkpoint goes
    if master:
        os.makedirs(out_dir, exist_ok=True)
        remove_stale_temporaries(out_dir)
        copy_tokenizer(meta, data_dir, out_dir)
        print(f"model: {model.num_params() / 1e6:.2f}M parameters without embeddings, "
              f"{model.num_params(False) / 1e6:.2f}M in all; {dev}, {dtype_name}, {world_size} process(es)")

    raw_model = model
    autocast = (torch.autocast(device_type=device_type, dtype=getattr(torch, dtype_name))
                if dtype_name != "float32" else nullcontext())
    if compile:
        x, y = dataset.get_batch("train", batch_size, block_size, torch.Generator().manual_seed(seed), dev)
        model = compile_or_eager(model, x, y, autocast)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    tokens_per_step = batch_size * block_size * gradient_accumulation_steps
    flops_per_step = raw_model.flops_per_token(block_size) * tokens_per_step
    peak = known_peak_flops(device_type, dtype_name)

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters fixed batches per split, shared out among the processes."""
        model.eval()
        result = {}
        for split in ("train", "val"):
            total = torch.zeros(2, device=dev)
            for k in range(rank, eval_iters, world_size):
                g = torch.Generator().manual_seed(batch_seed(seed, f"eval-{split}", 0, k))
                x, y = dataset.get_batch(split, batch_size, block_size, g, dev)
                with autocast:
                    _, loss = raw_model(x, y)
                total += torch.stack([loss.float(), torch.ones((), device=dev)])
            if ddp:
                dist.all_reduce(total)
            result[split] = (total[0] / total[1]).item()
        model.train()
        return result

    def checkpoint_info(rng_ranks):
        return {"iter_num": iter_num, "best_val_loss": best_val_loss, "tokens_seen": tokens_seen,
                "scaler": scaler.state_dict(), "rng_ranks": rng_ranks,
                "config": dict(run_config, iter_num=iter_num, best_val_loss=best_val_loss)}

    def gathered_rng():
        """Every process's RNG states (a collective: all processes call it), for the checkpoint."""
        if not ddp:
            return [rng_state()]
        states = [None] * world_size
        dist.all_gather_object(states, rng_state())
        return states

    def evaluate_and_save():
        nonlocal best_val_loss
        losses = estimate_loss()
        rng_ranks = gathered_rng() if not eval_only else []
        if not master:
            return
        bpb = bits_per_byte(losses["val"], meta["splits"]["val"])
        print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
              f"val {bpb:.4f} bits/byte")
        if eval_only:  # the run's log and checkpoints are left as they are
            return
        append_log(out_dir, {"iter": iter_num, "tokens": tokens_seen, "train_loss": losses["train"],
                    "val_loss": losses["val"], "val_bpb": bpb})
        is_best = losses["val"] < best_val_loss
        best_val_loss = min(best_val_loss, losses["val"])
        info = checkpoint_info(rng_ranks)
        if is_best:
            save_checkpoint(out_dir, "best", raw_model, optimizer, info)
        save_checkpoint(out_dir, "last", raw_model, optimizer, info)
        plot_loss_curve(out_dir)

    stop_signal = catch_stop_signals()

    if eval_only:
        evaluate_and_save()
        return
    model.train()
    step_seconds, steps_timed = 0.0, 0  # since the last log line, evaluations left out
    while iter_num < max_iters:
        if iter_num % eval_interval == 0:
            evaluate_and_save()
        step_started = time.time()
        lr = get_lr(iter_num, learning_rate, min_lr, warmup_iters, lr_decay_iters or max_iters, decay_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=dev)
        for micro in range(micro_steps):
            g = torch.Generator().manual_seed(batch_seed(seed, "train", iter_num, rank * micro_steps + micro))
            x, y = dataset.get_batch("train", batch_size, block_size, g, dev)
            if ddp:
                model.require_backward_grad_sync = micro == micro_steps - 1
            with autocast:
                _, loss = model(x, y)
            scaler.scale(loss / micro_steps).backward()
            step_loss += loss.detach().float() / micro_steps
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        loss_value = step_loss.item()
        step_seconds, steps_timed = step_seconds + time.time() - step_started, steps_timed + 1
        if not math.isfinite(loss_value):
            raise TrainError(f"the loss is {loss_value} at iteration {iter_num}: training diverged. Resume from "
                             f"the last checkpoint with a lower learning_rate (now {learning_rate}) or grad_clip")
        iter_num += 1
        tokens_seen += tokens_per_step
        if master and (iter_num % log_interval == 0 or iter_num == max_iters):
            per_step = step_seconds / steps_timed
            step_seconds, steps_timed = 0.0, 0
            ms, tok_s = 1000 * per_step, tokens_per_step / per_step
            mfu = flops_per_step / per_step / peak if peak else None
            print(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {ms:.0f} ms/iter, {tok_s:,.0f} tok/s"
                  + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""))
            append_log(out_dir, {"iter": iter_num, "tokens": tokens_seen, "loss": loss_value, "lr": lr, "ms": ms,
                        "tok_per_s": tok_s, "mfu": mfu})
        stop = torch.tensor(float(bool(stop_signal)), device=dev)
        if ddp:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item():
            rng_ranks = gathered_rng()
            if master:
                save_checkpoint(out_dir, "last", raw_model, optimizer, checkpoint_info(rng_ranks))
                print(f"stopped at iteration {iter_num}; saved {out_dir}/last. Continue with --init_from=resume")
            break
    else:
        release_stop_signals()
        evaluate_and_save()
    if ddp:
        # A gloo worker thread frees the tensors of a finished collective a moment after it returns, taking the
        # GIL to do so; if the interpreter is exiting by then, the process aborts ("terminate called without an
        # active exception"). Waiting in a barrier releases the GIL and gives the workers that moment.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        globals().update(configure(settings_of(globals()), sys.argv[1:], __file__))
        main()
    except (ConfigError, TrainError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
