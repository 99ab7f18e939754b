"""
LoRA: low-rank adapters on a frozen GPT, and the few token rows a fine-tune adds (the chat tokens). What
finetune.py trains in its default mode, what an adapter file holds, and how it folds back into the model.

    from lora import add_lora, lora_layer_names, merge_lora
    add_lora(model, lora_layer_names("attn,mlp"), r=8, alpha=16.0, dropout=0.0)  # only the adapters learn
    merge_lora(model)                                                           # plain nn.Linear layers again

A LoRALinear computes base(x) + (alpha / r) B A x, with A (r, in) and B (out, r): r (in + out) weights to
learn instead of in * out. B starts at zero, so the adapted model starts out equal to its base.
"""
import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import ConfigError
from files import CheckpointError

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
    """Replace every LoRALinear of model by its merged nn.Linear: the plain GPT, adapter included (the same
    model up to float rounding, one matrix product per layer instead of three). A plain model is left as it is."""
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
        raise CheckpointError(f"the adapter does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}): "
                            "load it with the lora_targets and base model it was trained with")
    with torch.no_grad():
        for name, tensor in tensors.items():
            target = params[name[len("new_rows."):]][n_base:] if name.startswith("new_rows.") else params[name]
            if target.shape != tensor.shape:
                raise CheckpointError(f"adapter tensor {name} is {tuple(tensor.shape)}, the model's "
                                      f"{tuple(target.shape)}: was it trained with another lora_r or base model?")
            target.copy_(tensor)
