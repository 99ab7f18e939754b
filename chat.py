"""
The chat template: conversations as tokens, the mask of the tokens a fine-tune learns, and the conversation
data files. One template (ChatML), used by training, the evaluation, sample.py --chat, and written as Jinja
into exported tokenizers, all from the pieces below.

    from chat import add_chat_tokens, render_conversation
    tok = add_chat_tokens(Tokenizer.gpt2())      # <|im_start|> = 50257, <|im_end|> = 50258
    ids, mask = render_conversation(tok, [{"role": "user", "content": "Hi"}], generation_prompt=True)

Data: JSONL, one conversation per line, either {"prompt": ..., "response": ...} (and optionally "system") or
{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]} ending with the assistant.
"""
import json
import os
import random

import torch

from files import DataError, read_lines
from tokenizer import EOT, Tokenizer

# --- the template ------------------------------------------------------------------------------------------

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")
AFTER_ROLE = AFTER_MESSAGE = "\n"  # <|im_start|>role\ncontent<|im_end|>\n


def add_chat_tokens(tok):
    """tok with <|im_start|> and <|im_end|> as two more special tokens (ids n_vocab and n_vocab + 1), named
    "<name>+chat"; tok itself when it has them already."""
    if IM_START in tok.special_tokens and IM_END in tok.special_tokens:
        return tok
    specials = dict(tok.special_tokens, **{IM_START: tok.n_vocab, IM_END: tok.n_vocab + 1})
    return Tokenizer(tok.mergeable_ranks, specials, name=f"{tok.name}+chat")


def render_conversation(tok, messages, generation_prompt=False):
    """(ids, mask) of a conversation in the ChatML template; mask is 1 on the tokens the model learns to
    write -- each assistant content and its <|im_end|> -- and 0 elsewhere:

        <|endoftext|><|im_start|>user\\nWrite a story.<|im_end|>\\n<|im_start|>assistant\\nOnce ...<|im_end|>\\n
        0            0           0    0                          0  0           0         1    ... 1           0

    The leading <|endoftext|> opens a document, as in pretraining. generation_prompt appends
    <|im_start|>assistant\\n for the model to answer. Contents are encoded as plain text: a "<|im_end|>"
    typed by a user is characters, not the token. With GPT-2's vocabulary plus the chat tokens,
    [{"role": "user", "content": "Hi"}] with generation_prompt gives
    [50256, 50257, 7220, 198, 17250, 50258, 198, 50257, 562, 10167, 198]."""
    start, end = tok.special_tokens[IM_START], tok.special_tokens[IM_END]
    ids, mask = [], []

    def add(part, trained):
        ids.extend(part)
        mask.extend([int(trained)] * len(part))
    if tok.eot_token is not None:
        add([tok.eot_token], False)
    for message in messages:
        add([start] + tok.encode_ordinary(message["role"] + AFTER_ROLE), False)
        add(tok.encode_ordinary(message["content"]) + [end], message["role"] == "assistant")
        add(tok.encode_ordinary(AFTER_MESSAGE), False)
    if generation_prompt:
        add([start] + tok.encode_ordinary("assistant" + AFTER_ROLE), False)
    return ids, mask


def jinja_template(tok: Tokenizer):
    """render_conversation as a Jinja chat template, for exported tokenizers (None without the chat tokens):
    tokenizing its text gives render_conversation's ids, unless a message holds a special token's text."""
    if IM_START not in tok.special_tokens or IM_END not in tok.special_tokens:
        return None
    text = lambda s: "'" + s.replace("\n", "\\n") + "'"  # a Jinja string literal
    opening = "{{ " + text(EOT) + " }}" if tok.eot_token is not None else ""
    return (opening + "{% for message in messages %}{{ " + text(IM_START) + " + message['role'] + "
            + text(AFTER_ROLE) + " + message['content'] + " + text(IM_END) + " + " + text(AFTER_MESSAGE)
            + " }}{% endfor %}{% if add_generation_prompt %}{{ " + text(IM_START + "assistant" + AFTER_ROLE)
            + " }}{% endif %}")


def labels_of(ids, mask):
    """The next-token targets of ids[:-1]: ids[t + 1] where mask[t + 1] is 1, -100 (ignored) elsewhere."""
    return [token if trained else -100 for token, trained in zip(ids[1:], mask[1:])]


# --- conversation data ---------------------------------------------------------------------------------

def conversation_of(row, where):
    """The messages of one JSONL row, checked; DataError names the line (where) and what to fix."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}}")
    elif "prompt" in row and "response" in row:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        if "system" in row:
            messages.insert(0, {"role": "system", "content": row["system"]})
    else:
        raise DataError(f"{where}: expected {{\"prompt\": ..., \"response\": ...}} or {{\"messages\": [...]}}, "
                        f"got the keys {sorted(row)}")
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict) or "role" not in message:
            raise DataError(f"{where}: message {i} has no 'role' (one of {', '.join(ROLES)})")
        role = message["role"]
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has the unknown role {role!r}: use one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: message {i} ({role}) has empty or missing content")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: message {i} ({role}) is not valid Unicode text (a lone surrogate escape "
                            "such as \\ud800)") from None
        if role == "system" and i > 1:
            raise DataError(f"{where}: message {i} is a system message; only the first message may be one")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation ends with a {messages[-1]['role']} message, not the "
                        "assistant's: there is no response to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path):
    """[(messages, row)] of a JSONL file; row keeps any other keys (the generator's "task", "words", ...)."""
    if not os.path.isfile(path):
        raise DataError(f"no data file {path}: write one (see the formats in chat.py's docstring), or "
                        "generate the TinyStories instructions with `python finetune.py --make_data`")
    rows = []
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        rows.append((conversation_of(row, f"{path}:{lineno}"), row))
    if not rows:
        raise DataError(f"{path} holds no conversations")
    return rows


def split_rows(rows, fraction, split_seed):
    """A seeded (train, val) split: every row goes to val with the same chance, the same way every run."""
    order = list(range(len(rows)))
    random.Random(split_seed).shuffle(order)
    n_val = max(1, round(fraction * len(rows)))
    if n_val >= len(rows):
        raise DataError(f"{len(rows)} conversations are too few to hold out {fraction:.0%} for validation: "
                        "give more data, or a val_data file")
    val = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def encode_rows(tok, rows, block_size):
    """[(ids, mask)] of the conversations that fit the model's context (block_size + 1 tokens: inputs and
    targets), and how many did not: a cut conversation would teach the model to stop mid-answer."""
    examples = [render_conversation(tok, messages) for messages, _ in rows]
    kept = [e for e in examples if len(e[0]) <= block_size + 1]
    return kept, len(examples) - len(kept)


def get_batch(examples, batch_size, generator, device, pad_token):
    """x, y (B, T): batch_size random conversations padded on the right to the longest; y is the next token
    where it is a response token, -100 on the prompts, the template and the padding."""
    picks = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
    T = max(len(examples[i][0]) for i in picks) - 1
    x = torch.full((batch_size, T), pad_token, dtype=torch.long)
    y = torch.full((batch_size, T), -100, dtype=torch.long)
    for b, i in enumerate(picks):
        ids, mask = examples[i]
        x[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[b, :len(ids) - 1] = torch.tensor(labels_of(ids, mask))
    return x.to(device), y.to(device)
