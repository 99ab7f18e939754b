"""
What train.py and finetune.py share: the optimizer and its learning-rate schedule, seeded batches, one
optimizer step, mixed precision, torch.compile, and the checks a run makes before it starts; and what
ablate.py and bench/bench_quality.py share: the bundled corpus prepared on demand, a finished run's score.

    from training import get_lr, make_optimizer
    optimizer = make_optimizer(model.parameters(), "cpu", 1e-3, 0.1, (0.9, 0.95))
    lr = get_lr(it, 1e-3, 1e-4, warmup_iters=100, decay_iters=2000)
"""
import copy
import hashlib
import importlib
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext

import torch

from checkpoint import load_run
from configurator import ConfigError
from data import TokenDataset


class TrainError(RuntimeError):
    """A run that cannot start or go on (a run already in out_dir, nothing to resume, a diverged loss)."""


# --- checks before a run ---------------------------------------------------------------------------------

def check_init_from(init_from, has_checkpoint, eval_only, out_dir, verb="train"):
    """Refuse what init_from cannot do with out_dir: resume without a checkpoint, or start afresh over one."""
    if init_from not in ("scratch", "resume", "auto"):
        raise ConfigError(f"init_from={init_from!r}: choose scratch, resume or auto")
    if init_from == "resume" and not has_checkpoint:
        raise TrainError(f"no checkpoint to resume in {out_dir}: {verb} with --init_from=scratch first")
    if init_from == "scratch" and has_checkpoint and not eval_only:
        evaluate = ", evaluate it with --eval_only" if verb == "fine-tune" else ""
        raise TrainError(f"{out_dir} already holds a run: continue it with --init_from=resume{evaluate}, "
                         "or pick another --out_dir (nothing was overwritten)")


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


# --- batches, schedule, optimizer -------------------------------------------------------------------------

def batch_seed(seed, split, iteration, micro_step):
    """The seed of one micro-batch. Batches depend only on (seed, split, iteration, micro-batch index), so a
    resumed run draws the same data, and N processes draw together what one process draws alone."""
    key = f"{seed}/{split}/{iteration}/{micro_step}".encode()  # not hash(): str hashes vary per process
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def get_lr(it, max_lr, min_lr, warmup_iters, decay_iters, decay=True, schedule="cosine", cooldown=0.3):
    """Linear warmup to max_lr over warmup_iters, then down to min_lr at decay_iters: "cosine" decay all the
    way, "linear" decay all the way, or "wsd" (warmup-stable-decay): max_lr until the last cooldown fraction of
    the decay, then linear; "wsd_sqrt": the same with a 1 - sqrt cooldown (Hagele et al. 2024, "Scaling Laws and
    Compute-Optimal Training Beyond Fixed Training Durations"): down fast at first, slowly at the end. max_lr
    throughout when not decay."""
    if not decay:
        return max_lr
    if it < warmup_iters:
        return max_lr * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, decay_iters - warmup_iters)  # 0 -> 1 over the decay
    if schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
    if schedule == "linear":
        return max_lr + progress * (min_lr - max_lr)
    if schedule in ("wsd", "wsd_sqrt"):
        done = max(0.0, (progress - 1 + cooldown) / cooldown)  # 0 -> 1 over the cooldown
        return max_lr + (math.sqrt(done) if schedule == "wsd_sqrt" else done) * (min_lr - max_lr)
    raise ValueError(f"lr_schedule={schedule!r}: choose cosine, linear, wsd or wsd_sqrt")


def make_optimizer(params, device_type, learning_rate, weight_decay, betas, no_decay=()):
    """AdamW over the params that require grad; weight decay on matrices (embeddings, linear weights), none
    on biases, norm gains and the params in no_decay."""
    params = [p for p in params if p.requires_grad]
    exempt = {id(p) for p in no_decay}
    groups = [{"params": [p for p in params if p.dim() >= 2 and id(p) not in exempt], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2 or id(p) in exempt], "weight_decay": 0.0}]
    extra = {"fused": True} if device_type in ("cuda", "cpu") else {}  # on CPU fused is ~5x the default
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)


class Optimizers:
    """Several optimizers stepped, zeroed, saved and loaded as one: Muon for the hidden matrices beside AdamW
    for the rest. param_groups spans them all, so a learning-rate schedule sets every group."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state):
        if len(state.get("optimizers", [])) != len(self.optimizers):
            raise ValueError(f"a state of {len(state.get('optimizers', [None]))} optimizer(s), not "
                             f"{len(self.optimizers)}: was the run trained with another optimizer setting?")
        for optimizer, own in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(own)


def orthogonalize(g, steps=5, eps=1e-7):
    """Roughly the nearest semi-orthogonal matrix to g (U S' V^T with S' near 1, where g = U S V^T), by a
    quintic Newton-Schulz iteration with Keller Jordan's coefficients, computed in g's dtype."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.size(0) > g.size(1)
    x = g.T if tall else g
    x = x / x.norm().clamp(min=eps)  # the spectral norm is now at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum, the update orthogonalised (orthogonalize), its step scaled to
    AdamW's RMS (lr * 0.2 sqrt(max(rows, columns))) so AdamW's learning rate and weight decay apply, decoupled
    weight decay. torch.optim.Muon(adjust_lr_fn="match_rms_adamw")'s math -- the reference the tests hold it
    to -- except that orthogonalize runs in ns_dtype: float32 on the CPU (default), where torch's bfloat16
    matrix products ran 4-5x slower here, bfloat16 on GPUs."""

    def __init__(self, params, lr, weight_decay, momentum=0.95, nesterov=True, ns_dtype=None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      split=1))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                dtype = self.ns_dtype or (torch.float32 if p.device.type == "cpu" else torch.bfloat16)
                p.mul_(1 - lr * decay)
                # a group's "split": fused matrices (q, k, v stacked) orthogonalised a block of rows at a time
                split = group.get("split", 1)  # (a checkpoint from before split has none)
                for block, part in zip(update.chunk(split), p.chunk(split)):
                    step = orthogonalize(block.to(dtype)).to(p.dtype)
                    part.add_(step, alpha=-lr * 0.2 * math.sqrt(max(part.shape)))


def make_muon_optimizer(model, device_type, learning_rate, weight_decay, betas, split=False, muon_lr=0.0):
    """Muon for the 2-D weight matrices of the transformer blocks; AdamW (make_optimizer) for the embeddings,
    the head, norms and biases. muon_lr: Muon's peak learning rate, when not learning_rate (its groups then
    carry "lr_scale", muon_lr / learning_rate, which set_lr keeps through the schedule). split: the fused q, k, v projection and SwiGLU's fused gate and up projection
    are orthogonalised as the separate matrices they are (as modded-nanogpt does), not as one."""
    hidden = [(name, p) for name, p in model.named_parameters()
              if p.requires_grad and p.dim() == 2 and name.startswith("transformer.h.")]
    swiglu = getattr(getattr(model, "config", None), "mlp", "") == "swiglu"

    def parts(name):
        if split and name.endswith("attn.c_attn.weight"):
            return 3
        return 2 if split and swiglu and name.endswith("mlp.c_fc.weight") else 1
    scale = muon_lr / learning_rate if muon_lr and learning_rate else 1.0
    groups = [{"params": [p for name, p in hidden if parts(name) == n], "split": n, "lr_scale": scale,
               "lr": learning_rate * scale} for n in (1, 2, 3)]
    ids = {id(p) for _, p in hidden}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return Optimizers(Muon([g for g in groups if g["params"]], learning_rate, weight_decay),
                      make_optimizer(rest, device_type, learning_rate, weight_decay, betas))


def set_lr(optimizer, lr):
    """Every group's learning rate to lr, times the group's "lr_scale" where it has one (Muon's, with muon_lr)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Clip the gradient norm to grad_clip (0: no clipping), step, and clear the gradients."""
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def autocast_for(device_type, dtype_name):
    """Mixed precision in dtype_name on device_type; nothing to do in float32."""
    if dtype_name == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype_name))


def check_finite(loss_value, iter_num, learning_rate, verb="training"):
    if not math.isfinite(loss_value):
        raise TrainError(f"the loss is {loss_value} at iteration {iter_num}: {verb} diverged. Resume from the "
                         f"last checkpoint with a lower learning_rate (now {learning_rate}) or grad_clip")


# --- the bundled corpus, prepared on demand -----------------------------------------------------------------

def bundled_data_dir(data_root, vocab_size):
    """The bundled corpus as token files in data_root/bundled_bpe<vocab_size> (vocab_size 0: GPT-2's vocabulary,
    data_root/bundled), made by prepare.py the first time they are asked for: the data of ablate.py's cells and
    of bench/bench_quality.py's recipes. A prepare.py that fails raises ConfigError with its message."""
    name = f"bundled_bpe{vocab_size}" if vocab_size else "bundled"
    path = os.path.join(data_root, name)
    if not os.path.isfile(os.path.join(path, "meta.json")):  # prepare.py writes meta.json last
        args = ["--dataset=bundled", f"--out_dir={data_root}", f"--name={name}"]
        args += [f"--vocab_size={vocab_size}"] if vocab_size else []
        prepare = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare.py")
        proc = subprocess.run([sys.executable, prepare, *args], capture_output=True, text=True)
        if proc.returncode:
            raise ConfigError(f"prepare.py {' '.join(args)} failed:\n{proc.stderr.strip()}")
    return path


# --- a time budget ------------------------------------------------------------------------------------------

def iterations_in_budget(minutes, started, train_step, measure_eval, eval_interval, model, optimizer, scaler,
                         warmup=2, steps=8):
    """How many iterations fit in minutes of wall-clock counted from started (time.time()), evaluations and
    checkpoints included: warmup untimed steps, then the median of steps timed ones (train_step(i) does the
    whole optimizer step), then measure_eval() (one evaluation with its checkpoint saves: its seconds). The
    weights, optimizer, loss scale and random state are put back afterwards, so the run then starts from step 0
    exactly as one given that many iterations would. Returns (iterations, seconds a step, seconds an eval)."""
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), scaler.state_dict(),
             torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    for i in range(warmup):  # the first steps pay for allocations and cold caches, not a step's work
        train_step(i)
    times = []
    for i in range(steps):
        timed = time.time()
        train_step(i)
        times.append(time.time() - timed)
    step_s = sorted(times)[len(times) // 2]  # the median: one step slowed by another process does not count
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    if saved[2]:  # a disabled scaler (all but float16) has no state
        scaler.load_state_dict(saved[2])
    torch.set_rng_state(saved[3])
    if saved[4] is not None:
        torch.cuda.set_rng_state(saved[4])
    optimizer.zero_grad(set_to_none=True)
    eval_s = measure_eval()
    remaining = minutes * 60 - (time.time() - started)
    # n steps and the evaluations at 0, every eval_interval and the end: n s + (n / interval + 2) e <= remaining
    n = int((remaining - 2 * eval_s) / (step_s + eval_s / eval_interval))
    return max(1, n), step_s, eval_s


def replanned_iterations(minutes, elapsed, iter_num, planned, step_s, eval_s, eval_interval, lr_at, tolerance=0.02):
    """max_time's plan checked at an evaluation against the pace since the previous one: the iteration count
    that ends the run at minutes of wall-clock, given elapsed seconds so far, step_s a step and eval_s an
    evaluation with its checkpoints. It is taken only where it moves the predicted end by more than tolerance of
    the budget, and where it changes none of the learning rates already used -- lr_at(it, count) for every
    it < iter_num -- so the run still equals one given the final count as max_iters. That lets a "wsd" schedule
    be re-planned until its cooldown begins, any schedule during its warmup, a constant rate at any time; a
    cosine or linear decay keeps the count it fixed at the start. Returns the count: planned, or the new one."""
    remaining = minutes * 60 - elapsed
    # n more steps and the evaluations every eval_interval and at the end: n s + (n / interval + 1) e <= remaining
    proposed = iter_num + max(1, int((remaining - eval_s) / (step_s + eval_s / eval_interval)))
    if abs(proposed - planned) * (step_s + eval_s / eval_interval) <= tolerance * minutes * 60:
        return planned
    if any(lr_at(it, proposed) != lr_at(it, planned) for it in range(iter_num)):
        return planned
    return proposed


# --- measures -----------------------------------------------------------------------------------------------

def bits_per_byte(loss, split_meta):
    """Loss in bits per byte of text: nats/token * tokens/byte / ln 2, comparable across vocabularies."""
    return loss / math.log(2) * split_meta["tokens"] / split_meta["bytes"]


@torch.no_grad()
def split_bits_per_byte(model, dataset, split="val"):
    """Bits per byte of model on the whole of dataset's split (a data.TokenDataset), read once in windows of the
    model's context, every token scored once: a window's first token is predicted from the previous window's
    last, so none is skipped. The same text for every model, whatever its vocabulary. Whole windows go through
    the model several at a time (as many as keep the logits near 64 MB), the last, shorter one alone."""
    tokens = torch.from_numpy(dataset.splits[split].astype("int64"))
    T, V = model.config.block_size, model.config.vocab_size
    n_whole = (len(tokens) - 1) // T  # windows with all T targets: inputs tokens[kT : kT+T], targets one on
    per_forward = max(1, 2**24 // (T * V))
    total, count = 0.0, 0
    for first in range(0, n_whole, per_forward):
        k = torch.arange(first, min(first + per_forward, n_whole))
        x = tokens[k[:, None] * T + torch.arange(T + 1)]  # (windows, T + 1)
        logits, _ = model(x[:, :-1])  # (windows, T, vocab)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    rest = tokens[n_whole * T:]  # what the whole windows left: one shorter window, if any target remains
    if len(rest) > 1:
        logits, _ = model(rest[None, :-1])
        total += torch.nn.functional.cross_entropy(logits[0].float(), rest[1:], reduction="sum").item()
        count += len(rest) - 1
    return bits_per_byte(total / count, dataset.meta["splits"][split])


def final_bits_per_byte(run_dir, split="val"):
    """split_bits_per_byte of run_dir's final model (last/) on the data it trained on (its recorded data_dir):
    how ablate.py and bench/bench_quality.py score a finished run."""
    model, _, config = load_run(run_dir, "last")
    return split_bits_per_byte(model, TokenDataset(config["train"]["data_dir"]), split)


def known_peak_flops(device_type, dtype_name, peak_flops=0.0):
    """The accelerator's peak FLOP/s for MFU: peak_flops when given, else a table of known GPUs (0: unknown)."""
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


# --- torch.compile ----------------------------------------------------------------------------------------

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
