"""
Generate text from a trained model, streaming it as it comes; or show the next-token probabilities.

    python sample.py --start="One day"
    python sample.py --out_dir=out/quickstart --start=FILE:prompt.txt --num_samples=3 --max_new_tokens=200
    python sample.py --start="Your effort will take you" --show_probs

Settings are the globals below (configurator.py: config files or --key=value). The text goes to stdout,
the speed of each sample to stderr, so `python sample.py > story.txt` keeps only the story.
"""
import json
import math
import os
import sys
import time

import torch
from safetensors.torch import load_model

from configurator import ConfigError, configure, settings_of
from model import GPT, GPTConfig
from tokenizer import Tokenizer

# --- settings -------------------------------------------------------------------------------------------
out_dir = "out/quickstart"  # a train.py output directory
checkpoint = "best"  # "best" (lowest val loss) or "last"
start = ""  # the prompt, or FILE:path to read it from a file; "" starts a fresh document
num_samples = 3
max_new_tokens = 256
temperature = 0.8  # 0: greedy
top_k = 200  # keep the k most likely tokens; 0: all
top_p = 1.0  # keep the smallest set of tokens with this much probability; 1.0: all
seed = 1337
device = "auto"  # "auto", "cpu", "cuda", "mps"
show_probs = False  # print the next-token probability table for the prompt instead of sampling
show_top = 10  # rows of that table
use_cache = True  # the KV cache; False recomputes the whole context each step (same tokens, slower)
# --------------------------------------------------------------------------------------------------------


class SampleError(RuntimeError):
    pass


def auto_device(requested):
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_tokenizer(run_dir, info):
    """The tokenizer a run was trained with: GPT-2's, or the copy train.py left in the run directory."""
    if info["name"] == "gpt2":
        tok = Tokenizer.gpt2()
    else:
        path = os.path.join(run_dir, "tokenizer.tiktoken")
        if not os.path.isfile(path):
            raise SampleError(f"{run_dir} was trained with tokenizer {info['name']!r} but holds no tokenizer.tiktoken")
        tok = Tokenizer.load(path)
    if tok.content_hash != info["content_hash"]:
        raise SampleError(f"the tokenizer for {run_dir} does not match the one it was trained with")
    return tok


def load_for_inference(run_dir, which="best", map_device="cpu"):
    """(model in eval mode, tokenizer, config dict) from run_dir/<which>, falling back to last/ when best/
    is missing. Weights come from safetensors: no pickle is loaded."""
    path = os.path.join(run_dir, which)
    if not os.path.isdir(path) and which == "best":
        path = os.path.join(run_dir, "last")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise SampleError(f"no checkpoint in {run_dir}: train one with `python train.py ...` "
                          f"(looked for {config_path})")
    with open(config_path) as f:
        config = json.load(f)
    model = GPT(GPTConfig(**config["model"]))
    load_model(model, os.path.join(path, "model.safetensors"))
    tok = load_tokenizer(run_dir, config["tokenizer"])
    if tok.n_vocab > model.config.vocab_size:
        raise SampleError(f"tokenizer has {tok.n_vocab} tokens but the model only {model.config.vocab_size}")
    return model.to(map_device).eval(), tok, config


def read_prompt(text):
    if text.startswith("FILE:"):
        with open(text[5:], encoding="utf-8") as f:
            return f.read()
    return text


def prompt_ids(tok, text):
    """The prompt's ids; an empty prompt is the start of a document (<|endoftext|>)."""
    ids = tok.encode(text, allowed_special="all") if text else []
    return ids or [tok.eot_token if tok.eot_token is not None else 0]


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back bytes of a character cut in two."""

    def __init__(self, tok):
        self.tok, self.pending = tok, b""

    def feed(self, token_id):
        self.pending += self.tok.decode_bytes([token_id])
        try:
            text, self.pending = self.pending.decode("utf-8"), b""
        except UnicodeDecodeError as e:
            if e.reason != "unexpected end of data":
                text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
            else:
                text, self.pending = self.pending[:e.start].decode("utf-8"), self.pending[e.start:]
        return text

    def flush(self):
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text


@torch.no_grad()
def probability_table(model, tok, ids, rows):
    """[(token text, id, probability, log-probability)] of the rows most likely next tokens."""
    x = torch.tensor([ids[-model.config.block_size:]], device=model.lm_head.weight.device)
    logits, _ = model(x)
    logprobs = torch.log_softmax(logits[0, -1].float(), dim=-1)
    top = torch.topk(logprobs, rows)
    return [(tok.decode([i]), i, math.exp(lp), lp) for lp, i in zip(top.values.tolist(), top.indices.tolist())]


def main():
    dev = auto_device(device)
    model, tok, _ = load_for_inference(out_dir, checkpoint, dev)
    prompt = read_prompt(start)
    ids = prompt_ids(tok, prompt)
    if show_probs:
        print(f"next-token probabilities after {prompt!r}:")
        print(f"  {'token':<16} {'id':>6} {'probability':>12} {'log-prob':>9}")
        for text, i, p, lp in probability_table(model, tok, ids, show_top):
            print(f"  {text!r:<16} {i:>6} {p:>12.4f} {lp:>9.3f}")
        return
    generator = torch.Generator(device=dev).manual_seed(seed)
    for n in range(num_samples):
        x = torch.tensor([ids], device=dev)
        decoder = StreamDecoder(tok)
        sys.stdout.write(prompt)
        started, produced = time.time(), 0
        for token in model.generate_stream(x, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                           top_p=top_p, generator=generator, eot_token=tok.eot_token,
                                           use_cache=use_cache):
            token = int(token[0])
            produced += 1
            if token == tok.eot_token:
                break
            sys.stdout.write(decoder.feed(token))
            sys.stdout.flush()
        sys.stdout.write(decoder.flush() + "\n")
        if n < num_samples - 1:
            sys.stdout.write("---------------\n")
        sys.stdout.flush()
        elapsed = time.time() - started
        print(f"[{produced} tokens in {elapsed:.2f} s: {produced / max(elapsed, 1e-9):.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    try:
        globals().update(configure(settings_of(globals()), sys.argv[1:]))
        main()
    except (ConfigError, SampleError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
