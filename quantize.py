"""
Int8 for sampling on the CPU, as llama.cpp's Q8_0: every matrix the decoding step reads (attention, MLP, the
output head, and the token embedding, whose one row a token is dequantised on lookup) held as symmetric int8
with one float32 scale per group of 32 (or 64) inputs of a row, quantised when the model is loaded; and each
matrix-vector product's input vector quantised the same way as the step computes it, so the products are
int8 x int8 dot products in integers, scaled once a group.

    python sample.py --quantize=int8
    python bench/bench_quantize.py --out_dir=out/quickstart    # val bits/byte and greedy tokens against fp32
    python bench/bench_sample.py --quantize=int8               # speed against fp32 and transformers

Decoding one sequence reads every weight once a token, so its speed is the rate at which the machine reads
them: int8 values are a quarter of fp32's bytes (with a 4-byte scale per group, 1.125 bytes a weight at
groups of 32, 1.0625 at 64). The C++ step (csrc/decode.cpp) reads the int8 values and scales as they are;
with int8 inputs too, a product of 32 weights is a handful of integer instructions where an int8 x fp32 one
converted each weight to a float first. Norms, attention, the residual stream and the KV cache stay fp32.

Everything else runs the fp32 model on the dequantised weights (q * scale), which this module puts in place
of the originals, with each quantised matrix's input rounded to its int8 values on the way in (a forward
pre-hook): the prompt's prefill, batched decoding, the probability table, and PyTorch where the extension is
missing. That is also the reference the C++ step is tested against (the same numbers in fp32), and what the
quality bench evaluates. (The loss path, model(idx, targets), reads lm_head's weight without calling it, so
it would skip lm_head's input rounding: a quantised model is for sampling, not training.)
"""
import torch
import torch.nn.functional as F
from torch import nn

from model import one_block
from system import native

_nanoslm = native(required=False)
GROUPS = (32, 64)  # the group sizes the C++ step's kernels are built for


def quantize_int8(w, group: int = 32):
    """w (n_out, n_in) -> (q (n_out, n_in) int8, scales (n_out, ceil(n_in / group)) float32), symmetric per
    group of `group` inputs of a row: scale = max |w| / 127 and q = round(w / scale), so every group's largest
    weight is exact and every other within half a scale. A row's last group may be shorter."""
    if group not in GROUPS:
        raise ValueError(f"group={group}: the int8 kernels take groups of {' or '.join(map(str, GROUPS))} inputs")
    n_out, n_in = w.shape
    n_groups = -(-n_in // group)
    padded = F.pad(w.detach().float(), (0, n_groups * group - n_in)).view(n_out, n_groups, group)
    scales = padded.abs().amax(dim=-1) / 127  # (n_out, n_groups)
    q = torch.round(padded / scales.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).clamp_(-127, 127)
    return q.to(torch.int8).view(n_out, -1)[:, :n_in].contiguous(), scales.contiguous()


def dequantize_int8(q, scales, group: int = 32):
    """The float32 weights (n_out, n_in) that q and scales stand for: q * scale of its group."""
    n_in = q.size(1)
    return q.float() * scales.repeat_interleave(group, dim=1)[:, :n_in]


def quantize_inputs(x, group: int = 32):
    """x (..., n_in) -> the same, each group of `group` inputs of a row replaced by the int8 values times the
    scale that quantize_int8 gives it: what the C++ step multiplies the int8 weights with."""
    q, scales = quantize_int8(x.reshape(-1, x.size(-1)), group)
    return dequantize_int8(q, scales, group).view(x.shape).to(x.dtype)


def matrices(model):
    """The modules whose weight the decoding step reads as a matrix, in the order it reads them: each block's
    c_attn, attn.c_proj, c_fc, mlp.c_proj, then lm_head; and the embedding where it is not lm_head's weight."""
    found = [m for block in model.transformer.h for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc,
                                                           block.mlp.c_proj)]
    found.append(model.lm_head)
    if model.transformer.wte.weight is not model.lm_head.weight:
        found.append(model.transformer.wte)
    return found


@torch.no_grad()
def quantize_model_(model, group: int = 32):
    """Quantise model's matrices (see matrices()) in place: each module gets buffers weight_int8 and
    weight_scales (not saved with the model), its weight becomes the dequantised values, and each linear one
    rounds its input with quantize_inputs (a forward pre-hook), so every fp32 path computes what the int8 step
    does. model.int8_group records the group size. Returns model.

    A LoRA fine-tune must have its adapters merged first (lora.merge_lora): an adapter's update would be
    left out of the int8 weights."""
    if getattr(model, "int8_group", 0):
        raise ValueError(f"the model is already quantised (groups of {model.int8_group})")
    modules = matrices(model)
    wrapped = [type(m).__name__ for m in modules if type(m) not in (nn.Linear, nn.Embedding)]
    if wrapped:
        raise ValueError(f"cannot quantise {wrapped[0]} layers: merge LoRA adapters into the weights first")
    if any(m.weight.device.type != "cpu" for m in modules):
        raise ValueError("int8 weights are for the CPU decoding step: load the model on the CPU (--device=cpu)")
    done = {}  # a weight shared by two modules (tied embeddings) is quantised once
    for m in modules:
        if id(m.weight) not in done:
            q, scales = quantize_int8(m.weight, group)
            m.weight.copy_(dequantize_int8(q, scales, group))
            done[id(m.weight)] = (q, scales)
    packed = dict(zip(done, pack(list(done.values()))))
    for m in modules:
        q, scales = packed[id(m.weight)]
        m.register_buffer("weight_int8", q, persistent=False)
        m.register_buffer("weight_scales", scales, persistent=False)
        if isinstance(m, nn.Linear):
            m.register_forward_pre_hook(lambda module, args: (quantize_inputs(args[0], group),) + args[1:])
    if model.transformer.wte.weight is model.lm_head.weight:  # the embedding reads lm_head's int8 rows
        model.transformer.wte.register_buffer("weight_int8", model.lm_head.weight_int8, persistent=False)
        model.transformer.wte.register_buffer("weight_scales", model.lm_head.weight_scales, persistent=False)
    model.int8_group = group
    return model


def pack(pairs):
    """[(q, scales)] moved into one block of memory, in that order, aligned to 2 MB and backed by huge pages
    where the system allows (model.one_block, as GPT.pack_weights_ does for fp32 weights: a token reads them
    all, and 4 KB pages cost TLB misses). Unchanged without the extension."""
    if _nanoslm is None:
        return pairs
    copies = one_block([t for pair in pairs for t in pair])
    return list(zip(copies[0::2], copies[1::2]))
