"""
Pretrain a GPT with next-token cross-entropy: on CPU, one GPU, or several GPUs with torchrun (DDP).

    python train.py config/quickstart.py                          # CPU, the bundled corpus, minutes
    python train.py config/tinystories.py                         # one GPU
    torchrun --standalone --nproc_per_node=4 train.py config/tinystories.py
    python train.py config/quickstart.py --init_from=resume       # continue an interrupted run
    torchrun --standalone --nproc_per_node=2 train.py config/quickstart.py \
        --gradient_accumulation_steps=2 --batch_size=8            # DDP on the CPU: the processes share each step

Settings are the globals below; config files and --key=value override them (configurator.py).
out_dir receives: last/ and best/ checkpoints (model.safetensors, state.pt, config.json), log.jsonl,
loss.png, and a copy of the tokenizer when it is not GPT-2's. Ctrl-C saves last/ before exiting.
"""
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from checkpoint import (append_log, checkpoint_dir, copy_tokenizer, plot_loss_curve, remove_stale_temporaries,
                        resume, rng_state, save_checkpoint, seconds_to_save, tokenizer_info, truncate_log)
from configurator import ConfigError, configure, require_at_least, settings_of
from data import TokenDataset
from model import GPT, GPTConfig
from system import catch_stop_signals, pick_device, pick_dtype, release_stop_signals, setup_distributed
from training import (TrainError, autocast_for, batch_seed, bits_per_byte, check_finite, check_init_from,
                      compile_or_eager, get_lr, iterations_in_budget, known_peak_flops, make_muon_optimizer,
                      make_optimizer, micro_steps_per_process, optimizer_step, replanned_iterations, set_lr)

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
train_fraction = 1.0  # train on the first fraction of the train split's tokens only (data-size studies)
sampling = "random"  # "random": each window from a random offset; "epochs": the train split read in epochs,
#                     every window once an epoch, in a random order (data.TokenDataset.epoch_offsets)
# model (vocab_size comes from the data)
n_layer = 4  # transformer blocks
n_head = 4  # attention heads per block (n_embd must divide by it)
n_embd = 128  # width of the residual stream
dropout = 0.0  # on attention and residual outputs while training
bias = False  # biases in the linear layers and norms
pos = "learned"  # "learned" or "rope"
norm = "layernorm"  # "layernorm" or "rmsnorm"
mlp = "gelu"  # "gelu", "swiglu" or "relu2" (relu(x)^2)
qk_norm = False  # RMSNorm on each head's queries and keys (Qwen3's q_norm, k_norm)
tie_embeddings = True  # the output head shares the token embedding matrix
# optimizer
optim = "adamw"  # "adamw", or "muon": Muon for the blocks' weight matrices, AdamW for embeddings, head, gains
muon_lr = 0.0  # muon: Muon's peak learning rate (the schedule scales it with learning_rate's); 0: learning_rate
muon_split = False  # muon: orthogonalise q, k, v (and SwiGLU's gate and up) apart, not as one fused matrix
zero_init = False  # start the blocks' output projections (attention's and the MLP's c_proj) at zero
learning_rate = 1e-3  # peak, after warmup
max_iters = 2000  # optimizer steps in all
max_time = 0.0  # minutes of wall-clock for the whole run instead (evaluations and checkpoints included): the
#                 first steps are timed and max_iters fixed from them and recorded (planned again at evaluations
#                 while no used learning rate changes: a wsd schedule before its cooldown); 0: off
weight_decay = 0.1  # on weight matrices and embeddings, not on norms or biases
beta1 = 0.9  # AdamW's momentum
beta2 = 0.95  # AdamW's second-moment decay
grad_clip = 1.0  # clip the gradient norm to this; 0 disables
# learning rate schedule: linear warmup, then a decay to min_lr at lr_decay_iters
decay_lr = True  # False: a constant learning_rate
lr_schedule = "cosine"  # the decay: "cosine", "linear", "wsd" (constant, then linear over the last cooldown), or
#                         "wsd_sqrt" (the same, down as 1 - sqrt over the cooldown)
cooldown = 0.3  # wsd: the fraction of the decay iterations spent decaying
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


@torch.no_grad()
def estimate_loss(model, dataset, autocast, dev, rank=0, world_size=1):
    """Mean loss over eval_iters fixed batches per split, shared out among the processes."""
    model.eval()
    result = {}
    for split in ("train", "val"):
        total = torch.zeros(2, device=dev)
        for k in range(rank, eval_iters, world_size):
            g = torch.Generator().manual_seed(batch_seed(seed, f"eval-{split}", 0, k))
            x, y = dataset.get_batch(split, batch_size, block_size, g, dev)
            with autocast:
                _, loss = model(x, y)
            total += torch.stack([loss.float(), torch.ones((), device=dev)])
        if world_size > 1:
            dist.all_reduce(total)
        result[split] = (total[0] / total[1]).item()
    model.train()
    return result


def gathered_rng(world_size):
    """Every process's RNG states (a collective: all processes call it), for the checkpoint."""
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states


def main():
    started = time.time()  # max_time counts from here
    # setup: processes, device, precision
    ddp, rank, local_rank, world_size = setup_distributed(device)
    master = rank == 0
    dev = pick_device(device, local_rank if ddp else None)
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
    require_at_least(0, max_iters=max_iters, warmup_iters=warmup_iters, lr_decay_iters=lr_decay_iters,
                     max_time=max_time, muon_lr=muon_lr)
    micro_steps = micro_steps_per_process(gradient_accumulation_steps, batch_size, world_size)
    autocast = autocast_for(device_type, dtype_name)

    # data, model, optimizer
    dataset = TokenDataset(data_dir)
    dataset.keep_fraction("train", train_fraction)
    meta = dataset.meta
    model_config = GPTConfig(block_size=block_size, vocab_size=meta["n_vocab"], n_layer=n_layer, n_head=n_head,
                             n_embd=n_embd, dropout=dropout, bias=bias, pos=pos, norm=norm, mlp=mlp,
                             qk_norm=qk_norm, tie_embeddings=tie_embeddings, kernels=kernels)
    run_config = {"model": model_config.to_dict(), "tokenizer": tokenizer_info(meta),
                  "train": settings_of(globals())}
    model = GPT(model_config).to(dev)
    if sampling not in ("random", "epochs"):
        raise ConfigError(f"sampling={sampling!r}: choose random or epochs")
    if optim not in ("adamw", "muon"):
        raise ConfigError(f"optim={optim!r}: choose adamw or muon")
    if lr_schedule not in ("cosine", "linear", "wsd", "wsd_sqrt") or not 0 < cooldown <= 1:
        raise ConfigError(f"lr_schedule={lr_schedule!r}, cooldown={cooldown}: choose cosine, linear, wsd or wsd_sqrt, "
                          "and a cooldown in (0, 1]")
    if zero_init:
        model.zero_output_projections_()
    if optim == "muon":
        optimizer = make_muon_optimizer(model, device_type, learning_rate, weight_decay, (beta1, beta2),
                                        muon_split, muon_lr)
    else:
        optimizer = make_optimizer(model.parameters(), device_type, learning_rate, weight_decay, (beta1, beta2))
    scaler = torch.amp.GradScaler(device_type, enabled=dtype_name == "float16")

    # a fresh run, or the one in out_dir continued
    iter_num, best_val_loss, tokens_seen = 0, float("inf"), 0
    total_iters = max_iters if not max_time else None  # with max_time: fixed by timing, or by the checkpoint
    last = checkpoint_dir(out_dir, "last")
    has_checkpoint = os.path.isfile(os.path.join(last, "state.pt"))
    check_init_from(init_from, has_checkpoint, eval_only, out_dir)
    if eval_only and not has_checkpoint:
        raise TrainError(f"no checkpoint in {out_dir} to evaluate: train first")
    if has_checkpoint and (init_from in ("resume", "auto") or eval_only):
        state = resume(last, model, optimizer, run_config, scaler, rank)
        iter_num, best_val_loss, tokens_seen = state["iter_num"], state["best_val_loss"], state["tokens_seen"]
        if total_iters is None:  # max_time: the run finishes the schedule it fixed (None before max_time existed)
            total_iters = state.get("max_iters")
        started -= state.get("elapsed") or 0.0  # the log's clock goes on from where the run stopped
        if master and not eval_only:
            print(f"resuming from {last} at iteration {iter_num}" +
                  (f" of {total_iters} (fixed by max_time)" if max_time and total_iters else ""))
            truncate_log(out_dir, iter_num, evaluates_again=iter_num % eval_interval == 0 or
                         iter_num >= (total_iters or max_iters))
    elif master:
        truncate_log(out_dir, 0)  # a fresh run: the log of one that left no checkpoint goes
    if master:
        os.makedirs(out_dir, exist_ok=True)
        remove_stale_temporaries(out_dir)
        copy_tokenizer(meta, data_dir, out_dir)
        print(f"model: {model.num_params() / 1e6:.2f}M parameters without embeddings, "
              f"{model.num_params(False) / 1e6:.2f}M in all; {dev}, {dtype_name}, {world_size} process(es)")

    raw_model = model
    if compile:
        x, y = dataset.get_batch("train", batch_size, block_size, torch.Generator().manual_seed(seed), dev)
        model = compile_or_eager(model, x, y, autocast)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    tokens_per_step = batch_size * block_size * gradient_accumulation_steps
    flops_per_step = raw_model.flops_per_token(block_size) * tokens_per_step
    peak = known_peak_flops(device_type, dtype_name, peak_flops)

    def checkpoint_info(rng_ranks):
        return {"iter_num": iter_num, "best_val_loss": best_val_loss, "tokens_seen": tokens_seen,
                "scaler": scaler.state_dict(), "rng_ranks": rng_ranks, "max_iters": total_iters,
                "elapsed": time.time() - started,
                "config": dict(run_config, iter_num=iter_num, best_val_loss=best_val_loss, max_iters=total_iters)}

    def evaluate_and_save():
        nonlocal best_val_loss
        losses = estimate_loss(raw_model, dataset, autocast, dev, rank, world_size)
        rng_ranks = gathered_rng(world_size) if not eval_only else []
        if not master:
            return
        bpb = bits_per_byte(losses["val"], meta["splits"]["val"])
        print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
              f"val {bpb:.4f} bits/byte")
        if eval_only:  # the run's log and checkpoints are left as they are
            return
        append_log(out_dir, {"iter": iter_num, "tokens": tokens_seen, "train_loss": losses["train"],
                    "val_loss": losses["val"], "val_bpb": bpb, "time": time.time() - started})
        is_best = losses["val"] < best_val_loss
        best_val_loss = min(best_val_loss, losses["val"])
        info = checkpoint_info(rng_ranks)
        if is_best:
            save_checkpoint(out_dir, "best", raw_model, optimizer, info)
        save_checkpoint(out_dir, "last", raw_model, optimizer, info)
        plot_loss_curve(out_dir)

    stop_signal = catch_stop_signals()
    stopped = False  # by a signal, before the end: the exit status then says so (130 for Ctrl-C)
    if eval_only:
        evaluate_and_save()
        return

    def train_step(it, lr):
        """One optimizer step at iteration it: its micro-batches, forward, backward, AdamW. The mean loss."""
        set_lr(optimizer, lr)
        step_loss = torch.zeros((), device=dev)
        for micro in range(micro_steps):
            if sampling == "epochs":  # this micro-batch's windows of the epochs stream
                first = ((it * world_size + rank) * micro_steps + micro) * batch_size
                x, y = dataset.get_epoch_batch("train", first, batch_size, block_size, seed, dev)
            else:
                g = torch.Generator().manual_seed(batch_seed(seed, "train", it, rank * micro_steps + micro))
                x, y = dataset.get_batch("train", batch_size, block_size, g, dev)
            if ddp:
                model.require_backward_grad_sync = micro == micro_steps - 1
            with autocast:
                _, loss = model(x, y)
            scaler.scale(loss / micro_steps).backward()
            step_loss += loss.detach().float() / micro_steps
        optimizer_step(model, optimizer, scaler, grad_clip)
        if ddp:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        return step_loss.item()

    def measure_eval():
        """Seconds of one evaluation with what follows it in the loop: two checkpoint saves (best, last), plots."""
        timed = time.time()
        estimate_loss(raw_model, dataset, autocast, dev, rank, world_size)
        if not master:
            return time.time() - timed
        os.makedirs(out_dir, exist_ok=True)
        return time.time() - timed + 2 * seconds_to_save(out_dir, raw_model, optimizer, checkpoint_info([rng_state()]))

    eval_s = None  # seconds of the last evaluation with its checkpoints (max_time's re-plans)
    if total_iters is None:  # max_time: as many iterations as the budget holds, at this machine's pace
        total_iters, step_s, eval_s = iterations_in_budget(
            max_time, started, lambda i: train_step(i, learning_rate), measure_eval, eval_interval,
            raw_model, optimizer, scaler)
        if ddp:  # every process runs the same count: the slowest one's
            agreed = torch.tensor(total_iters, device=dev)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            total_iters = int(agreed.item())
        if master:
            print(f"max_time {max_time:g} min: {total_iters} iterations ({1000 * step_s:.0f} ms a step, "
                  f"{eval_s:.1f} s an evaluation with its checkpoints; max_iters is not used: --max_time=0 "
                  "trains for max_iters instead)")
            if total_iters < 20:
                print(f"warning: only {total_iters} iterations fit in {max_time:g} minutes on this machine: give "
                      "more time, or a fixed count with --max_time=0 --max_iters=N")

    def lr_at(it, count):
        return get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters or count, decay_lr, lr_schedule,
                      cooldown)

    def replan():
        """max_time: the count again, from the pace since the last evaluation, where that changes no learning
        rate already used (training.replanned_iterations); every process takes the slowest one's pace."""
        nonlocal total_iters
        pace = torch.tensor([paced_seconds / paced_steps, eval_s, time.time() - started], device=dev)
        if ddp:
            dist.all_reduce(pace, op=dist.ReduceOp.MAX)
        step_s, slowest_eval_s, elapsed = pace.tolist()
        count = replanned_iterations(max_time, elapsed, iter_num, total_iters, step_s, slowest_eval_s, eval_interval,
                                     lr_at)
        if master and count != total_iters:
            print(f"max_time {max_time:g} min: {count} iterations instead of {total_iters} (now "
                  f"{1000 * step_s:.0f} ms a step)")
        total_iters = count

    # the training loop
    model.train()
    step_seconds, steps_timed = 0.0, 0  # since the last log line, evaluations left out
    paced_seconds, paced_steps = 0.0, 0  # since the last evaluation: max_time's pace
    while iter_num < total_iters:
        if iter_num % eval_interval == 0:
            if max_time and paced_steps and eval_s is not None:
                replan()
            eval_started = time.time()
            evaluate_and_save()
            eval_s, paced_seconds, paced_steps = time.time() - eval_started, 0.0, 0
        step_started = time.time()
        lr = lr_at(iter_num, total_iters)
        loss_value = train_step(iter_num, lr)
        took = time.time() - step_started
        step_seconds, steps_timed = step_seconds + took, steps_timed + 1
        paced_seconds, paced_steps = paced_seconds + took, paced_steps + 1
        check_finite(loss_value, iter_num, learning_rate)
        iter_num += 1
        tokens_seen += tokens_per_step
        if master and (iter_num % log_interval == 0 or iter_num == total_iters):
            per_step = step_seconds / steps_timed
            step_seconds, steps_timed = 0.0, 0
            ms, tok_s = 1000 * per_step, tokens_per_step / per_step
            mfu = flops_per_step / per_step / peak if peak else None
            print(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {ms:.0f} ms/iter, {tok_s:,.0f} tok/s"
                  + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""))
            append_log(out_dir, {"iter": iter_num, "tokens": tokens_seen, "loss": loss_value, "lr": lr, "ms": ms,
                        "tok_per_s": tok_s, "mfu": mfu, "time": time.time() - started})
        stop = torch.tensor(float(bool(stop_signal)), device=dev)
        if ddp:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item():
            rng_ranks = gathered_rng(world_size)
            if master:
                save_checkpoint(out_dir, "last", raw_model, optimizer, checkpoint_info(rng_ranks))
                print(f"stopped at iteration {iter_num}; saved {out_dir}/last. Continue with --init_from=resume")
            stopped = True
            break
    else:
        release_stop_signals()
        evaluate_and_save()
    if ddp:
        # A gloo worker thread frees the tensors of a finished collective a moment after it returns, taking the
        # GIL to do so; if the interpreter is exiting by then, the process aborts ("terminate called without an
        # active exception"). Waiting in a barrier releases the GIL and gives the workers that moment; the barrier
        # is a collective too, so a short sleep after it gives its own clean-up the same (CI saw one abort without).
        dist.barrier()
        dist.destroy_process_group()
        time.sleep(0.2)
    if stopped:  # saved, but not finished: not a success for whoever runs it (ablate.py, a shell script)
        return 128 + (stop_signal[0] if stop_signal else signal.SIGINT)
    return 0


if __name__ == "__main__":
    try:
        globals().update(configure(settings_of(globals()), sys.argv[1:], __file__))
        sys.exit(main())
    except (ValueError, OSError, TrainError) as e:  # ValueError: ConfigError, DataError, CheckpointError
        sys.exit(f"error: {e}")
