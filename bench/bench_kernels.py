"""
Our Triton kernels (triton_ops/) against PyTorch on one GPU, bf16, each printing the ratio measured in this run:

    python bench/bench_kernels.py                        # all three, on CUDA
    python bench/bench_kernels.py --only=attention       # or cross_entropy, or train
    python bench/bench_kernels.py --smoke                # tiny shapes on CPU in Triton's interpreter: checks
                                                         # that the script runs; its numbers mean nothing

attention      causal flash attention, forward + backward, TFLOP/s against F.scaled_dot_product_attention
               held to its flash backend; T in 256..2048, head size 64 and 128, B = 16384 / T and
               nh = 2048 / hs (16K tokens of a 2048-wide model, enough to fill an H100). FLOPs are counted as
               the flash-attention papers do: forward 4 * B * nh * T^2 * hs / 2 (causal), backward 2.5x that.
cross_entropy  the fused projection + loss against F.cross_entropy(x @ W.T, y), forward + backward: time, and
               peak memory above the inputs; V in {8192, 50257}, N in {8K, 32K, 64K}, d in {512, 768}.
train          a training step of config/tinystories.py (its model, micro-batch, bf16 autocast, fused AdamW,
               torch.compile as it sets) on random tokens, kernels='triton' against kernels='torch':
               tokens/s and peak memory.
Targets: attention >= 1.0x SDPA; cross-entropy <= 1/3 of the peak memory at no loss of speed.
"""
import argparse
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton_ops/ is imported

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from triton_ops.attention import flash_attention  # noqa: E402
from triton_ops.cross_entropy import linear_cross_entropy  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


# --- measuring ------------------------------------------------------------------------------------------

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn, device, warmup=3, reps=10):
    """Mean wall time of fn over reps calls, after warmup calls (which include autotuning and compiling)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps


def peak_bytes(fn, device):
    """Most memory allocated during fn beyond what was allocated before it (CUDA only; nan elsewhere)."""
    if device != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() - before


# --- attention ------------------------------------------------------------------------------------------

def sdpa_flash(q, k, v):
    if q.is_cuda:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def bench_attention(device, dtype, shapes):
    print("\nattention, forward + backward (TFLOP/s)")
    print(f"{'T':>6} {'hs':>4} {'B':>4} {'nh':>4} {'max |diff|':>11} {'SDPA flash':>11} {'ours':>8} {'ratio':>6}")
    for T, D, B, H in shapes:
        torch.manual_seed(0)
        # (B, T, nh, hs) storage seen as (B, nh, T, hs), as the model makes them
        q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
                   for _ in range(3))
        do = torch.randn_like(q)

        def output_and_grads(attend):
            o = attend(q, k, v)
            return (o, *torch.autograd.grad(o, (q, k, v), do))
        diff = max((a - b).abs().max().item()
                   for a, b in zip(output_and_grads(flash_attention), output_and_grads(sdpa_flash)))
        flops = 3.5 * 4 * B * H * T * T * D / 2
        rates = []
        for attend in (sdpa_flash, flash_attention):
            step = lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), do)  # noqa: E731
            rates.append(flops / seconds_per_call(step, device) / 1e12)
        print(f"{T:>6} {D:>4} {B:>4} {H:>4} {diff:>11.2e} {rates[0]:>11.1f} {rates[1]:>8.1f} "
              f"{rates[1] / rates[0]:>5.2f}x")


# --- fused linear + cross-entropy -----------------------------------------------------------------------

def torch_cross_entropy(x, w, y):
    return F.cross_entropy(x @ w.t(), y)


def bench_cross_entropy(device, dtype, shapes):
    print("\nlinear + cross-entropy, forward + backward")
    print(f"{'V':>6} {'N':>6} {'d':>4} {'ms torch':>9} {'ms ours':>8} {'speed':>6} "
          f"{'MiB torch':>10} {'MiB ours':>9} {'memory':>7} {'max |diff|':>11}")
    for V, N, d in shapes:
        torch.manual_seed(0)
        x = torch.randn(N, d, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(V, d, device=device, dtype=dtype) * 0.02).requires_grad_()
        y = torch.randint(0, V, (N,), device=device)
        def loss_and_grads(loss_fn):
            loss = loss_fn(x, w, y)
            return (loss, *torch.autograd.grad(loss, (x, w)))
        diff = max((a.float() - b.float()).abs().max().item()
                   for a, b in zip(loss_and_grads(linear_cross_entropy), loss_and_grads(torch_cross_entropy)))
        times, peaks = [], []
        for loss_fn in (torch_cross_entropy, linear_cross_entropy):
            step = lambda: torch.autograd.grad(loss_fn(x, w, y), (x, w))  # noqa: E731
            times.append(seconds_per_call(step, device))
            peaks.append(peak_bytes(step, device) / 2**20)
        print(f"{V:>6} {N:>6} {d:>4} {1e3 * times[0]:>9.2f} {1e3 * times[1]:>8.2f} {times[0] / times[1]:>5.2f}x "
              f"{peaks[0]:>10.0f} {peaks[1]:>9.0f} {peaks[1] / peaks[0]:>6.2f}x {diff:>11.2e}")


# --- a training step ------------------------------------------------------------------------------------

def tinystories_settings():
    settings = {}
    exec(open(os.path.join(ROOT, "config", "tinystories.py")).read(), {}, settings)
    return settings


def bench_train(device, dtype, smoke):
    s = tinystories_settings()
    dims = dict(n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"], block_size=s["block_size"],
                vocab_size=50257, dropout=s["dropout"], pos=s.get("pos", "learned"), norm=s.get("norm", "layernorm"),
                mlp=s.get("mlp", "gelu"))
    B, compile_model = s["batch_size"], s["compile"]
    if smoke:
        dims.update(n_layer=1, n_head=2, n_embd=64, block_size=32, vocab_size=101)
        B, compile_model = 2, False
    T = dims["block_size"]
    print(f"\ntraining step of config/tinystories.py: {dims}, micro-batch {B} x {T}, {dtype}, "
          f"compile={compile_model}")
    print(f"{'kernels':>8} {'tokens/s':>10} {'ms/step':>8} {'peak MiB':>9} {'loss':>8}")
    results = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(kernels=kernels, **dims)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda" or None)
        forward = torch.compile(model) if compile_model else model
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, dims["vocab_size"], (B, T + 1), generator=g).to(device)
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        losses = []

        def step():
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                _, loss = forward(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        seconds = seconds_per_call(step, device, reps=3 if smoke else 20)
        peak = peak_bytes(step, device) / 2**20
        results[kernels] = (B * T / seconds, peak)
        print(f"{kernels:>8} {B * T / seconds:>10,.0f} {1e3 * seconds:>8.1f} {peak:>9.0f} {losses[0].item():>8.4f}")
    (fast, fast_peak), (slow, slow_peak) = results["triton"], results["torch"]
    print(f"triton / torch: {fast / slow:.2f}x tokens/s, {fast_peak / slow_peak:.2f}x peak memory")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--only", choices=["attention", "cross_entropy", "train"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in Triton's interpreter")
    args = parser.parse_args()
    if args.smoke:
        device = "cpu"
        attention_shapes = [(40, 32, 1, 2)]
        cross_entropy_shapes = [(100, 64, 32)]
    else:
        if not torch.cuda.is_available():
            sys.exit("error: the kernels are benchmarked on a CUDA GPU (or try --smoke to check the script on CPU)")
        device = "cuda"
        attention_shapes = [(T, D, 16384 // T, 2048 // D) for D in (64, 128) for T in (256, 512, 1024, 2048)]
        cross_entropy_shapes = [(V, N, d) for V in (8192, 50257) for N in (8192, 32768, 65536) for d in (512, 768)]
        print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    dtype = torch.bfloat16
    if args.only in (None, "attention"):
        bench_attention(device, dtype, attention_shapes)
    if args.only in (None, "cross_entropy"):
        bench_cross_entropy(device, dtype, cross_entropy_shapes)
    if args.only in (None, "train"):
        bench_train(device, dtype, args.smoke)


if __name__ == "__main__":
    main()
