"""
Quality per minute: three recipes trained one after another for the same wall-clock budget on the bundled
TinyStories sample, scored the same way -- val bits per byte on the same held-out stories -- with a plot of
val bits/byte against wall-clock and one fixed-seed sample from each.

    python bench/bench_quality.py                     # 10 minutes a recipe, all cores (30 minutes in all)
    python bench/bench_quality.py --minutes=4.5       # the quickstart's budget
    python bench/bench_quality.py --report_only       # the table, plot and samples of the finished runs

The recipes (each one train.py run with --max_time=minutes, so its learning rate ends decayed in the budget):
  nanogpt   nanoGPT's CPU recipe from its README (config/train_shakespeare_char.py with --device=cpu
            --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --dropout=0.0), on GPT-2's
            vocabulary: learning rate 1e-3 to 1e-4, beta2 0.99, 100 warmup steps, weight decay 0.1. Its model
            is ours with pos=learned, norm=layernorm, mlp=gelu, no biases, tied embeddings, which
            bench/bench_train.py checks gives nanoGPT's loss on the same weights; it runs in our train.py,
            whose fused AdamW makes its steps faster than in nanoGPT's own loop, never slower.
  previous  config/quickstart_gpt2.py, the quickstart recipe before the ablations of docs/ablate.md.
  default   config/cpu_10min.py: today's recipe, config/quickstart.py's, as configured for 10 minutes.

Scores: the curve is train.py's own evaluation (eval_iters fixed batches of the val split); the final score
is the whole val split read once in windows of the model's context, every token scored once -- the same
text for every recipe, whatever its vocabulary. Runs go to out/bench_quality/<recipe>; a finished run is
not trained again (delete its directory to retrain), an interrupted one continues.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from checkpoint import read_log  # noqa: E402
from machine import cpu_name  # noqa: E402
from training import bundled_data_dir, final_bits_per_byte  # noqa: E402

NANOGPT = ["--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0",
           "--bias=False", "--pos=learned", "--norm=layernorm", "--mlp=gelu", "--tie_embeddings=True",
           "--optim=adamw", "--learning_rate=1e-3", "--min_lr=1e-4", "--beta1=0.9", "--beta2=0.99",
           "--warmup_iters=100", "--weight_decay=0.1", "--grad_clip=1.0", "--gradient_accumulation_steps=1",
           "--eval_iters=20", "--eval_interval=250", "--log_interval=50", "--device=cpu", "--dtype=float32"]
RECIPES = {  # name: (train.py arguments, the vocabulary its data is tokenized with; 0: GPT-2's)
    "nanogpt": (NANOGPT, 0),
    "previous": (["config/quickstart_gpt2.py"], 4096),
    "default": (["config/cpu_10min.py"], 4096),
}
PROMPT = "Once upon a time"


def train(recipe, run_dir, data_dir, minutes):
    """One train.py run of the recipe for minutes of wall-clock (continued if it was stopped part-way)."""
    args, _ = RECIPES[recipe]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args, f"--data_dir={data_dir}",
           f"--out_dir={run_dir}", f"--max_time={minutes}", "--init_from=auto"]
    print(f"\n== {recipe}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True)


def sample(run_dir, max_new_tokens):
    """One sample from run_dir's final model: the fixed prompt, seed 1337, sample.py's defaults otherwise."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={run_dir}",
                           "--checkpoint=last", f"--start={PROMPT}", "--num_samples=1", "--seed=1337",
                           f"--max_new_tokens={max_new_tokens}", "--device=cpu"],
                          capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def plot(results, path, minutes):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        evals = [e for e in r["curve"] if e["iter"] > 0]
        ax.plot([e["time"] / 60 for e in evals], [e["val_bpb"] for e in evals], "o-", ms=3,
                label=f"{r['recipe']}: {r['whole_val_bpb']:.3f} at the end")
    ax.set_xlabel("wall-clock (minutes)")
    ax.set_ylabel("val bits per byte")
    ax.set_title(f"three recipes, {minutes:g} minutes each, bundled TinyStories, {torch.get_num_threads()} threads")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each recipe")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="which, comma-separated")
    parser.add_argument("--out_dir", default="out/bench_quality")
    parser.add_argument("--data_root", default="data")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="length of each sample")
    parser.add_argument("--report_only", action="store_true", help="train nothing; report the finished runs")
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or args.minutes <= 0:
        sys.exit(f"error: recipes are {', '.join(RECIPES)} (got {', '.join(unknown) or args.recipes}); "
                 f"minutes must be positive")
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.minutes:g} minutes a recipe")

    results = []
    for recipe in recipes:
        run_dir = os.path.join(args.out_dir, recipe)
        data_dir = bundled_data_dir(args.data_root, RECIPES[recipe][1])
        if not args.report_only:
            train(recipe, run_dir, data_dir, args.minutes)
        if not os.path.isdir(os.path.join(run_dir, "last")):
            print(f"{recipe}: not trained yet")
            continue
        curve = [e for e in read_log(run_dir) if "val_bpb" in e]
        results.append({"recipe": recipe, "iters": curve[-1]["iter"], "tokens": curve[-1]["tokens"],
                         "minutes": curve[-1]["time"] / 60, "train_py_val_bpb": curve[-1]["val_bpb"],
                         "whole_val_bpb": final_bits_per_byte(run_dir),
                         "sample": sample(run_dir, args.max_new_tokens), "curve": curve})
    if not results:
        return

    print(f"\n| recipe | iterations | tokens | minutes | val bpb (train.py) | val bpb (whole split) | "
          f"vs {results[0]['recipe']} |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['recipe']} | {r['iters']:,} | {r['tokens'] / 1e6:.2f}M | {r['minutes']:.1f} | "
              f"{r['train_py_val_bpb']:.4f} | {r['whole_val_bpb']:.4f} | "
              f"{r['whole_val_bpb'] / results[0]['whole_val_bpb']:.3f}x |")
    for r in results:
        print(f"\n--- {r['recipe']} (seed 1337) ---\n{r['sample']}")
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out_dir, "bpb_vs_time.png"), args.minutes)
    print(f"\nwrote {args.out_dir}/results.json and bpb_vs_time.png")


if __name__ == "__main__":
    main()
