"""
Sampling speed on the CPU: model.generate against Hugging Face transformers' generate running the very same
weights (converted by export.py), measured in the same run. Greedy outputs must be identical.

    python bench/bench_sample.py                  # both models, batch 1 and 16, greedy and top-k/top-p
    python bench/bench_sample.py --models=15M --batches=1 --new_tokens=128
    python bench/bench_sample.py --isa=avx2       # the C++ step's AVX2 build, as an AVX2-only CPU runs it
    python bench/bench_sample.py --unpacked       # our weights left as separate tensors (no pack_weights_)
    python bench/bench_sample.py --torch_step     # our decoding step in PyTorch instead of the C++ one
    python bench/bench_sample.py --quantize=int8  # and the C++ step on int8 weights (quantize.py), batch 1
    python bench/bench_sample.py --models=15M,40M --batches=1 --quantize=int8 --peer=llama.cpp
                                                  # and llama.cpp on the same weights (F32 and Q8_0 GGUF files)

Models (Llama layout, random weights, tied 32,000-token embeddings, the shapes of llama2.c's stories15M and
stories42M): 15M = 6 layers, 6 heads, 288 wide; 40M = 8 layers, 8 heads, 512 wide. Prompt: 16 tokens.
Prefill (prompt processing) and decode (one token at a time) are timed separately; prefill is the time to the
first token, each library's call setup included (for transformers, a generate() of one new token), and
decode the rest (for transformers, a full generate() less that).

At batch 1 every decoded token reads all the weights once, so the rate at which this machine reads memory
bounds any fp32 implementation: the script measures it on a tensor of the model's size held in huge pages as
the packed weights are (torch.amax, all threads, best of 10) and prints the ceiling next to the speeds. With
--quantize=int8 it does the same for the int8 step's bytes (int8 values, a float scale per 32, the fp32 norms),
and reports the share of the int8 model's greedy tokens that equal the fp32 model's (random weights: a harder
test than a trained model's, whose top token usually leads by more).
"""
import argparse
import copy
import functools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import _nanoslm  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from export import llama_model  # noqa: E402
from machine import cpu_name  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from quantize import quantize_model_  # noqa: E402

MODELS = {
    "15M": dict(n_layer=6, n_head=6, n_embd=288),
    "40M": dict(n_layer=8, n_head=8, n_embd=512),
}
PROMPT_TOKENS = 16


def build(name, pack=True):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32000, block_size=512, pos="rope", norm="rmsnorm", mlp="swiglu",
                          **MODELS[name])).eval()
    with torch.no_grad():  # sharper logits than at init, so sampling is not uniform noise
        model.transformer.wte.weight.mul_(8)
    hf = llama_model(model)
    return (model.pack_weights_() if pack else model), hf  # packed as sample.py does after loading


def step_bytes(model):
    """The bytes one decoding step reads: every parameter once, int8 values and scales in place of the fp32
    matrices they stand for."""
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "weight" and getattr(module, "weight_int8", None) is not None:
                if module is model.transformer.wte:
                    continue  # a token reads one row of the embedding, not the whole table
                total += module.weight_int8.numel() + module.weight_scales.numel() * 4
            else:
                total += p.numel() * p.element_size()
    return total


def time_ours(model, prompt, new_tokens, sampling):
    kw = dict(temperature=1.0, top_k=40, top_p=0.9) if sampling else dict(temperature=0)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    stream = model.generate_stream(prompt, new_tokens, generator=g, **kw)
    tokens = [next(stream)]  # the prefill and the first token
    first = time.perf_counter()
    tokens += list(stream)
    end = time.perf_counter()
    return first - start, end - first, torch.cat([prompt] + [t[:, None] for t in tokens], dim=1)


def time_hf(hf, prompt, new_tokens, sampling):
    kw = dict(do_sample=True, top_k=40, top_p=0.9, temperature=1.0) if sampling else dict(do_sample=False)
    common = dict(eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    with torch.inference_mode():
        start = time.perf_counter()
        hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, **common, **kw)
        first = time.perf_counter()
        out = hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **common, **kw)
        end = time.perf_counter()
    prefill = first - start
    return prefill, (end - first) - prefill, out


def read_rate(n_bytes):
    """Bytes per second at which this machine reads a tensor of n_bytes (best of 10 full reads), held like the
    packed weights (GPT.pack_weights_): 4 KB pages would make the ceiling lower than what we reach."""
    data = torch.from_numpy(_nanoslm.weight_block(n_bytes // 4)).uniform_()
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        data.amax()
        best = min(best, time.perf_counter() - start)
    return n_bytes / best


def time_int8(fp32, args, fp32_greedy, fp32_rate, hf_rate):
    """Batch-1 decoding with int8 weights of the fp32 model, against its step and transformers measured just
    before (fp32_greedy: its batch-1 greedy output after the same prompt)."""
    model = quantize_model_(copy.deepcopy(fp32))
    if not args.unpacked:
        model.pack_weights_()
    # the C++ step, with --isa's kernels: not the copied fp32 model's (which --torch_step replaces)
    model.native_decoder = functools.partial(GPT.native_decoder, model, isa=args.isa)
    prompt = torch.randint(0, 32000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    rates = {}
    for sampling in (False, True):
        time_ours(model, prompt, 8, sampling)  # warm-up
        _, decode, out = time_ours(model, prompt, args.new_tokens, sampling)
        rates[sampling] = (args.new_tokens - 1) / decode
        if not sampling:
            same = (out == fp32_greedy)[0, PROMPT_TOKENS:].float().mean()
    n_bytes = step_bytes(model)
    ceiling = read_rate(n_bytes) / n_bytes
    print(f"  int8 weights ({args.quantize}, a scale per 32), batch 1: greedy {rates[False]:,.0f} t/s, top-k/p "
          f"{rates[True]:,.0f} t/s = {rates[False] / fp32_rate:.2f}x our fp32 step, {rates[False] / hf_rate:.2f}x "
          f"transformers' greedy; reads {n_bytes / 1e6:.0f} MB a token, so no int8 implementation decodes faster "
          f"than {ceiling:,.0f} t/s (ours: {rates[False] / ceiling:.0%} of that); greedy tokens equal to fp32's: "
          f"{same:.0%}")
    return rates[False]


def time_llama_cpp(model, args, fp32_rate, int8_rate):
    """llama.cpp's batch-1 greedy decode on GGUF files of model's weights (F32, Q8_0), with its KV cache in
    f32 as ours, against our fp32 step and (with --quantize) our int8 one."""
    import tempfile
    from gguf_file import write_gguf
    from llama_cpp_peer import decode
    from tokenizer import Tokenizer
    gpt2 = Tokenizer.gpt2()  # its first 32,000 tokens: a vocabulary the model's rows can carry
    tok = Tokenizer({t: r for t, r in gpt2.mergeable_ranks.items() if r < model.config.vocab_size}, {})
    prompt = torch.randint(0, 32000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))[0].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        for gguf_type, ours, label in (("f32", fp32_rate, "fp32 step"), ("q8_0", int8_rate, "int8 step")):
            path = os.path.join(tmp, f"m.{gguf_type}.gguf")
            write_gguf(model, tok, path, gguf_type)
            decode(path, prompt, 8, torch.get_num_threads())  # warm-up
            _, seconds, _ = decode(path, prompt, args.new_tokens, torch.get_num_threads())
            rate = (args.new_tokens - 1) / seconds
            versus = f"ours {ours:,.0f} t/s = {ours / rate:.2f}x" if ours else "(our int8: --quantize=int8)"
            print(f"  llama.cpp {gguf_type.upper()}, batch 1 greedy: {rate:,.0f} t/s; {label}: {versus}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--models", default="15M,40M")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--isa", default="", choices=[""] + _nanoslm.decode_instruction_sets(),
                        help="the instruction set of the C++ decoding step (default: the widest this CPU runs)")
    parser.add_argument("--unpacked", action="store_true",
                        help="leave our weights as separate tensors instead of packing them as sample.py does")
    parser.add_argument("--torch_step", action="store_true",
                        help="decode with model.py's PyTorch step, not the C++ one (csrc/decode.cpp)")
    parser.add_argument("--peer", default="", choices=["", "llama.cpp"],
                        help="also time llama.cpp (make llama) on GGUF files of the same weights: F32 against our "
                             "fp32 step, Q8_0 against our int8 one, batch-1 greedy decode")
    parser.add_argument("--quantize", default="", choices=["", "int8"],
                        help="also time the C++ step on int8 weights (quantize.py), batch 1, in the same run")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    step = "PyTorch" if args.torch_step else "C++ " + (args.isa or _nanoslm.decode_instruction_sets()[0])
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), transformers {transformers.__version__}; decoding step: {step}, weights "
          f"{'unpacked' if args.unpacked else 'packed'}; {args.new_tokens} new tokens after a "
          f"{PROMPT_TOKENS}-token prompt; tok/s counts every sequence of the batch")
    for name in args.models.split(","):
        model, hf = build(name, pack=not args.unpacked)
        if args.isa:
            model.native_decoder = functools.partial(GPT.native_decoder, model, isa=args.isa)
        if args.torch_step:
            model.native_decoder = lambda caches, isa="": None  # as where the extension does not apply
        print(f"\n{name} model ({model.num_params(False) / 1e6:.1f}M parameters)")
        hf_greedy_batch1 = None
        print(f"  {'batch':>5} {'mode':<8} {'ours prefill':>13} {'ours decode':>12} {'HF prefill':>11} "
              f"{'HF decode':>10} {'decode ratio':>12}")
        for batch in [int(b) for b in args.batches.split(",")]:
            prompt = torch.randint(0, 32000, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
            for sampling in (False, True):
                time_ours(model, prompt, 8, sampling)  # warm-up
                time_hf(hf, prompt, 8, sampling)
                p_ours, d_ours, out_ours = time_ours(model, prompt, args.new_tokens, sampling)
                p_hf, d_hf, out_hf = time_hf(hf, prompt, args.new_tokens, sampling)
                if not sampling:
                    assert torch.equal(out_ours, out_hf), "greedy outputs differ from transformers'"
                decoded = batch * (args.new_tokens - 1)
                prefilled = batch * PROMPT_TOKENS
                mode = "top-k/p" if sampling else "greedy"
                if batch == 1 and not sampling:
                    ours_greedy_batch1, hf_greedy_batch1 = decoded / d_ours, decoded / d_hf
                    greedy_batch1 = out_ours
                print(f"  {batch:>5} {mode:<8} {prefilled / p_ours:>9,.0f} t/s {decoded / d_ours:>8,.0f} t/s "
                      f"{prefilled / p_hf:>7,.0f} t/s {decoded / d_hf:>6,.0f} t/s {d_hf / d_ours:>11.2f}x")
        if hf_greedy_batch1:
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            ceiling = read_rate(weight_bytes) / weight_bytes
            print(f"  batch 1 reads all {weight_bytes / 1e6:.0f} MB of weights per token; this machine reads a tensor "
                  f"that size at {weight_bytes * ceiling / 1e9:.1f} GB/s, so no fp32 implementation decodes faster "
                  f"than {ceiling:,.0f} t/s = {ceiling / hf_greedy_batch1:.2f}x transformers' greedy (ours: "
                  f"{ours_greedy_batch1 / ceiling:.0%} of that)")
        int8_rate = None
        if args.quantize and hf_greedy_batch1:
            int8_rate = time_int8(model, args, greedy_batch1, ours_greedy_batch1, hf_greedy_batch1)
        if args.peer and hf_greedy_batch1:
            time_llama_cpp(model, args, ours_greedy_batch1, int8_rate)
    print("\ngreedy outputs identical to transformers': yes (asserted)")


if __name__ == "__main__":
    main()
