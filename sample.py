"""
Generate text from a trained model, streaming it as it comes; or show the next-token probabilities.

    python sample.py --start="One day"
    python sample.py --out_dir=out/quickstart --start=FILE:prompt.txt --num_samples=3 --max_new_tokens=200
    python sample.py --start="Your effort will take you" --show_probs
    python sample.py --out_dir=out/chat --chat --start="Write a story that uses the words: dog, ball, happy."
    python sample.py --out_dir=out/quickstart --adapter=out/chat --chat       # base + LoRA adapter, interactive
    python sample.py --quantize=int8          # int8 weights in the CPU decoding step: less to read a token

Settings are the globals below (configurator.py: config files or --key=value). The text goes to stdout,
the speed of each sample to stderr, so `python sample.py > story.txt` keeps only the story.
"""
import math
import os
import sys
import time

import torch

from chat import IM_END, render_conversation
from checkpoint import load_run
from configurator import ConfigError, configure, settings_of
from files import DataError
from lora import merge_lora
from quantize import quantize_model_
from system import pick_device

# --- settings -------------------------------------------------------------------------------------------
out_dir = "out/quickstart"  # a train.py output directory
checkpoint = "best"  # "best" (lowest val loss) or "last"
start = ""  # the prompt, or FILE:path to read it from a file; "" starts a fresh document. A special token's
#             text (<|endoftext|>) in it is that token; in a --chat message it is plain text
num_samples = 3  # samples to generate, one after another
max_new_tokens = 256  # tokens per sample at most (it also stops at <|endoftext|>)
temperature = 0.8  # 0: greedy
top_k = 200  # keep the k most likely tokens; 0: all
top_p = 1.0  # keep the smallest set of tokens with this much probability; 1.0: all
seed = 1337  # of the sampling generator: the same seed, the same samples
device = "auto"  # "auto", "cpu", "cuda", "mps"
show_probs = False  # print the next-token probability table for the prompt instead of sampling
show_top = 10  # rows of that table
use_cache = True  # the KV cache; False recomputes the whole context each step (same tokens, slower)
chat = False  # a finetune.py model: start is a user message in the chat template; no start: chat on stdin
system = ""  # with chat: a system message that opens the conversation
adapter = ""  # a finetune.py LoRA run (or checkpoint directory) to apply to out_dir's model
quantize = ""  # "int8": the weights as int8, a scale per 32 inputs (quantize.py), for the CPU decoding step
# --------------------------------------------------------------------------------------------------------


def read_prompt(text):
    if not text.startswith("FILE:"):
        return text
    try:
        with open(text[5:], encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the prompt file {text[5:]}: {e}") from None


def check_sampling_settings(vocab_size):
    """One clear error for settings that sampling cannot use."""
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be 0 (greedy) or more")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k} must be 0 (off) or more")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1]")
    if not 1 <= show_top <= vocab_size:
        raise ConfigError(f"show_top={show_top} must be in [1, {vocab_size}] (the vocabulary)")
    if chat and show_probs and not start:
        raise ConfigError("--chat --show_probs needs --start: the user message to show the reply's first token for")
    if quantize not in ("", "int8"):
        raise ConfigError(f"quantize={quantize!r}: the choices are int8, or '' for the model's own fp32 weights")


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


def stream_sample(model, tok, ids, stop_token, generator, dev):
    """Generate after ids until stop_token or max_new_tokens, writing the text to stdout as it comes and the
    speed to stderr. Returns the text."""
    x = torch.tensor([ids], device=dev)
    decoder = StreamDecoder(tok)
    started, produced, pieces = time.time(), 0, []
    for token in model.generate_stream(x, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                       top_p=top_p, generator=generator, eot_token=stop_token,
                                       use_cache=use_cache):
        token = int(token[0])
        produced += 1
        if token == stop_token:
            break
        pieces.append(decoder.feed(token))
        sys.stdout.write(pieces[-1])
        sys.stdout.flush()
    pieces.append(decoder.flush())
    sys.stdout.write(pieces[-1] + "\n")
    sys.stdout.flush()
    elapsed = time.time() - started
    print(f"[{produced} tokens in {elapsed:.2f} s: {produced / max(elapsed, 1e-9):.1f} tok/s]", file=sys.stderr)
    return "".join(pieces)


def chat_messages(tok, history):
    """The ids of history (a list of messages) in the chat template, ready for the assistant's answer."""
    if IM_END not in tok.special_tokens:
        raise ConfigError(f"the model of {out_dir} has no chat tokens: --chat needs a model fine-tuned with "
                          "finetune.py (or an --adapter)")
    return render_conversation(tok, history, generation_prompt=True)[0]


def chat_session(model, tok, prompt, generator, dev):
    """--chat: the prompt as a user message, answered num_samples times; with no prompt, a conversation typed
    on stdin (an empty line or Ctrl-D ends it). The model sees the last block_size tokens of it."""
    history = [{"role": "system", "content": system}] if system else []
    chat_messages(tok, history)  # no chat tokens: fail before anything is typed
    end = tok.special_tokens[IM_END]
    if prompt:
        ids = chat_messages(tok, history + [{"role": "user", "content": prompt}])
        for n in range(num_samples):
            stream_sample(model, tok, ids, end, generator, dev)
            if n < num_samples - 1:
                sys.stdout.write("---------------\n")
        return
    while True:
        try:
            line = input("user> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        sys.stdout.write("assistant> ")
        reply = stream_sample(model, tok, chat_messages(tok, history), end, generator, dev)
        history.append({"role": "assistant", "content": reply})


@torch.no_grad()
def probability_table(model, tok, ids, rows):
    """[(token text, id, probability, log-probability)] of the rows most likely next tokens."""
    x = torch.tensor([ids[-model.config.block_size:]], device=model.lm_head.weight.device)
    logits, _ = model(x)
    logprobs = torch.log_softmax(logits[0, -1].float(), dim=-1)
    top = torch.topk(logprobs, rows)
    return [(tok.decode([i]), i, math.exp(lp), lp) for lp, i in zip(top.values.tolist(), top.indices.tolist())]


def main():
    dev = pick_device(device)
    model, tok, _ = load_run(out_dir, checkpoint, dev, adapter=adapter)
    merge_lora(model)  # a LoRA fine-tune's adapters folded in: the C++ decoding step then applies to it too
    check_sampling_settings(model.config.vocab_size)
    if quantize == "int8":
        if dev != "cpu":
            raise ConfigError(f"--quantize=int8 is for the CPU decoding step, and this model runs on {dev}: "
                              "add --device=cpu")
        quantize_model_(model)  # the C++ step reads int8; everything else the dequantised fp32 weights
    model.pack_weights_()  # faster decoding on the CPU: the weights in one huge-page block
    prompt = read_prompt(start)
    opening = [{"role": "system", "content": system}] if system else []
    ids = (chat_messages(tok, opening + [{"role": "user", "content": prompt}]) if chat and prompt
           else prompt_ids(tok, prompt))
    if show_probs:
        print(f"next-token probabilities after {prompt!r}:")
        print(f"  {'token':<16} {'id':>6} {'probability':>12} {'log-prob':>9}")
        for text, i, p, lp in probability_table(model, tok, ids, show_top):
            print(f"  {text!r:<16} {i:>6} {p:>12.4f} {lp:>9.3f}")
        return
    generator = torch.Generator(device=dev).manual_seed(seed)
    if chat:
        chat_session(model, tok, prompt, generator, dev)
        return
    for n in range(num_samples):
        sys.stdout.write(prompt)
        stream_sample(model, tok, ids, tok.eot_token, generator, dev)
        if n < num_samples - 1:
            sys.stdout.write("---------------\n")
            sys.stdout.flush()


if __name__ == "__main__":
    try:
        globals().update(configure(settings_of(globals()), sys.argv[1:], __file__))
        main()
    except BrokenPipeError:  # `python sample.py | head`: the reader has gone, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError) as e:  # ValueError: ConfigError, DataError, CheckpointError
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
