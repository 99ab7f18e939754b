"""
A model and its tokenizer as one GGUF file, the format llama.cpp runs, written by llama.cpp's own writer
(the gguf package). export.py --to=gguf calls it:

    python export.py --out_dir=out/quickstart --to=gguf --dest=model.gguf --gguf_type=q8_0

    from gguf_file import write_gguf
    write_gguf(model, tok, "model.gguf", "f16")

A GPT-2-style model (pos=learned, norm=layernorm, mlp=gelu) becomes llama.cpp's "gpt2" architecture, a
Llama-style one (pos=rope, norm=rmsnorm, mlp=swiglu) its "llama", or with qk_norm its "qwen3"; other options
are refused by name (gguf_architecture). Tensor names and metadata keys are the ones llama.cpp's
convert_hf_to_gguf.py writes for GPT2LMHeadModel, LlamaForCausalLM and Qwen3ForCausalLM. The tokenizer goes in
as GPT-2 byte-level BPE: our ranks, merges and special tokens, the GPT-2 pre-tokenizer, and for a chat model
the chat template with <|im_end|> ending a turn.
"""
import os
from typing import Dict, List, Tuple

import gguf
import numpy as np
import torch

from chat import IM_END, jinja_template
from files import atomic_path
from tokenizer import Tokenizer, byte_level_alphabet, byte_level_string, merges_of

GGUF_TYPES = ("f32", "f16", "q8_0")  # the type of the matrices; norms, biases, position embeddings stay f32
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
QUANT_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
               "q8_0": gguf.GGMLQuantizationType.Q8_0}
NORM_EPS = 1e-5  # model.py's LayerNorm and RMSNorm epsilon


class GGUFError(ValueError):
    """A model or destination that cannot be exported to GGUF: one line naming the option or path."""


# --- which llama.cpp architecture -----------------------------------------------------------------------

def gguf_architecture(config) -> str:
    """'gpt2', 'llama' or 'qwen3' for the model's options, or a GGUFError naming what llama.cpp lacks."""
    gpt2 = dict(pos="learned", norm="layernorm", mlp="gelu")
    llama = dict(pos="rope", norm="rmsnorm", mlp="swiglu")
    options = lambda names: {k: getattr(config, k) for k in names}  # noqa: E731
    if config.n_layer < 1:
        raise GGUFError(f"n_layer={config.n_layer}: llama.cpp runs models of one block or more")
    if options(gpt2) == gpt2 and not config.qk_norm:
        return "gpt2"
    if options(llama) == llama:
        if not config.qk_norm:
            return "llama"
        if not config.bias:
            return "qwen3"
        raise GGUFError("qk_norm=True with bias=True: llama.cpp's qwen3 (the architecture with qk_norm) has no "
                        "biases")
    if options(dict(gpt2, mlp="relu2")) == dict(gpt2, mlp="relu2"):
        raise GGUFError("mlp=relu2: llama.cpp's gpt2 architecture has only GELU (export to transformers "
                        "instead: --to=hf)")
    if options(gpt2) == gpt2:
        raise GGUFError("qk_norm=True with pos=learned, norm=layernorm: llama.cpp's gpt2 has no qk_norm")
    mixed = ", ".join(f"{k}={getattr(config, k)}" for k in ("pos", "norm", "mlp", "qk_norm"))
    raise GGUFError(f"no llama.cpp architecture has {mixed}: its gpt2 needs pos=learned, norm=layernorm, "
                    f"mlp=gelu; its llama and qwen3 (qk_norm=True) need pos=rope, norm=rmsnorm, mlp=swiglu")


# --- the weights under llama.cpp's names ----------------------------------------------------------------

def interleave_rotary_pairs(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The rows of q or k (C, ...) reordered within each head from our rotary layout, which rotates the pairs
    (i, i + hs/2), to the one llama.cpp's "llama" rotates, the adjacent pairs (2i, 2i + 1): what
    convert_hf_to_gguf.py does to a transformers Llama's q_proj and k_proj (and their biases). Row
    2i + t of a head is row t * hs/2 + i before. Its "qwen3" rotates our pairs and needs no change."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model, arch: str) -> Dict[str, torch.Tensor]:
    """Our weights under llama.cpp's tensor names, fp32, each (out, in) as PyTorch keeps it (the writer
    reverses shapes to ggml's order). Tied embeddings write no output.weight: llama.cpp then uses
    token_embd.weight."""
    c = model.config
    ours = {name: t.detach().float().cpu() for name, t in model.state_dict().items()}
    theirs = {"token_embd.weight": ours["transformer.wte.weight"],
              "output_norm.weight": ours["transformer.ln_f.weight"]}
    if not c.tie_embeddings:
        theirs["output.weight"] = ours["lm_head.weight"]
    if arch == "gpt2":  # llama.cpp's gpt2 loads every bias: a model trained without them gets zeros
        bias = lambda name, size: ours.get(name, torch.zeros(size))  # noqa: E731
        theirs["position_embd.weight"] = ours["transformer.wpe.weight"]
        theirs["output_norm.bias"] = bias("transformer.ln_f.bias", c.n_embd)
    for i in range(c.n_layer):
        p, b = f"transformer.h.{i}.", f"blk.{i}."
        theirs[b + "attn_norm.weight"] = ours[p + "ln_1.weight"]
        theirs[b + "attn_output.weight"] = ours[p + "attn.c_proj.weight"]
        theirs[b + "ffn_norm.weight"] = ours[p + "ln_2.weight"]
        theirs[b + "ffn_down.weight"] = ours[p + "mlp.c_proj.weight"]
        if arch == "gpt2":
            theirs[b + "attn_qkv.weight"] = ours[p + "attn.c_attn.weight"]  # (3C, C): q, k, v rows, as theirs
            theirs[b + "ffn_up.weight"] = ours[p + "mlp.c_fc.weight"]
            for mine, name, size in (("ln_1.bias", "attn_norm.bias", c.n_embd),
                                     ("attn.c_attn.bias", "attn_qkv.bias", 3 * c.n_embd),
                                     ("attn.c_proj.bias", "attn_output.bias", c.n_embd),
                                     ("ln_2.bias", "ffn_norm.bias", c.n_embd),
                                     ("mlp.c_fc.bias", "ffn_up.bias", c.mlp_hidden),
                                     ("mlp.c_proj.bias", "ffn_down.bias", c.n_embd)):
                theirs[b + name] = bias(p + mine, size)
            continue
        for kind in (("weight", "bias") if c.bias else ("weight",)):
            q, k, v = ours[p + f"attn.c_attn.{kind}"].chunk(3, dim=0)
            if arch == "llama":
                q, k = interleave_rotary_pairs(q, c.n_head), interleave_rotary_pairs(k, c.n_head)
            gate, up = ours[p + f"mlp.c_fc.{kind}"].chunk(2, dim=0)  # (2H, C): gate rows, then up rows
            theirs.update({b + f"attn_q.{kind}": q, b + f"attn_k.{kind}": k, b + f"attn_v.{kind}": v,
                           b + f"ffn_gate.{kind}": gate, b + f"ffn_up.{kind}": up})
        if c.bias:
            theirs[b + "attn_output.bias"] = ours[p + "attn.c_proj.bias"]
            theirs[b + "ffn_down.bias"] = ours[p + "mlp.c_proj.bias"]
        if c.qk_norm:
            theirs[b + "attn_q_norm.weight"] = ours[p + "attn.q_norm"]
            theirs[b + "attn_k_norm.weight"] = ours[p + "attn.k_norm"]
    return {name: t.contiguous() for name, t in theirs.items()}


def stored(name: str, tensor: torch.Tensor, gguf_type: str) -> Tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(data, type) as convert_hf_to_gguf.py stores a tensor: 1-D ones (norms, biases) and the position
    embeddings in f32, the other matrices in gguf_type, falling back to f16 where a row is not a whole number
    of q8_0's 32-value blocks."""
    qtype = QUANT_TYPES[gguf_type]
    if tensor.dim() == 1 or name == "position_embd.weight":
        qtype = gguf.GGMLQuantizationType.F32
    data = tensor.numpy()
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


# --- the tokenizer --------------------------------------------------------------------------------------

def vocabulary(tok: Tokenizer, n_vocab: int) -> Tuple[List[str], List[int]]:
    """The n_vocab token strings and types: a token's bytes in GPT-2's byte alphabet (as transformers' GPT-2
    tokenizer writes them), a special token as its text (CONTROL), and [PAD<id>] (UNUSED) for each row of a
    model's embedding no token uses, as convert_hf_to_gguf.py pads."""
    alphabet = byte_level_alphabet()
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for token, rank in tok.mergeable_ranks.items():
        tokens[rank], types[rank] = byte_level_string(token, alphabet), gguf.TokenType.NORMAL
    for text, i in tok.special_tokens.items():
        tokens[i], types[i] = text, gguf.TokenType.CONTROL
    return tokens, [int(t) for t in types]


def add_tokenizer(writer, tok: Tokenizer, n_vocab: int) -> None:
    """GPT-2 byte-level BPE with our ranks; <|endoftext|> opens and ends a document; a chat model's turn ends
    at <|im_end|> (its eos and eot, as in ChatML models' GGUFs) and its template is ours (chat.py)."""
    alphabet = byte_level_alphabet()
    tokens, types = vocabulary(tok, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for the GPT-2 pattern, tokenizer.GPT2_PATTERN
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{byte_level_string(a, alphabet)} {byte_level_string(b, alphabet)}"
                             for a, b in merges_of(tok)])
    writer.add_add_bos_token(False)  # a prompt is taken as given, as sample.py does
    if tok.eot_token is not None:
        writer.add_bos_token_id(tok.eot_token)
    end = tok.special_tokens.get(IM_END, tok.eot_token)  # llama.cpp also stops at the other (by its text)
    if end is not None:
        writer.add_eos_token_id(end)
    if IM_END in tok.special_tokens:
        writer.add_eot_token_id(tok.special_tokens[IM_END])
    template = jinja_template(tok)
    if template is not None:
        writer.add_chat_template(template)


# --- the file -------------------------------------------------------------------------------------------

def add_hyperparameters(writer, config, arch: str, gguf_type: str, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.mlp_hidden)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_head)
    if arch == "gpt2":
        writer.add_layer_norm_eps(NORM_EPS)
    else:
        writer.add_layer_norm_rms_eps(NORM_EPS)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.n_embd // config.n_head)


def check_gguf_dest(dest: str) -> None:
    """Refuse a dest that is a directory, or a file other than a GGUF file (which exporting would replace)."""
    if os.path.isdir(dest):
        raise GGUFError(f"--dest={dest} is a directory: a GGUF export is one file, e.g. --dest={dest}/model.gguf")
    if os.path.exists(dest):
        with open(dest, "rb") as f:
            if f.read(4) != b"GGUF":
                raise GGUFError(f"{dest} exists and is not a GGUF file, which exporting would replace: pick "
                                "another --dest, or delete it first")


def write_gguf(model, tok: Tokenizer, dest: str, gguf_type: str = "f16", name: str = "nanoslm") -> str:
    """Write model and tok to the file dest whole or not at all (a temporary file beside it, then a rename);
    returns llama.cpp's architecture name. A LoRA model must have its adapter merged first (lora.merge_lora)."""
    if gguf_type not in GGUF_TYPES:
        raise GGUFError(f"gguf_type={gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    arch = gguf_architecture(model.config)
    if tok.n_vocab > model.config.vocab_size:
        raise GGUFError(f"the tokenizer has {tok.n_vocab} tokens but the model only {model.config.vocab_size} rows")
    check_gguf_dest(dest)
    tensors = {n: stored(n, t, gguf_type) for n, t in gguf_tensors(model, arch).items()}
    with atomic_path(dest) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            add_hyperparameters(writer, model.config, arch, gguf_type, name)
            add_tokenizer(writer, tok, model.config.vocab_size)
            for tensor_name, (data, qtype) in tensors.items():
                writer.add_tensor(tensor_name, data, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return arch
