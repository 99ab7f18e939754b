"""
Our Triton kernels for CUDA: causal flash attention (attention.py) and the fused output projection +
cross-entropy (cross_entropy.py). model.py imports them only when it uses them (GPTConfig.kernels), so
nothing else needs triton installed.

    python -m pytest -q tests/test_kernels.py     # without a GPU: Triton's interpreter on CPU tensors
    python bench/bench_kernels.py                 # on a GPU: against PyTorch's SDPA and F.cross_entropy

With TRITON_INTERPRET=1 (set before this package is imported) the kernels run in Triton's interpreter, on
CPU tensors, one program at a time in numpy: how they are tested without a GPU.
"""
import os


def widen_bf16_dots_in_interpreter():
    """Triton 3.9's interpreter multiplies bf16 tiles as their raw uint16 bits (numpy has no bf16): make it
    multiply them as fp32, which is what a GPU's bf16 tensor cores compute (exact products, fp32 sums)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder
    if getattr(InterpreterBuilder.create_dot, "widens_bf16", False):
        return
    create_dot = InterpreterBuilder.create_dot

    def widened(self, a, b, d, *args):
        a, b = (self.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return create_dot(self, a, b, d, *args)
    widened.widens_bf16 = True
    InterpreterBuilder.create_dot = widened


if os.environ.get("TRITON_INTERPRET") == "1":
    widen_bf16_dots_in_interpreter()
