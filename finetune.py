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
Conversations are rendered by render_conversation (ChatML: <|im_start|>role\\n ... <|im_end|>), the one place
the template lives, used by training, the evaluation and sample.py --chat alike.

Settings are the globals below (configurator.py: config files, then --key=value). out_dir receives best/ and
last/ (adapter.safetensors for LoRA or model.safetensors for full fine-tuning, state.pt, config.json),
tokenizer.tiktoken (the base vocabulary plus the two chat tokens), log.jsonl, loss.png, eval.json, and
merged/ after --merge. Ctrl-C saves last/ before exiting; --init_from=resume continues.
"""
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, load_model

from configurator import ConfigError, configure, require_at_least, settings_of
from prepare import PrepareError
from sample import SampleError, find_checkpoint, load_for_inference
from tokenizer import Tokenizer, atomic_write
from train import (TrainError, append_log, batch_seed, catch_stop_signals, check_compatible, checkpoint_dir,
                   get_lr, load_training_state, make_optimizer, pick_device, pick_dtype, plot_loss_curve,
                   release_stop_signals, remove_stale_temporaries, save_checkpoint, truncate_log)

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


class FinetuneError(ValueError):
    pass


# --- the chat template ----------------------------------------------------------------------------------

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")


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
        add([start] + tok.encode_ordinary(message["role"] + "\n"), False)
        add(tok.encode_ordinary(message["content"]) + [end], message["role"] == "assistant")
        add(tok.encode_ordinary("\n"), False)
    if generation_prompt:
        add([start] + tok.encode_ordinary("assistant\n"), False)
    return ids, mask


def labels_of(ids, mask):
    """The next-token targets of ids[:-1]: ids[t + 1] where mask[t + 1] is 1, -100 (ignored) elsewhere."""
    return [token if trained else -100 for token, trained in zip(ids[1:], mask[1:])]


# --- data -----------------------------------------------------------------------------------------------

class DataError(ValueError):
    pass


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
        raise DataError(f"no data file {path}: write one (see the formats in finetune.py's docstring), or "
                        "generate the TinyStories instructions with `python finetune.py --make_data`")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark may lead the file
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start} of the line); "
                                "convert the file to UTF-8") from None
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


# --- instructions made from stories (in the spirit of TinyStories-Instruct) -----------------------------

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
    import numpy as np
    from prepare import read_txt, val_mask
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


# --- LoRA -----------------------------------------------------------------------------------------------

LORA_GROUPS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}
LORA_LAYERS = LORA_GROUPS["attn"] + LORA_GROUPS["mlp"]


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * B A dropout(x): a frozen nn.Linear plus a trainable update of rank r.
    A (r, in) starts random, B (out, r) at zero, so the adapted layer starts out equal to the base."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def merged(self) -> nn.Linear:
        """The plain nn.Linear with the update folded in: W + (alpha / r) B A."""
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.scaling * (self.lora_B @ self.lora_A))
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear


def lora_layer_names(spec):
    """"attn,mlp.c_fc" -> ["attn.c_attn", "attn.c_proj", "mlp.c_fc"]: the linear layers of each block to adapt."""
    names = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item not in LORA_GROUPS and item not in LORA_LAYERS:
            raise ConfigError(f"lora_targets: unknown layer {item!r}; choose among attn, mlp, {', '.join(LORA_LAYERS)}")
        names += [n for n in LORA_GROUPS.get(item, (item,)) if n not in names]
    if not names:
        raise ConfigError("lora_targets is empty: name at least one layer (e.g. attn,mlp)")
    return names


def add_lora(model, layer_names, r, alpha, dropout):
    """Freeze every weight of model and wrap the named linear layers of each block in LoRALinear."""
    if r < 1:
        raise ConfigError(f"lora_r must be at least 1, got {r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.transformer.h:
        for name in layer_names:
            parent_name, child = name.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    return model


def merge_lora(model):
    """Replace every LoRALinear of model by its merged nn.Linear: the plain GPT, adapter included."""
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for child, module in list(parent.named_children()):
                if isinstance(module, LoRALinear):
                    setattr(parent, child, module.merged())
    return model


def grow_vocab(model, n_vocab):
    """Give the token embedding (and an untied output layer) rows up to n_vocab, each new row the mean of the
    existing ones: a new token starts out as an average token, neither loud nor silent. Returns the old size."""
    old = model.config.vocab_size
    if n_vocab <= old:
        return old
    wte = model.transformer.wte.weight
    grown = nn.Embedding(n_vocab, wte.size(1), device=wte.device, dtype=wte.dtype)
    with torch.no_grad():
        grown.weight[:old] = wte
        grown.weight[old:] = wte.mean(dim=0)
    head = model.lm_head.weight
    model.lm_head = nn.Linear(head.size(1), n_vocab, bias=False, device=head.device, dtype=head.dtype)
    if model.config.tie_embeddings:
        model.lm_head.weight = grown.weight
    else:
        with torch.no_grad():
            model.lm_head.weight[:old] = head
            model.lm_head.weight[old:] = head.mean(dim=0)
    model.transformer.wte = grown
    model.config = replace(model.config, vocab_size=n_vocab)
    return old


def token_row_weights(model):
    """The weights with a row per token: the embedding, and the output layer when it is not tied to it."""
    if model.config.tie_embeddings:
        return {"transformer.wte.weight": model.transformer.wte.weight}
    return {"transformer.wte.weight": model.transformer.wte.weight, "lm_head.weight": model.lm_head.weight}


def train_new_rows_only(model, n_base):
    """Let the token rows from n_base on (the chat tokens) learn, and no other row: their gradient is zeroed.
    The optimizer must not decay these weights either (make_optimizer's no_decay)."""
    for weight in token_row_weights(model).values():
        weight.requires_grad_(True)
        keep = (torch.arange(weight.size(0), device=weight.device) >= n_base).to(weight.dtype)[:, None]
        weight.register_hook(lambda grad, keep=keep: grad * keep)


def token_row_moments(optimizer, model):
    """{index of a token-row weight in optimizer.state_dict()'s "state": that weight}."""
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    return {index[id(weight)]: weight for weight in token_row_weights(model).values() if id(weight) in index}


def compact_optimizer_state(optimizer, model, n_base):
    """optimizer.state_dict() with the token-row weights' Adam moments cut to the new rows: the base rows get
    no gradient and no decay, so their moments stay exactly zero, and a LoRA run's state.pt need not carry
    a vocabulary's worth of them (116 MB for GPT-2's at 288 wide). expand_optimizer_state puts them back."""
    state = optimizer.state_dict()
    packed = dict(state["state"])  # state_dict() shares the live tensors: replace, never modify, its entries
    for i in token_row_moments(optimizer, model):
        if i in packed:
            packed[i] = {k: v[n_base:].clone() if k in ("exp_avg", "exp_avg_sq") else v for k, v in packed[i].items()}
    return dict(state, state=packed)


def expand_optimizer_state(state, optimizer, model, n_base):
    """compact_optimizer_state undone: zero moments for the base rows (a full state passes unchanged)."""
    packed = dict(state["state"])
    for i, weight in token_row_moments(optimizer, model).items():
        moments = packed.get(i, {})
        if "exp_avg" in moments and moments["exp_avg"].size(0) == weight.size(0) - n_base:
            packed[i] = {k: torch.cat([v.new_zeros((n_base, *v.shape[1:])), v])
                         if k in ("exp_avg", "exp_avg_sq") else v for k, v in moments.items()}
    return dict(state, state=packed)


def adapter_tensors(model, n_base):
    """What a LoRA fine-tune changed, for adapter.safetensors: each lora_A and lora_B, and the new token rows
    (as "new_rows.<weight name>")."""
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters() if ".lora_" in name}
    for name, weight in token_row_weights(model).items():
        tensors[f"new_rows.{name}"] = weight[n_base:].detach().clone()
    return tensors


def load_adapter_tensors(model, tensors, n_base):
    """Copy adapter_tensors' output into a model prepared the same way (grown vocabulary, LoRA layers)."""
    params = dict(model.named_parameters())
    expected = {name for name in params if ".lora_" in name}
    expected |= {f"new_rows.{name}" for name in token_row_weights(model)}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise FinetuneError(f"the adapter does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}): "
                            "load it with the lora_targets and base model it was trained with")
    with torch.no_grad():
        for name, tensor in tensors.items():
            target = params[name[len("new_rows."):]][n_base:] if name.startswith("new_rows.") else params[name]
            if target.shape != tensor.shape:
                raise FinetuneError(f"adapter tensor {name} is {tuple(tensor.shape)}, the model's "
                                    f"{tuple(target.shape)}: was it trained with another lora_r or base model?")
            target.copy_(tensor)


# --- models: the base, and a fine-tuned run ---------------------------------------------------------------

def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_base(run_dir, which, device):
    """(model, tokenizer, config, sha256 of the weights file) of a pretrained (or fully fine-tuned) run."""
    path = find_checkpoint(run_dir, which)
    if os.path.isfile(os.path.join(path, "adapter.safetensors")):
        raise FinetuneError(f"{path} holds a LoRA adapter, not a whole model: merge it first "
                            f"(python finetune.py --out_dir={run_dir} --merge) and fine-tune {run_dir}/merged")
    model, tok, config = load_for_inference(run_dir, which, device)
    return model, tok, config, file_sha256(os.path.join(path, "model.safetensors"))


def load_lora_checkpoint(path, device="cpu", base_dir=None, base_which=None):
    """(model with its adapter, in eval mode; chat tokenizer; config) from a LoRA checkpoint directory (or a
    run directory: its best/) and the base model it was trained on: base_dir/base_which, or the run its
    config.json records. Refuses a base whose weights or tokenizer differ from those the adapter was
    trained on."""
    if not os.path.isfile(os.path.join(path, "adapter.safetensors")):
        path = find_checkpoint(path, "best")
    if not os.path.isfile(os.path.join(path, "adapter.safetensors")):
        raise FinetuneError(f"{path} holds no adapter.safetensors: it is not a LoRA fine-tune of finetune.py")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    base = config["finetune"]["base"]
    base_dir, base_which = base_dir or base["run_dir"], base_which or base["checkpoint"]
    model, base_tok, _, model_hash = load_base(base_dir, base_which, device)
    if model_hash != base["model_hash"] or base_tok.content_hash != base["tokenizer_hash"]:
        what = "weights" if model_hash != base["model_hash"] else "tokenizer"
        raise FinetuneError(f"the adapter in {path} was trained on another base model: the {what} of "
                            f"{find_checkpoint(base_dir, base_which)} differ from those it was trained on "
                            f"({base['run_dir']}/{base['checkpoint']}, model sha256 {base['model_hash'][:12]}, "
                            f"tokenizer {base['tokenizer_hash'][:12]}); use that base, or fine-tune again")
    tok = add_chat_tokens(base_tok)
    if tok.content_hash != config["tokenizer"]["content_hash"]:
        raise FinetuneError(f"the chat tokenizer rebuilt for {path} differs from the one it was trained with")
    n_base = grow_vocab(model, tok.n_vocab)
    lora = config["finetune"]["lora"]
    add_lora(model, lora["targets"], lora["r"], lora["alpha"], 0.0)
    load_adapter_tensors(model, load_file(os.path.join(path, "adapter.safetensors"), device=str(device)), n_base)
    return model.to(device).eval(), tok, config


def load_finetuned(run_dir, which, device):
    """(model, chat tokenizer, config) of a finetune.py run: LoRA (base + adapter) or full."""
    path = find_checkpoint(run_dir, which)
    if os.path.isfile(os.path.join(path, "adapter.safetensors")):
        return load_lora_checkpoint(path, device)
    return load_for_inference(run_dir, which, device)


# --- generation and the instruction-following evaluation ------------------------------------------------

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


def instruction_eval(model, tok, rows, plain=False):
    """Greedy replies to each instruction and whether they obey it. plain: the instruction as a bare document
    ("<|endoftext|>instruction\\n") for a base model that knows no template; replies then end at
    <|endoftext|>. Returns a summary and the replies."""
    if plain:
        prompts = [[tok.eot_token] + tok.encode_ordinary(messages[-2]["content"] + "\n") for messages, _ in rows]
        stop = tok.eot_token
    else:
        prompts = [render_conversation(tok, messages[:-1], generation_prompt=True)[0] for messages, _ in rows]
        stop = tok.special_tokens[IM_END]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # batches of prompts alike in length
    replies = [None] * len(prompts)
    for start in range(0, len(order), eval_batch_size):
        batch = order[start:start + eval_batch_size]
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


# --- training -------------------------------------------------------------------------------------------

def load_splits(block_size, tok):
    """Training and validation examples (ids, mask), and the validation rows for the instruction eval."""
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


def prepare_model(model, base_tok):
    """The base model and tokenizer made ready to fine-tune: chat tokens, and LoRA layers in lora mode.
    Returns (model, chat tokenizer, number of base token rows)."""
    tok = add_chat_tokens(base_tok)
    n_base = grow_vocab(model, tok.n_vocab)
    if mode == "lora":
        add_lora(model, lora_layer_names(lora_targets), lora_r, lora_alpha, lora_dropout)
        train_new_rows_only(model, n_base)
    elif mode != "full":
        raise ConfigError(f"mode={mode!r}: choose lora or full")
    return model, tok, n_base


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


def evaluate_instructions(model, tok, val_examples, val_rows, dev, autocast):
    """The fine-tuned model against its base on held-out data: response loss, and how often each obeys the
    generated instructions -- the base with the instruction as a plain document, the base with the chat
    template (its chat-token rows at their initial mean), the fine-tuned model. A table on stdout, all of it
    and some example replies in out_dir/eval.json."""
    pad_token = tok.eot_token if tok.eot_token is not None else 0
    base_chat_model, base_tok, _, _ = load_base(base_dir, base_checkpoint, dev)
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
    base_model, _, _, _ = load_base(base_dir, base_checkpoint, dev)
    started = time.time()
    results, replies = {}, {}
    for name, m, t, plain in (("base, plain prompt", base_model, base_tok, True),
                              ("base, chat template", base_chat_model, tok, False),
                              ("fine-tuned", model, tok, False)):
        results[name], replies[name] = instruction_eval(m, t, rows, plain)
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
    if not os.path.isfile(os.path.join(path, "adapter.safetensors")):
        raise FinetuneError(f"{path} holds no adapter.safetensors: --merge folds a LoRA fine-tune "
                            "(a full fine-tune is a whole model already)")
    model, tok, config = load_lora_checkpoint(path, dev)
    merge_lora(model)
    merged = dict(config, model=model.config.to_dict(), merged_from=path)
    save_checkpoint(out_dir, "merged", model, None, {"iter_num": config["iter_num"], "tokens_seen": 0,
                                                     "best_val_loss": config["best_val_loss"], "config": merged})
    print(f"merged {path} into {out_dir}/merged: python sample.py --out_dir={out_dir} --checkpoint=merged --chat")


def main():
    if make_data:
        write_instruct_data(stories, make_data_dir, max_chars, val_fraction, seed)
        return
    dev = pick_device(device, False, 0)
    device_type = "cuda" if dev.startswith("cuda") else dev
    dtype_name = pick_dtype(dtype, device_type)
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    if init_from not in ("scratch", "resume", "auto"):
        raise ConfigError(f"init_from={init_from!r}: choose scratch, resume or auto")
    require_at_least(1, batch_size=batch_size, eval_batch_size=eval_batch_size, eval_interval=eval_interval,
                     eval_iters=eval_iters, log_interval=log_interval,
                     gradient_accumulation_steps=gradient_accumulation_steps)
    if merge:
        merge_run(dev)
        return
    autocast = (torch.autocast(device_type=device_type, dtype=getattr(torch, dtype_name))
                if dtype_name != "float32" else nullcontext())

    base_model, base_tok, _, base_hash = load_base(base_dir, base_checkpoint, dev)
    model, tok, n_base = prepare_model(base_model, base_tok)
    model.train()
    block_size = model.config.block_size
    train_examples, val_examples, val_rows = load_splits(block_size, tok)
    pad_token = tok.eot_token if tok.eot_token is not None else 0
    lora = ({"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "targets": lora_layer_names(lora_targets)}
            if mode == "lora" else None)
    run_config = {"model": model.config.to_dict(),
                  "tokenizer": {"name": tok.name, "content_hash": tok.content_hash, "n_vocab": tok.n_vocab},
                  "finetune": {"mode": mode, "lora": lora,
                               "base": {"run_dir": base_dir, "checkpoint": base_checkpoint, "model_hash": base_hash,
                                        "tokenizer_hash": base_tok.content_hash, "vocab_size": n_base}},
                  "train": settings_of(globals())}
    optimizer = make_optimizer(model.parameters(), device_type, learning_rate, weight_decay, (beta1, beta2),
                               no_decay=token_row_weights(model).values() if mode == "lora" else ())

    iter_num, best_val_loss, tokens_seen = 0, float("inf"), 0
    scaler = torch.amp.GradScaler(device_type, enabled=dtype_name == "float16")
    last = checkpoint_dir(out_dir, "last")
    has_checkpoint = os.path.isfile(os.path.join(last, "state.pt"))
    if init_from == "resume" and not has_checkpoint:
        raise FinetuneError(f"no checkpoint to resume in {out_dir}: fine-tune with --init_from=scratch first")
    if init_from == "scratch" and has_checkpoint and not eval_only:
        raise FinetuneError(f"{out_dir} already holds a run: continue it with --init_from=resume, evaluate it "
                            "with --eval_only, or pick another --out_dir (nothing was overwritten)")
    if eval_only and not (has_checkpoint or os.path.isfile(os.path.join(out_dir, "best", "config.json"))):
        raise FinetuneError(f"no fine-tuned checkpoint in {out_dir} to evaluate: fine-tune first")
    if has_checkpoint and not eval_only:
        with open(os.path.join(last, "config.json")) as f:
            saved = json.load(f)
        check_compatible(saved, run_config, last)
        if saved["finetune"]["lora"] != lora or saved["finetune"]["base"]["model_hash"] != base_hash:
            raise FinetuneError(f"{last} was fine-tuned with other LoRA settings or another base model: use its "
                                "settings, or a new out_dir")
        if mode == "lora":
            load_adapter_tensors(model, load_file(os.path.join(last, "adapter.safetensors")), n_base)
        else:
            load_model(model, os.path.join(last, "model.safetensors"))
        state = load_training_state(last, optimizer, scaler, expand_optimizer_state=(
            lambda saved: expand_optimizer_state(saved, optimizer, model, n_base)) if mode == "lora" else None)
        iter_num, best_val_loss, tokens_seen = state["iter_num"], state["best_val_loss"], state["tokens_seen"]
        print(f"resuming from {last} at iteration {iter_num}")
        truncate_log(out_dir, iter_num, evaluates_again=iter_num % eval_interval == 0 or iter_num >= max_iters)
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
                "scaler": scaler.state_dict(), "config": dict(run_config, iter_num=iter_num,
                                                              best_val_loss=best_val_loss),
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

    stop_signal = catch_stop_signals()

    step_seconds, steps_timed = 0.0, 0  # since the last log line, evaluations left out
    while iter_num < max_iters and not eval_only:
        if iter_num % eval_interval == 0:
            evaluate_and_save()
        step_started = time.time()
        lr = get_lr(iter_num, learning_rate, min_lr, warmup_iters, lr_decay_iters or max_iters, decay_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [get_batch(train_examples, batch_size,
                             torch.Generator().manual_seed(batch_seed(seed, "train", iter_num, micro)), dev, pad_token)
                   for micro in range(gradient_accumulation_steps)]
        step_loss = backward_over(model, batches, scaler, autocast)
        step_tokens = sum(x.numel() for x, _ in batches)
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step_seconds, steps_timed = step_seconds + time.time() - step_started, steps_timed + 1
        if not math.isfinite(step_loss):
            raise FinetuneError(f"the loss is {step_loss} at iteration {iter_num}: fine-tuning diverged. Resume "
                                f"from the last checkpoint with a lower learning_rate (now {learning_rate})")
        iter_num += 1
        tokens_seen += step_tokens
        if iter_num % log_interval == 0 or iter_num == max_iters:
            ms = 1000 * step_seconds / steps_timed
            step_seconds, steps_timed = 0.0, 0
            print(f"iter {iter_num}: loss {step_loss:.4f}, lr {lr:.2e}, {ms:.0f} ms/iter")
            append_log(out_dir, {"iter": iter_num, "tokens": tokens_seen, "loss": step_loss, "lr": lr, "ms": ms})
        if stop_signal:
            save_checkpoint(out_dir, "last", model, optimizer, checkpoint_info(),
                            adapter_tensors(model, n_base) if mode == "lora" else None)
            print(f"stopped at iteration {iter_num}; saved {out_dir}/last. Continue with --init_from=resume")
            return
    release_stop_signals()
    if not eval_only:
        evaluate_and_save()
    model, tok, _ = load_finetuned(out_dir, "best", dev)  # the best checkpoint, as sample.py will load it
    evaluate_instructions(model, tok, val_examples, val_rows, dev, autocast)


if __name__ == "__main__":
    try:
        globals().update(configure(settings_of(globals()), sys.argv[1:], __file__))
        main()
    except (ConfigError, TrainError, SampleError, FinetuneError, PrepareError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
