"""
Fine-tune a pretrained GPT (an autocomplete) into an instruct model that answers prompts: a chat template,
the loss on the responses only, LoRA adapters or full fine-tuning, and an instruction-following evaluation.

    python finetune.py --make_data                         # data/instruct/{train,val}.jsonl from the bundled stories
    python finetune.py config/finetune_quickstart.py       # LoRA on out/quickstart's model, minutes on a CPU
    python finetune.py config/finetune_quickstart.py --mode=full --out_dir=out/chat_full
    python finetune.py config/finetune_quickstart.py --eval_only    # the evaluation again, on out_dir/best
    python finetune.py config/finetune_quickstart.py --merge        # adapter + base -> out_dir/merged
    python sample.py --out_dir=out/chat --chat --start="Write a story that uses the words: dog, ball, happy."

Data: JSONL, one conversation per line, either {"prompt": ..., "response": ...} (and optionally "system") or
{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]} ending with the assistant.
Conversations are rendered by chat.render_conversation (ChatML: <|im_start|>role\\n ... <|im_end|>), the one
place the template lives, used by training, the evaluation and sample.py --chat alike; LoRA is lora.py, the
generated instructions and their evaluation instruct.py.

Settings are the globals below (configurator.py: config files, then --key=value). out_dir receives best/ and
last/ (adapter.safetensors for LoRA or model.safetensors for full fine-tuning, state.pt, config.json),
tokenizer.tiktoken (the base vocabulary plus the two chat tokens), log.jsonl, loss.png, eval.json, and
merged/ after --merge. Ctrl-C saves last/ before exiting; --init_from=resume continues.
"""
import json
import os
import sys
import time

import torch

from chat import add_chat_tokens, encode_rows, get_batch, read_conversations, render_conversation, split_rows
from checkpoint import (append_log, base_weights_hash, check_compatible, checkpoint_dir, find_checkpoint,
                        is_adapter, load_adapter, load_run, load_training_state, load_weights, plot_loss_curve,
                        read_config, read_tensors, remove_stale_temporaries, save_checkpoint, seconds_to_save,
                        truncate_log)
from configurator import ConfigError, configure, require_at_least, settings_of
from files import CheckpointError, DataError, atomic_write
from instruct import eval_rows, instruction_eval, write_instruct_data
from lora import (adapter_tensors, add_lora, compact_optimizer_state, expand_optimizer_state, grow_vocab,
                  load_adapter_tensors, lora_layer_names, merge_lora, token_row_weights, train_new_rows_only)
from system import catch_stop_signals, pick_device, pick_dtype, release_stop_signals
from training import (TrainError, autocast_for, batch_seed, check_finite, check_init_from, get_lr,
                      iterations_in_budget, make_optimizer, optimizer_step, replanned_iterations, set_lr)

# --- settings -------------------------------------------------------------------------------------------
# I/O
out_dir = "out/chat"  # where checkpoints, the log, the loss curve and eval.json go
base_dir = "out/quickstart"  # the pretrained run (train.py's out_dir) to start from
base_checkpoint = "best"  # its "best" or "last" checkpoint
data = "data/instruct/train.jsonl"  # conversations to train on (JSONL)
val_data = "data/instruct/val.jsonl"  # held-out conversations; "": a seeded val_fraction of data
val_fraction = 0.1  # share of data held out for val when val_data is ""
init_from = "scratch"  # "scratch" (from the base model), "resume" (from out_dir/last) or "auto"
eval_interval = 100  # iterations between evaluations (and checkpoints)
eval_iters = 20  # batches per loss evaluation, per split
log_interval = 10  # iterations between log lines
eval_only = False  # evaluate out_dir/best (response loss, instruction following) and exit
merge = False  # fold out_dir/best's adapter into the base model, save out_dir/merged, and exit
# the generated instruction data (--make_data)
make_data = False  # write make_data_dir/{train,val}.jsonl from the stories, then exit
stories = "data/tinystories_sample/train.txt.gz"  # documents separated by <|endoftext|> lines
make_data_dir = "data/instruct"  # where --make_data writes train.jsonl and val.jsonl
max_chars = 400  # each instruction + response fits in this many characters (about 110 tokens of bpe4096)
# fine-tuning
mode = "lora"  # "lora" (train adapters and the chat-token rows) or "full" (train every weight)
lora_r = 8  # rank of each adapter
lora_alpha = 16.0  # the update is scaled by lora_alpha / lora_r
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = "attn,mlp"  # comma-separated: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; attn or mlp = both
batch_size = 16  # conversations per micro-batch, padded on the right to the longest
gradient_accumulation_steps = 1  # micro-batches per optimizer step
# AdamW
learning_rate = 1e-3  # peak, after warmup
max_iters = 600  # optimizer steps in all
max_time = 0.0  # minutes of fine-tuning instead (evaluations and checkpoints included; the instruction eval after
#                 it is not): max_iters is fixed from the first steps' timing and recorded (planned again at
#                 evaluations while no used learning rate changes: in the warmup, or with decay_lr=False); 0: off
weight_decay = 0.0  # AdamW's, on matrices only
beta1 = 0.9  # AdamW's momentum
beta2 = 0.95  # AdamW's second-moment decay
grad_clip = 1.0  # 0 disables
decay_lr = True  # linear warmup, then cosine decay to min_lr at lr_decay_iters
warmup_iters = 20  # iterations of linear warmup from 0
lr_decay_iters = 0  # 0: max_iters
min_lr = 1e-4  # the learning rate at the end of the decay
# the instruction-following evaluation, after training and with --eval_only
eval_instructions = 150  # held-out generated instructions (an equal share of each task); 0 skips it
eval_batch_size = 50  # prompts generated together, left-padded
# system
device = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "mps"
dtype = "auto"  # "auto" (bfloat16 on CUDA when supported, else float32), "float32", "bfloat16", "float16"
num_threads = 0  # CPU threads for torch; 0: all cores
seed = 1337  # batches, the val split, the generated data and the adapters' initial weights
# --------------------------------------------------------------------------------------------------------


# --- data and model -------------------------------------------------------------------------------------

def load_splits(tok, block_size):
    """Training and validation examples (ids, mask) from data and val_data (or a seeded val_fraction of data),
    and the validation rows for the instruction evaluation."""
    train_rows = read_conversations(data)
    if val_data:
        val_rows = read_conversations(val_data)
    else:
        train_rows, val_rows = split_rows(train_rows, val_fraction, seed)
    train_examples, train_dropped = encode_rows(tok, train_rows, block_size)
    val_examples, val_dropped = encode_rows(tok, val_rows, block_size)
    if train_dropped or val_dropped:
        print(f"left out {train_dropped:,} train and {val_dropped:,} val conversations longer than the model's "
              f"context ({block_size + 1} tokens)")
    if not train_examples or not val_examples:
        raise DataError(f"no conversation fits the context of {block_size} tokens: shorten them")
    return train_examples, val_examples, val_rows


def load_base(device):
    """(model, tokenizer, sha256 of its weights) of base_dir/base_checkpoint: a whole model, not an adapter."""
    model_hash = base_weights_hash(base_dir, base_checkpoint)
    model, tok, _ = load_run(base_dir, base_checkpoint, device)
    return model, tok, model_hash


def prepare_model(model, base_tok, lora):
    """The base model and tokenizer made ready to fine-tune: chat tokens, and LoRA layers (lora: their
    settings; None for a full fine-tune). Returns (model, chat tokenizer, number of base token rows)."""
    tok = add_chat_tokens(base_tok)
    n_base = grow_vocab(model, tok.n_vocab)
    if lora:
        add_lora(model, lora["targets"], lora["r"], lora["alpha"], lora["dropout"])
        train_new_rows_only(model, n_base)
    return model, tok, n_base


# --- the loss on the responses ------------------------------------------------------------------------------

def backward_over(model, batches, scaler, autocast):
    """Backward of the mean loss over every response token of batches [(x, y)], each batch weighed by its
    count of response tokens: accumulating the gradients of several batches then equals one batch of them
    all, however the responses are spread. Returns that mean loss."""
    counts = [int((y != -100).sum()) for _, y in batches]
    step_loss = 0.0
    for (x, y), count in zip(batches, counts):
        with autocast:
            _, loss = model(x, y)
        share = count / sum(counts)  # loss is the mean over this batch's count response tokens
        scaler.scale(loss * share).backward()
        step_loss += loss.item() * share
    return step_loss


@torch.no_grad()
def response_loss(model, examples, split, pad_token, dev, autocast):
    """Mean loss per response token over eval_iters batches of examples, the same batches at every eval."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for k in range(eval_iters):
        g = torch.Generator().manual_seed(batch_seed(seed, f"eval-{split}", 0, k))
        x, y = get_batch(examples, batch_size, g, dev, pad_token)
        with autocast:
            _, loss = model(x, y)
        n = int((y != -100).sum())
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / count


# --- the evaluation after training ----------------------------------------------------------------------------

def evaluate_instructions(model, tok, val_examples, val_rows, dev, autocast):
    """The fine-tuned model against its base on held-out data: response loss, and how often each obeys the
    generated instructions -- the base with the instruction as a plain document, the base with the chat
    template (its chat-token rows at their initial mean), the fine-tuned model. A table on stdout, all of it
    and some example replies in out_dir/eval.json."""
    pad_token = tok.eot_token if tok.eot_token is not None else 0
    base_chat_model, base_tok, _ = load_base(dev)
    grow_vocab(base_chat_model, tok.n_vocab)
    losses = {name: response_loss(m, val_examples, "val", pad_token, dev, autocast)
              for name, m in (("base", base_chat_model), ("fine-tuned", model))}
    print(f"val response loss: base {losses['base']:.4f}, fine-tuned {losses['fine-tuned']:.4f}")
    report = {"val_response_loss": losses}
    block_size = model.config.block_size  # as in training: only conversations whose reference answer fits
    fitting = [r for r in val_rows if len(render_conversation(tok, r[0])[0]) <= block_size + 1]
    rows = eval_rows(fitting, eval_instructions) if eval_instructions > 0 else []
    if not rows:
        print("instruction eval skipped: " + ("eval_instructions=0" if eval_instructions <= 0 else
                                              "no generated instructions (rows with a \"task\") in the val data "
                                              f"fit the context of {block_size} tokens"))
        atomic_write(os.path.join(out_dir, "eval.json"), json.dumps(report, indent=1).encode())
        return report
    base_model, _, _ = load_base(dev)
    started = time.time()
    results, replies = {}, {}
    for name, m, t, plain in (("base, plain prompt", base_model, base_tok, True),
                              ("base, chat template", base_chat_model, tok, False),
                              ("fine-tuned", model, tok, False)):
        results[name], replies[name] = instruction_eval(m, t, rows, eval_batch_size, plain)
    n = {task: sum(r.get("task") == task for _, r in rows) for task in ("words", "begins", "continue")}
    print(f"instruction following on {len(rows)} held-out instructions (greedy; {time.time() - started:.0f} s):")
    print(f"  {'model':<22} {'uses all words':>15} {'words used':>11} {'begins as asked':>16} {'ends its answer':>16}")
    for name, r in results.items():
        print(f"  {name:<22} {r.get('words', 0):>15.1%} {r.get('words_used', 0):>11.1%} {r.get('begins', 0):>16.1%} "
              f"{r['stopped']:>16.1%}")
    examples = [{"prompt": rows[i][0][-2]["content"], **{name: replies[name][i] for name in replies}}
                for i in range(0, len(rows), max(1, len(rows) // 6))]
    report.update(instructions=n, results=results, examples=examples)
    atomic_write(os.path.join(out_dir, "eval.json"), json.dumps(report, indent=1, ensure_ascii=False).encode())
    first = examples[0]
    print(f"example: {first['prompt']}\n  base (plain): {first['base, plain prompt'][:300]!r}\n"
          f"  fine-tuned:   {first['fine-tuned'][:300]!r}")
    return report


def merge_run(dev):
    """--merge: out_dir/best's adapter folded into its base model, saved as the full checkpoint out_dir/merged
    (model.safetensors + config.json) that sample.py loads with --checkpoint=merged."""
    path = find_checkpoint(out_dir, "best")
    if not is_adapter(path):
        raise CheckpointError(f"{path} holds no adapter.safetensors: --merge folds a LoRA fine-tune "
                              "(a full fine-tune is a whole model already)")
    model, tok, config = load_adapter(path, dev)
    merge_lora(model)
    merged = dict(config, model=model.config.to_dict(), merged_from=path)
    save_checkpoint(out_dir, "merged", model, None, {"iter_num": config["iter_num"], "tokens_seen": 0,
                                                     "best_val_loss": config["best_val_loss"], "config": merged})
    print(f"merged {path} into {out_dir}/merged: python sample.py --out_dir={out_dir} --checkpoint=merged --chat")


def resume_finetune(last, model, optimizer, scaler, run_config, n_base):
    """Load out_dir/last (adapter or whole model, optimizer, random state) after checking it is this run's."""
    saved = read_config(last)
    check_compatible(saved, run_config, last)
    if saved["finetune"]["lora"] != run_config["finetune"]["lora"] or \
            saved["finetune"]["base"]["model_hash"] != run_config["finetune"]["base"]["model_hash"]:
        raise CheckpointError(f"{last} was fine-tuned with other LoRA settings or another base model: use its "
                              "settings, or a new out_dir")
    if mode == "lora":
        load_adapter_tensors(model, read_tensors(os.path.join(last, "adapter.safetensors")), n_base)
    else:
        load_weights(model, os.path.join(last, "model.safetensors"))
    return load_training_state(last, optimizer, scaler, expand_optimizer_state=(
        lambda saved: expand_optimizer_state(saved, optimizer, model, n_base)) if mode == "lora" else None)


# --- main ------------------------------------------------------------------------------------------------------

def main():
    started = time.time()  # max_time counts from here
    if make_data:
        write_instruct_data(stories, make_data_dir, max_chars, val_fraction, seed)
        return
    # settings, device, precision
    dev = pick_device(device)
    device_type = "cuda" if dev.startswith("cuda") else dev
    dtype_name = pick_dtype(dtype, device_type)
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    require_at_least(1, batch_size=batch_size, eval_batch_size=eval_batch_size, eval_interval=eval_interval,
                     eval_iters=eval_iters, log_interval=log_interval,
                     gradient_accumulation_steps=gradient_accumulation_steps)
    require_at_least(0, max_iters=max_iters, max_time=max_time)
    if mode not in ("lora", "full"):
        raise ConfigError(f"mode={mode!r}: choose lora or full")
    lora = ({"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "targets": lora_layer_names(lora_targets)}
            if mode == "lora" else None)
    if merge:
        merge_run(dev)
        return
    last = checkpoint_dir(out_dir, "last")
    has_checkpoint = os.path.isfile(os.path.join(last, "state.pt"))
    check_init_from(init_from, has_checkpoint, eval_only, out_dir, verb="fine-tune")
    if eval_only and not (has_checkpoint or os.path.isfile(os.path.join(out_dir, "best", "config.json"))):
        raise TrainError(f"no fine-tuned checkpoint in {out_dir} to evaluate: fine-tune first")
    autocast = autocast_for(device_type, dtype_name)

    # model, data, optimizer
    base_model, base_tok, base_hash = load_base(dev)
    model, tok, n_base = prepare_model(base_model, base_tok, lora)
    model.train()
    train_examples, val_examples, val_rows = load_splits(tok, model.config.block_size)
    pad_token = tok.eot_token if tok.eot_token is not None else 0
    run_config = {"model": model.config.to_dict(),
                  "tokenizer": {"name": tok.name, "content_hash": tok.content_hash, "n_vocab": tok.n_vocab},
                  "finetune": {"mode": mode, "lora": lora,
                               "base": {"run_dir": base_dir, "checkpoint": base_checkpoint, "model_hash": base_hash,
                                        "tokenizer_hash": base_tok.content_hash, "vocab_size": n_base}},
                  "train": settings_of(globals())}
    optimizer = make_optimizer(model.parameters(), device_type, learning_rate, weight_decay, (beta1, beta2),
                               no_decay=token_row_weights(model).values() if mode == "lora" else ())
    scaler = torch.amp.GradScaler(device_type, enabled=dtype_name == "float16")

    # a fresh run, or the one in out_dir continued
    iter_num, best_val_loss, tokens_seen = 0, float("inf"), 0
    total_iters = max_iters if not max_time else None  # with max_time: fixed by timing, or by the checkpoint
    if has_checkpoint and not eval_only:
        state = resume_finetune(last, model, optimizer, scaler, run_config, n_base)
        iter_num, best_val_loss, tokens_seen = state["iter_num"], state["best_val_loss"], state["tokens_seen"]
        if total_iters is None:  # max_time: the run finishes the schedule it fixed (None before max_time existed)
            total_iters = state.get("max_iters")
        print(f"resuming from {last} at iteration {iter_num}")
        truncate_log(out_dir, iter_num, evaluates_again=iter_num % eval_interval == 0 or
                     iter_num >= (total_iters or max_iters))
    elif not eval_only:
        truncate_log(out_dir, 0)  # a fresh run: the log of one that left no checkpoint goes
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tok.save(os.path.join(out_dir, "tokenizer.tiktoken"))
    trainable = (sum(t.numel() for t in adapter_tensors(model, n_base).values()) if mode == "lora"
                 else sum(p.numel() for p in model.parameters()))
    in_model = sum(p.numel() for name, p in model.named_parameters() if ".lora_" not in name)
    print(f"{mode} fine-tuning of {base_dir}/{base_checkpoint} ({in_model:,} parameters): {trainable:,} trained; "
          f"{len(train_examples):,} train and {len(val_examples):,} val conversations; {dev}, {dtype_name}")

    def checkpoint_info():
        return {"iter_num": iter_num, "best_val_loss": best_val_loss, "tokens_seen": tokens_seen,
                "scaler": scaler.state_dict(), "max_iters": total_iters,
                "config": dict(run_config, iter_num=iter_num, best_val_loss=best_val_loss, max_iters=total_iters),
                "optimizer_state": compact_optimizer_state(optimizer, model, n_base) if mode == "lora" else None}

    def evaluate_and_save():
        nonlocal best_val_loss
        losses = {split: response_loss(model, examples, split, pad_token, dev, autocast)
                  for split, examples in (("train", train_examples), ("val", val_examples))}
        print(f"iter {iter_num}: response loss: train {losses['train']:.4f}, val {losses['val']:.4f}")
        if eval_only:
            return losses
        append_log(out_dir, {"iter": iter_num, "tokens": tokens_seen, "train_loss": losses["train"],
                             "val_loss": losses["val"]})
        adapter = adapter_tensors(model, n_base) if mode == "lora" else None
        is_best = losses["val"] < best_val_loss
        best_val_loss = min(best_val_loss, losses["val"])
        info = checkpoint_info()  # once: with LoRA it holds a compacted copy of the optimizer state
        if is_best:
            save_checkpoint(out_dir, "best", model, optimizer, info, adapter)
        save_checkpoint(out_dir, "last", model, optimizer, info, adapter)
        plot_loss_curve(out_dir)
        return losses

    def train_step(it, lr):
        """One optimizer step at iteration it; (mean response loss, tokens in its batches)."""
        set_lr(optimizer, lr)
        batches = [get_batch(train_examples, batch_size,
                             torch.Generator().manual_seed(batch_seed(seed, "train", it, micro)), dev, pad_token)
                   for micro in range(gradient_accumulation_steps)]
        step_loss = backward_over(model, batches, scaler, autocast)
        optimizer_step(model, optimizer, scaler, grad_clip)
        return step_loss, sum(x.numel() for x, _ in batches)

    def measure_eval():
        """Seconds of one evaluation with what follows it in the loop: two checkpoint saves (best, last), plots."""
        timed = time.time()
        for split, examples in (("train", train_examples), ("val", val_examples)):
            response_loss(model, examples, split, pad_token, dev, autocast)
        adapter = adapter_tensors(model, n_base) if mode == "lora" else None
        return time.time() - timed + 2 * seconds_to_save(out_dir, model, optimizer, checkpoint_info(), adapter)

    eval_s = None  # seconds of the last evaluation with its checkpoints (max_time's re-plans)
    if total_iters is None and not eval_only:  # max_time: as many iterations as the budget holds
        total_iters, step_s, eval_s = iterations_in_budget(
            max_time, started, lambda i: train_step(i, learning_rate), measure_eval, eval_interval, model,
            optimizer, scaler)
        print(f"max_time {max_time:g} min: {total_iters} iterations ({1000 * step_s:.0f} ms a step, "
              f"{eval_s:.1f} s an evaluation with its checkpoints)")

    def lr_at(it, count):
        return get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters or count, decay_lr)

    # the training loop
    stop_signal = catch_stop_signals()
    step_seconds, steps_timed = 0.0, 0  # since the last log line, evaluations left out
    paced_seconds, paced_steps = 0.0, 0  # since the last evaluation: max_time's pace
    while not eval_only and iter_num < total_iters:
        if iter_num % eval_interval == 0:
            if max_time and paced_steps and eval_s is not None:  # the count again, where no used rate changes
                count = replanned_iterations(max_time, time.time() - started, iter_num, total_iters,
                                             paced_seconds / paced_steps, eval_s, eval_interval, lr_at)
                if count != total_iters:
                    print(f"max_time {max_time:g} min: {count} iterations instead of {total_iters} (now "
                          f"{1000 * paced_seconds / paced_steps:.0f} ms a step)")
                total_iters = count
            eval_started = time.time()
            evaluate_and_save()
            eval_s, paced_seconds, paced_steps = time.time() - eval_started, 0.0, 0
        step_started = time.time()
        lr = lr_at(iter_num, total_iters)
        step_loss, step_tokens = train_step(iter_num, lr)
        took = time.time() - step_started
        step_seconds, steps_timed = step_seconds + took, steps_timed + 1
        paced_seconds, paced_steps = paced_seconds + took, paced_steps + 1
        check_finite(step_loss, iter_num, learning_rate, "fine-tuning")
        iter_num += 1
        tokens_seen += step_tokens
        if iter_num % log_interval == 0 or iter_num == total_iters:
            ms = 1000 * step_seconds / steps_timed
            step_seconds, steps_timed = 0.0, 0
            print(f"iter {iter_num}: loss {step_loss:.4f}, lr {lr:.2e}, {ms:.0f} ms/iter")
            append_log(out_dir, {"iter": iter_num, "tokens": tokens_seen, "loss": step_loss, "lr": lr, "ms": ms})
        if stop_signal:
            save_checkpoint(out_dir, "last", model, optimizer, checkpoint_info(),
                            adapter_tensors(model, n_base) if mode == "lora" else None)
            print(f"stopped at iteration {iter_num}; saved {out_dir}/last. Continue with --init_from=resume")
            return 128 + stop_signal[0]  # saved, not finished: the exit status says so (130 for Ctrl-C)
    release_stop_signals()
    if not eval_only:
        evaluate_and_save()
    model, tok, _ = load_run(out_dir, "best", dev)  # the best checkpoint, as sample.py will load it
    evaluate_instructions(model, tok, val_examples, val_rows, dev, autocast)


if __name__ == "__main__":
    try:
        globals().update(configure(settings_of(globals()), sys.argv[1:], __file__))
        sys.exit(main())
    except (ValueError, OSError, TrainError) as e:  # ValueError: ConfigError, DataError, CheckpointError
        sys.exit(f"error: {e}")
