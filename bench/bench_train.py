"""
Training-step throughput and peak memory of our model against a nanoGPT-style reference written here,
same dimensions, batch, device and dtype; a full step is forward, backward and AdamW.

    python bench/bench_train.py                   # both shapes, CPU, fp32, all cores
    python bench/bench_train.py --shape=a --steps=10
    python bench/bench_train.py --device=cuda --dtype=bfloat16

Shapes: (a) 4 layers, 4 heads, 128 wide, GPT-2 vocabulary (50,257), T=256, B=8;
        (b) 6 layers, 6 heads, 288 wide, 8,192 vocabulary, T=256, B=8.
Each model runs in its own process, so peak memory (VmHWM on CPU, max allocated on CUDA) is its own.
First, both models are given the same weights and must give the same loss on the same batch; the timed
runs then start from each model's own initialisation (same shapes, same work). AdamW is fused for ours
(train.py's choice) and nanoGPT's default on the CPU (not fused) for the reference.
On the CPU it also prints where a step's time goes, measured in the same run: the matrix products alone,
at the machine's best fp32 torch.mm rate (a floor for any implementation whose products are no faster
than that) and timed one by one at their own shapes; attention alone (PyTorch's SDPA, which is flash
attention on the CPU, and a manual softmax(QK^T)V), forward and backward; and an AdamW step alone, fused
and not. --compile runs ours under torch.compile.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from machine import cpu_name  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

SHAPES = {
    "a": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=50257, block_size=256, batch_size=8),
    "b": dict(n_layer=6, n_head=6, n_embd=288, vocab_size=8192, block_size=256, batch_size=8),
}


# --- the reference: nanoGPT's model, written the way nanoGPT writes it -----------------------------------

class RefLayerNorm(nn.Module):
    def __init__(self, ndim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class RefAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class RefMLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class RefBlock(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1, self.attn = RefLayerNorm(n_embd), RefAttention(n_embd, n_head)
        self.ln_2, self.mlp = RefLayerNorm(n_embd), RefMLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, vocab_size, block_size):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([RefBlock(n_embd, n_head) for _ in range(n_layer)]), ln_f=RefLayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx, targets):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


# --- one measurement per process ------------------------------------------------------------------------

def build(which, shape):
    dims = {k: v for k, v in shape.items() if k != "batch_size"}
    if which == "ours":
        return GPT(GPTConfig(**dims))
    return RefGPT(**dims)


def make_optimizer(which, model, device):
    """AdamW with weight decay on matrices. nanoGPT fuses it on CUDA only; train.py fuses it on CPU too."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    fused = device.startswith("cuda") or (which == "ours" and device == "cpu")
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-4, betas=(0.9, 0.95), fused=fused or None)


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:  # the process's own high-water mark (ru_maxrss would carry over the parent's through fork + exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(which, shape_name, device, dtype, steps, compile=False):
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    model = build(which, shape).to(device)
    optimizer = make_optimizer(which, model, device)
    if compile:
        model = torch.compile(model)
    B, T = shape["batch_size"], shape["block_size"]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, shape["vocab_size"], (B, T + 1), generator=g).to(device) for _ in range(4)]
    autocast = torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype), enabled=dtype != "float32")

    def step(i):
        x, y = batches[i % 4][:, :-1].contiguous(), batches[i % 4][:, 1:].contiguous()
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(3):  # warm-up
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    loss.item()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"tok_per_s": steps * B * T / elapsed, "ms_per_step": 1000 * elapsed / steps,
            "peak_mb": peak_memory_mb(device)}


def check_same_loss(shape_name, device):
    """Same weights, same batch: the two models must agree (fp32), or the comparison means nothing."""
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    ours, ref = build("ours", shape).to(device), build("ref", shape).to(device)
    missing = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not missing.missing_keys or missing.missing_keys == ["lm_head.weight"], missing
    x = torch.randint(0, shape["vocab_size"], (shape["batch_size"], shape["block_size"] + 1), device=device)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    _, loss_ours = ours(x, y)
    _, loss_ref = ref(x, y)
    assert math.isclose(loss_ours.item(), loss_ref.item(), rel_tol=1e-5), (loss_ours.item(), loss_ref.item())
    return loss_ours.item()


def best_time(fn, repeats=5):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_bounds(shape):
    """Two floors under a step of these dimensions in fp32, from its matrix products alone: (GFLOP, seconds
    at the best rate of a large square torch.mm, seconds with each linear layer's forward and backward
    products timed alone at their own shapes). Attention's products (causal: the lower triangle) are counted
    at the square rate in both."""
    B, T, C, L, V = (shape[k] for k in ("batch_size", "block_size", "n_embd", "n_layer", "vocab_size"))
    N = B * T
    linears = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)] * L + [(C, V)]  # (in, out): c_attn ... lm_head
    linear_flops = sum(3 * 2 * N * n_in * n_out for n_in, n_out in linears)  # forward, dX, dW
    attention_flops = 3 * 2 * B * T * T * C * L
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    square_rate = 2 * n ** 3 / best_time(lambda: torch.mm(a, b))
    at_shapes = 0.0
    for n_in, n_out in sorted(set(linears)):
        x, w, g = torch.randn(N, n_in), torch.randn(n_out, n_in), torch.randn(N, n_out)
        at_shapes += linears.count((n_in, n_out)) * sum(best_time(f) for f in (
            lambda: torch.mm(x, w.t()), lambda: torch.mm(g, w), lambda: torch.mm(g.t(), x)))
    total = linear_flops + attention_flops
    return total / 1e9, total / square_rate, at_shapes + attention_flops / square_rate


def attention_times(shape):
    """Seconds of a step's causal attention alone (all layers, forward and backward): PyTorch's SDPA, and
    the manual softmax(QK^T / sqrt(d)) V with a mask."""
    B, T, C, H, L = (shape[k] for k in ("batch_size", "block_size", "n_embd", "n_head", "n_layer"))
    q, k, v = (torch.randn(B, H, T, C // H, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, T, C // H)
    mask = torch.ones(T, T, dtype=torch.bool).tril()

    def manual(q, k, v, is_causal):
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        return att.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v

    def fwd_bwd(attention):
        return lambda: attention(q, k, v, is_causal=True).backward(grad)
    return (L * best_time(fwd_bwd(F.scaled_dot_product_attention)), L * best_time(fwd_bwd(manual)))


def adamw_times(shape):
    """Seconds of one AdamW step over our model's parameters (gradients set), with each side's optimizer on
    the CPU (make_optimizer): ours fused, the reference's not."""
    times = []
    for which in ("ours", "ref"):
        model = build("ours", shape)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        times.append(best_time(make_optimizer(which, model, "cpu").step))
    return tuple(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--shape", choices=["a", "b", "all"], default="all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="ours under torch.compile")
    parser.add_argument("--worker", choices=["ours", "ref"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.shape, args.device, args.dtype, args.steps,
                                args.compile and args.worker == "ours")))
        return

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.device}, {args.dtype}, {args.steps} timed steps after 3 warm-up")
    for shape_name in (["a", "b"] if args.shape == "all" else [args.shape]):
        shape = SHAPES[shape_name]
        loss = check_same_loss(shape_name, args.device)
        results = {}
        for which in ("ref", "ours"):
            out = subprocess.run([sys.executable, __file__, f"--worker={which}", f"--shape={shape_name}",
                                  f"--device={args.device}", f"--dtype={args.dtype}", f"--steps={args.steps}"]
                                 + (["--compile"] if args.compile else []),
                                 capture_output=True, text=True, check=True)
            results[which] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"\nshape ({shape_name}) {shape}: same loss from same weights ({loss:.5f})")
        for which, name in (("ref", "nanoGPT-style reference"),
                            ("ours", "nanoslm model.py" + (", compiled" if args.compile else ""))):
            r = results[which]
            print(f"  {name:<26} {r['tok_per_s']:9,.0f} tok/s  {r['ms_per_step']:8.1f} ms/step  "
                  f"peak {r['peak_mb']:7.0f} MB")
        print(f"  ratio: {results['ours']['tok_per_s'] / results['ref']['tok_per_s']:.2f}x tokens/s, "
              f"{results['ours']['peak_mb'] / results['ref']['peak_mb']:.2f}x peak memory")
        if args.device == "cpu" and args.dtype == "float32":
            gflop, at_square_rate, at_shapes = matmul_bounds(shape)
            ref_s = results["ref"]["ms_per_step"] / 1000
            print(f"  bound: the step's matrix products are {gflop:.0f} GFLOP: {1000 * at_square_rate:.0f} ms at this "
                  f"machine's best fp32 torch.mm rate (a 2048 square), {1000 * at_shapes:.0f} ms timed at their own "
                  f"shapes; with everything else free, a step is at most {ref_s / at_square_rate:.2f}x / "
                  f"{ref_s / at_shapes:.2f}x the reference's")
            sdpa, manual = attention_times(shape)
            fused, unfused = adamw_times(shape)
            rest = results["ours"]["ms_per_step"] - 1000 * (at_shapes + sdpa + fused)
            print(f"  attention alone (all layers, forward + backward): {1000 * sdpa:.0f} ms in SDPA, "
                  f"{1000 * manual:.0f} ms manual; AdamW step alone: {1000 * fused:.1f} ms fused, "
                  f"{1000 * unfused:.1f} ms not ({unfused / fused:.1f}x); the rest of our step (norms, GELU, "
                  f"residuals, the loss's softmax, embeddings): {rest:.0f} ms")


if __name__ == "__main__":
    main()
