"""
What int8 weights cost in quality: a trained run's val bits per byte with its own fp32 weights and with the
int8 ones sample.py --quantize=int8 decodes with (quantize.py), over the whole val split, and the share of
greedy tokens the int8 C++ step generates that equal the fp32 step's, after prompts taken from val stories.

    python bench/bench_quantize.py                                         # out/quickstart
    python bench/bench_quantize.py --out_dir=out/int8_15M --prompts=50 --new_tokens=64

The int8 bits/byte is the fp32 model's evaluation on the dequantised weights with each matrix's input rounded
to int8 as the step rounds it (quantize.py), which is what the int8 step computes (tests/test_quantize.py
holds them equal to 1e-5); the greedy tokens come from the C++ step itself.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from checkpoint import load_run  # noqa: E402
from data import TokenDataset  # noqa: E402
from machine import cpu_name  # noqa: E402
from quantize import quantize_model_  # noqa: E402
from training import split_bits_per_byte  # noqa: E402


def val_prompts(dataset, eot, n, length):
    """The first `length` tokens of the first n val stories long enough to have them, each after its <|eot|>."""
    tokens = dataset.splits["val"]
    starts = [0] + [i + 1 for i in (tokens == eot).nonzero()[0].tolist()]
    prompts = []
    for s in starts:
        ids = tokens[s:s + length].astype("int64")
        if len(ids) == length and eot not in ids:
            prompts.append(torch.from_numpy(ids)[None])
        if len(prompts) == n:
            break
    return prompts


def greedy(model, prompt, new_tokens):
    return model.generate(prompt, new_tokens, temperature=0)[0, prompt.size(1):]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out_dir", default="out/quickstart", help="a train.py run")
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--data_dir", default="", help="its prepared corpus (default: the one it trained on)")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--prompt_tokens", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=64)
    args = parser.parse_args()
    fp32, tok, config = load_run(args.out_dir, args.checkpoint)
    int8 = quantize_model_(load_run(args.out_dir, args.checkpoint)[0])
    dataset = TokenDataset(args.data_dir or config["train"]["data_dir"])
    print(f"{cpu_name()}, torch {torch.__version__}; {args.out_dir} ({args.checkpoint}): "
          f"{fp32.num_params(False) / 1e6:.2f}M parameters, vocabulary {fp32.config.vocab_size:,}; "
          f"int8 with a scale per {int8.int8_group} inputs")
    bpb_fp32 = split_bits_per_byte(fp32, dataset)
    bpb_int8 = split_bits_per_byte(int8, dataset)
    print(f"  val bits/byte, whole split: fp32 {bpb_fp32:.4f}, int8 {bpb_int8:.4f} "
          f"({(bpb_int8 / bpb_fp32 - 1) * 100:+.2f}%)")
    prompts = val_prompts(dataset, tok.eot_token, args.prompts, args.prompt_tokens)
    new_tokens = min(args.new_tokens, fp32.config.block_size - args.prompt_tokens)
    equal = identical = 0
    for prompt in prompts:
        a, b = greedy(fp32, prompt, new_tokens), greedy(int8, prompt, new_tokens)
        equal += int((a == b).sum())
        identical += bool(torch.equal(a, b))
    print(f"  greedy, {len(prompts)} val prompts of {args.prompt_tokens} tokens, {new_tokens} new tokens each: "
          f"{equal / (len(prompts) * new_tokens):.1%} of the int8 step's tokens equal the fp32 step's at the same "
          f"position; {identical}/{len(prompts)} continuations identical throughout")


if __name__ == "__main__":
    main()
