"""
Export a trained model and its tokenizer to Hugging Face transformers, or to one GGUF file for llama.cpp.

    python export.py --out_dir=out/quickstart --to=hf --dest=hf_model/
    python export.py --out_dir=out/quickstart --to=gguf --dest=model.gguf --gguf_type=q8_0

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("hf_model")   # offline, safetensors
    tokenizer = AutoTokenizer.from_pretrained("hf_model")

    llama-cli -m model.gguf -p "Once upon a time" -n 100       # or llama_cpp.Llama("model.gguf")

A GPT-2-style model (pos=learned, norm=layernorm, mlp=gelu or relu2) becomes a GPT2LMHeadModel; a Llama-style
one (pos=rope, norm=rmsnorm, mlp=swiglu) a LlamaForCausalLM, or with qk_norm a Qwen3ForCausalLM (Llama's layout
with RMSNorm on each head's queries and keys). Other combinations have no transformers class and are refused,
naming the option. --to=gguf writes llama.cpp's gpt2, llama or qwen3 architecture the same way (gguf_file.py;
mlp=relu2 has no llama.cpp equivalent), its matrices in f32, f16 or q8_0 (--gguf_type). A LoRA run of
finetune.py is exported with its adapter folded in, and a model with the chat tokens gets the chat template
and stops generating at <|im_end|>. transformers is needed for --to=hf (and in the tests), not to train or
sample.
"""
import os
import shutil
import sys
import tempfile

import torch

from chat import IM_END, jinja_template
from checkpoint import load_run
from configurator import configure, settings_of
from files import replace_directory, writing
from gguf_file import GGUF_TYPES, write_gguf
from lora import merge_lora
from tokenizer import EOT, Tokenizer, byte_level_alphabet, byte_level_string, merges_of

# --- settings -------------------------------------------------------------------------------------------
out_dir = "out/quickstart"  # the train.py run to export
checkpoint = "best"  # "best" or "last"
to = "hf"  # "hf" (Hugging Face transformers, a directory) or "gguf" (llama.cpp, one file)
dest = ""  # hf: a directory (default hf_model; an export there is replaced whole); gguf: a file (model.gguf)
gguf_type = "f16"  # --to=gguf: the matrices' type, "f32", "f16" or "q8_0" (norms and biases stay f32)
# --------------------------------------------------------------------------------------------------------


class ExportError(RuntimeError):
    pass


def architecture(config) -> str:
    """'gpt2', 'llama' or 'qwen3' for the model's options, or an error naming what has no equivalent."""
    gpt2 = dict(pos="learned", norm="layernorm")
    llama = dict(pos="rope", norm="rmsnorm", mlp="swiglu")
    if {k: getattr(config, k) for k in gpt2} == gpt2 and config.mlp in ("gelu", "relu2") and not config.qk_norm:
        return "gpt2"
    if {k: getattr(config, k) for k in llama} == llama:
        if not config.qk_norm:
            return "llama"
        if not config.bias:
            return "qwen3"
        raise ExportError("no transformers model has qk_norm with bias=True: Qwen3's MLP has no biases")
    mixed = ", ".join(f"{k}={getattr(config, k)}" for k in ("pos", "norm", "mlp", "qk_norm"))
    raise ExportError(f"no transformers model has {mixed}: GPT2LMHeadModel needs pos=learned, norm=layernorm, "
                      f"mlp=gelu or relu2; LlamaForCausalLM and Qwen3ForCausalLM (qk_norm=True) need pos=rope, "
                      f"norm=rmsnorm, mlp=swiglu")


def gpt2_model(model):
    """GPT2LMHeadModel with our weights. GPT-2's Conv1D layers store weights as (in, out): transposed.
    GPT-2 always has biases; a model trained without them gets zeros, which changes nothing."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.config
    hf_config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                           n_head=c.n_head, n_inner=c.mlp_hidden,
                           activation_function="relu2" if c.mlp == "relu2" else "gelu_new",
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                           tie_word_embeddings=c.tie_embeddings, bos_token_id=None, eos_token_id=None)
    hf = GPT2LMHeadModel(hf_config)
    theirs = {}
    for name, tensor in model.state_dict().items():  # the names are GPT-2's already
        if name.startswith("lm_head.") and c.tie_embeddings:
            continue
        if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            tensor = tensor.t()
        theirs[name] = tensor.contiguous()
    target = hf.state_dict()
    for name in target:
        if name not in theirs and name.endswith(".bias") and not name.endswith(".attn.bias"):
            theirs[name] = torch.zeros_like(target[name])
    return load_exactly(hf, theirs)


def llama_model(model):
    """LlamaForCausalLM (Qwen3ForCausalLM with qk_norm) with our weights: c_attn splits into q/k/v, c_fc into
    gate/up (in that order). Our rotary embedding rotates (x[i], x[i + hs/2]) pairs, the layout transformers'
    Llama and Qwen3 use; Qwen3 normalises each head's q and k before rotating them, as we do."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
    c = model.config
    shared = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
                  num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
                  max_position_embeddings=c.block_size, rms_norm_eps=1e-5, rope_theta=c.rope_theta,
                  tie_word_embeddings=c.tie_embeddings, attention_bias=c.bias, hidden_act="silu",
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if c.qk_norm:
        hf = Qwen3ForCausalLM(Qwen3Config(head_dim=c.n_embd // c.n_head, use_sliding_window=False, **shared))
    else:
        hf = LlamaForCausalLM(LlamaConfig(mlp_bias=c.bias, **shared))
    ours = model.state_dict()
    theirs = {"model.embed_tokens.weight": ours["transformer.wte.weight"],
              "model.norm.weight": ours["transformer.ln_f.weight"]}
    if not c.tie_embeddings:
        theirs["lm_head.weight"] = ours["lm_head.weight"]
    for i in range(c.n_layer):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        theirs[q + "input_layernorm.weight"] = ours[p + "ln_1.weight"]
        theirs[q + "post_attention_layernorm.weight"] = ours[p + "ln_2.weight"]
        if c.qk_norm:
            theirs[q + "self_attn.q_norm.weight"] = ours[p + "attn.q_norm"]
            theirs[q + "self_attn.k_norm.weight"] = ours[p + "attn.k_norm"]
        for kind in (["weight", "bias"] if c.bias else ["weight"]):
            qkv = ours[p + f"attn.c_attn.{kind}"].chunk(3, dim=0)
            for part, proj in zip(qkv, ("q_proj", "k_proj", "v_proj")):
                theirs[q + f"self_attn.{proj}.{kind}"] = part
            theirs[q + f"self_attn.o_proj.{kind}"] = ours[p + f"attn.c_proj.{kind}"]
            gate, up = ours[p + f"mlp.c_fc.{kind}"].chunk(2, dim=0)
            theirs[q + f"mlp.gate_proj.{kind}"] = gate
            theirs[q + f"mlp.up_proj.{kind}"] = up
            theirs[q + f"mlp.down_proj.{kind}"] = ours[p + f"mlp.c_proj.{kind}"]
    return load_exactly(hf, {k: v.contiguous() for k, v in theirs.items()})


def load_exactly(hf, state):
    """Load state into hf; every weight of hf must come from our model (buffers excepted)."""
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))
               and not (m == "lm_head.weight" and hf.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportError(f"weight mapping is incomplete: missing {missing}, unexpected {unexpected}")
    if hf.config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


def hf_tokenizer(tok: Tokenizer):
    """A Hugging Face `tokenizers` byte-level BPE giving the same ids as tok (the GPT-2 pattern, our ranks,
    our special tokens)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    alphabet = byte_level_alphabet()
    vocab = {byte_level_string(token, alphabet): rank for token, rank in tok.mergeable_ranks.items()}
    merges = [(byte_level_string(a, alphabet), byte_level_string(b, alphabet)) for a, b in merges_of(tok)]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    for text, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]):
        hf.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        if hf.token_to_id(text) != i:
            raise ExportError(f"special token {text!r} got id {hf.token_to_id(text)} instead of {i}")
    return hf


def check_dest(dest_dir, run_dir=None):
    """Refuse a dest whose replacement would destroy something other than a previous export."""
    target = os.path.realpath(dest_dir)
    protected = ([(run_dir, f"the run {run_dir}")] if run_dir else []) + [(os.getcwd(), "the working directory")]
    for inside, name in protected:
        if os.path.commonpath([os.path.realpath(inside), target]) == target:
            raise ExportError(f"--dest={dest_dir} holds {name}, which exporting there would delete: "
                              "pick a new directory")
    if os.path.exists(dest_dir) and not os.path.isdir(dest_dir):
        raise ExportError(f"{dest_dir} is a file, not a directory to replace: pick another --dest")
    previous_export = all(os.path.isfile(os.path.join(dest_dir, f)) for f in ("config.json", "tokenizer.json"))
    if os.path.isdir(dest_dir) and os.listdir(dest_dir) and not previous_export:
        raise ExportError(f"{dest_dir} exists and is not an export (no config.json and tokenizer.json): pick "
                          "another --dest, or empty it first")


def export_hf(model, tok: Tokenizer, dest_dir: str, run_dir=None):
    """Write dest_dir whole or not at all: into a temporary sibling directory, then swapped in."""
    dest_dir = os.path.normpath(dest_dir)
    check_dest(dest_dir, run_dir)
    from transformers import PreTrainedTokenizerFast
    hf_model = gpt2_model(model) if architecture(model.config) == "gpt2" else llama_model(model)
    special = dict(eos_token=EOT, bos_token=EOT, pad_token=EOT, unk_token=None) if EOT in tok.special_tokens else {}
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer(tok), clean_up_tokenization_spaces=False,
                                     model_max_length=model.config.block_size, **special)
    hf_tok.chat_template = jinja_template(tok)
    stops = [tok.special_tokens[t] for t in (IM_END, EOT) if t in tok.special_tokens]
    if stops:  # a chat reply ends at <|im_end|>, a document at <|endoftext|>
        hf_model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        hf_model.generation_config.pad_token_id = tok.eot_token if tok.eot_token is not None else stops[0]
    parent = os.path.dirname(os.path.abspath(dest_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(dest_dir)}.tmp")
    try:
        with writing(dest_dir, "Nothing there was changed: free some space and export again"):
            hf_model.save_pretrained(tmp, safe_serialization=True)
            hf_tok.save_pretrained(tmp)
        replace_directory(tmp, dest_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return hf_model, hf_tok


def main():
    if to not in ("hf", "gguf"):
        raise ExportError(f"to={to!r}: the only export formats are 'hf' (Hugging Face transformers) and 'gguf' "
                          f"(llama.cpp)")
    if to == "gguf" and gguf_type not in GGUF_TYPES:
        raise ExportError(f"gguf_type={gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    if to == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ExportError("export needs transformers: pip install transformers") from None
    model, tok, _ = load_run(out_dir, checkpoint)
    merge_lora(model)  # a LoRA run: its base with the adapter folded in
    size = f"{model.num_params(False) / 1e6:.2f}M parameters, {tok.n_vocab:,}-token tokenizer"
    if to == "gguf":
        path = dest or "model.gguf"
        arch = write_gguf(model, tok, path, gguf_type, name=os.path.basename(os.path.normpath(out_dir)))
        print(f"wrote {path} ({arch}, {gguf_type}: {size}). Run it with llama.cpp: llama-cli -m {path}, "
              f"or llama_cpp.Llama({path!r}).")
        return
    path = dest or "hf_model"
    export_hf(model, tok, path, out_dir)
    print(f"wrote {os.path.normpath(path)}/ ({architecture(model.config)}: {size}). Load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({path!r}) and AutoTokenizer.from_pretrained({path!r}).")


if __name__ == "__main__":
    try:
        globals().update(configure(settings_of(globals()), sys.argv[1:], __file__))
        main()
    except (ExportError, OSError, ValueError) as e:  # ValueError: ConfigError, CheckpointError
        sys.exit(f"error: {e}")
