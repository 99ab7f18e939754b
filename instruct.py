"""
Instructions made from stories, and how well a model follows them. `finetune.py --make_data` writes
conversations that ask for a story using given words, beginning a given way, or continuing one (in the
spirit of TinyStories-Instruct); the evaluation generates greedy answers to held-out ones, many prompts at a
time, and checks what can be checked.

    from instruct import instructions_of, instruction_eval
    rows = instructions_of(story, random.Random(0), budget=400)   # [{"prompt", "response", "task", ...}]
    summary, replies = instruction_eval(model, tok, val_rows, batch_size=50)
"""
import json
import os
import random
import re

import numpy as np
import torch

from chat import IM_END, render_conversation
from corpus import read_txt, val_mask
from files import atomic_write

# --- instructions made from stories ---------------------------------------------------------------------------

FUNCTION_WORDS = set("""a an the and or but so if then than that this these those there here of to in on at by for
with from into onto over under up down out off about after before again all any both each few more most other
some such no nor not only own same too very can will just should now was were is are be been being have has had
do does did he she it they them their his her its him we us our you your i me my mine what which who whom when
where why how one two said says once upon time day lived also very went got get""".split())


def sentence_ends(text):
    """Character offsets where the sentences of text end (after . ! ? and a closing quote)."""
    ends = [m.start() for m in re.finditer(r'(?<=[.!?])\s+|(?<=[.!?]")\s+', text)]
    return [e for e in ends if e > 0] + [len(text)]


def first_sentences(text, ends, budget):
    """The longest run of whole leading sentences of text within budget characters ("" if none fits)."""
    fitting = [e for e in ends if e <= budget]
    return text[:fitting[-1]] if fitting else ""


def story_words(story, rng, count=3):
    """count distinct content words of story, lowercase, never a name (a word only ever seen capitalised)."""
    lower = set(re.findall(r"\b[a-z]{3,}\b", story))
    candidates = sorted(w for w in lower if w not in FUNCTION_WORDS)
    return rng.sample(candidates, count) if len(candidates) >= count else None


def instructions_of(story, rng, budget):
    """Up to three instruction rows made from one story, each prompt + response within budget characters:
    uses the words, begins with, continue."""
    story = re.sub(r"[ \t]+", " ", story.strip())
    ends = sentence_ends(story)
    rows = []
    short = first_sentences(story, ends, budget - 60)  # the prompt takes about 60 characters
    words = story_words(short, rng) if short else None
    if words:
        prompt = f"Write a story that uses the words: {', '.join(words)}."
        if len(prompt) + len(short) > budget:  # long words: fewer sentences, if they still hold every word
            short = first_sentences(story, ends, budget - len(prompt))
            words = words if all(re.search(rf"\b{w}\b", short) for w in words) else None
    if words:
        rows.append({"prompt": prompt, "response": short, "task": "words", "words": words})
    first = story[:ends[0]]
    begun = first_sentences(story, ends, budget - len(first) - len("Write a story that begins with: "))
    if len(begun) > len(first):
        rows.append({"prompt": f"Write a story that begins with: {first}", "response": begun,
                     "task": "begins", "begins": first})
    whole = first_sentences(story, ends, budget - len("Continue this story: "))
    cuts = [e for e in sentence_ends(whole)[:-1] if e >= len(whole) // 3]
    if cuts:
        cut = min(cuts, key=lambda e: abs(e - len(whole) // 2))
        rows.append({"prompt": f"Continue this story: {whole[:cut]}", "response": whole[cut:].strip(),
                     "task": "continue"})
    return rows


def write_instruct_data(source, out, budget, fraction, split_seed):
    """make_data: instructions from every story of source into out/train.jsonl and out/val.jsonl. A story goes
    to val exactly when prepare.py (same seed and fraction) put it in its val split, so with the defaults the
    val instructions come from stories the base model never saw. Deterministic: story i draws its words from
    a generator seeded with (split_seed, i)."""
    docs = list(read_txt(source, "eot"))
    to_val = val_mask(np.arange(len(docs)), split_seed, fraction)
    lines = {"train": [], "val": []}
    for i, (story, held_out) in enumerate(zip(docs, to_val)):
        if not story.strip():
            continue
        rng = random.Random(split_seed * 1_000_003 + i)
        for row in instructions_of(story, rng, budget):
            lines["val" if held_out else "train"].append(json.dumps(row, ensure_ascii=False))
    for split, rows in lines.items():
        atomic_write(os.path.join(out, f"{split}.jsonl"), ("\n".join(rows) + "\n").encode())
        print(f"wrote {len(rows):,} instructions to {os.path.join(out, split + '.jsonl')}")


# --- generation and the instruction-following evaluation -----------------------------------------------

@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens, stop_token, pad_token, temperature=0.0, top_k=None,
                   generator=None):
    """Replies to prompts (lists of ids) generated together: left-padded into one batch with an attention
    mask, so that each reply is the one its prompt alone would get. [(reply ids, stopped)], each reply cut
    before stop_token; stopped says whether it came within max_new_tokens, capped so that prompt and reply
    fit block_size. The batch stops where its widest prompt runs out of context; a row with a narrower prompt
    that has not stopped by then goes on alone to its own limit."""
    device = model.lm_head.weight.device
    block_size = model.config.block_size
    sampling = dict(temperature=temperature, top_k=top_k, generator=generator, eot_token=stop_token)
    width = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_token] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    together = max(0, min(max_new_tokens, block_size - width))
    out = model.generate(idx, together, attention_mask=mask, **sampling)[:, width:] if together else idx[:, :0]
    replies = []
    for prompt, row in zip(prompts, out.tolist()):
        room = min(max_new_tokens, block_size - len(prompt)) - len(row)
        if stop_token not in row and room > 0:
            alone = model.generate(torch.tensor([prompt + row], device=device), room, **sampling)
            row += alone[0, len(prompt) + len(row):].tolist()
        stopped = stop_token in row
        replies.append((row[:row.index(stop_token)] if stopped else row, stopped))
    return replies


def words_used(row, reply):
    """The fraction of the words a "words" instruction asked for that reply uses (whole words, any case)."""
    return sum(bool(re.search(rf"\b{re.escape(w)}\b", reply, re.IGNORECASE)) for w in row["words"]) / len(row["words"])


def obeys(row, reply):
    """Whether reply does what the generated instruction row asked; None for a task with no such check."""
    if row.get("task") == "words":
        return words_used(row, reply) == 1.0
    if row.get("task") == "begins":
        return " ".join(reply.split()).startswith(" ".join(row["begins"].split()))
    return None


def checkable(row):
    """Whether an instruction row carries what its task's check needs (a user's own rows may not)."""
    if row.get("task") == "words":
        words = row.get("words")
        return isinstance(words, list) and bool(words) and all(isinstance(w, str) for w in words)
    if row.get("task") == "begins":
        return isinstance(row.get("begins"), str)
    return "task" in row


def eval_rows(rows, count):
    """count held-out generated instructions in file order, shared out equally among the tasks (the first
    tasks take one more when count does not divide)."""
    rows = [r for r in rows if checkable(r[1])]
    tasks = sorted({str(row["task"]) for _, row in rows})
    shares = {task: count // len(tasks) + (i < count % len(tasks)) for i, task in enumerate(tasks)}
    return [r for task in tasks for r in [r for r in rows if str(r[1]["task"]) == task][:shares[task]]]


def instruction_eval(model, tok, rows, batch_size, plain=False):
    """Greedy replies to each instruction, batch_size prompts at a time, and whether they obey it. plain: the
    instruction as a bare document ("<|endoftext|>instruction\\n") for a base model that knows no template;
    replies then end at <|endoftext|>. Returns a summary and the replies."""
    if plain:
        prompts = [[tok.eot_token] + tok.encode_ordinary(messages[-2]["content"] + "\n") for messages, _ in rows]
        stop = tok.eot_token
    else:
        prompts = [render_conversation(tok, messages[:-1], generation_prompt=True)[0] for messages, _ in rows]
        stop = tok.special_tokens[IM_END]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # batches of prompts alike in length
    replies = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        for i, reply in zip(batch, generate_batch(model, [prompts[i] for i in batch], model.config.block_size,
                                                  stop, tok.eot_token if tok.eot_token is not None else 0)):
            replies[i] = reply
    texts = [tok.decode(ids) for ids, _ in replies]
    summary = {"stopped": sum(stopped for _, stopped in replies) / len(replies)}
    for task in ("words", "begins"):
        checks = [obeys(row, text) for (_, row), text in zip(rows, texts) if row.get("task") == task]
        if checks:
            summary[task] = sum(checks) / len(checks)
    used = [words_used(row, text) for (_, row), text in zip(rows, texts) if row.get("task") == "words"]
    if used:
        summary["words_used"] = sum(used) / len(used)
    return summary, texts
