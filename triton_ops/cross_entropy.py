"""
The output projection and cross-entropy fused, for CUDA: the mean loss of the logits x @ weight^T against
targets, without ever holding all (N, V) logits.

    from triton_ops.cross_entropy import linear_cross_entropy
    loss = linear_cross_entropy(x, weight, targets)   # x (N, d), weight (V, d), targets (N,); -100 is ignored

    python -m pytest -q tests/test_kernels.py -k cross_entropy   # CPU: Triton's interpreter against the reference
    python bench/bench_kernels.py --only=cross_entropy           # GPU: time and peak memory against F.cross_entropy

The rows go through in chunks. For each chunk a matmul makes its logits; one Triton program per row finds
the row's logsumexp and its loss, then overwrites the logits in place with their gradient,
softmax - onehot(target) (zero for an ignored target); two more matmuls turn that into the chunk's rows of
dX and its share of dW (accumulated in fp32). Memory holds one chunk of logits instead of all of them. The
gradients are computed in the forward, while the logits are at hand; the loss is a scalar, so the backward
only scales them, by the incoming gradient over the number of counted targets. (Scaling last keeps the
fp16 gradients of the logits, entries of size 1/V, from flushing to zero when divided by many targets.)
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# --- the reference: what the kernel computes, written plainly -------------------------------------------

def linear_cross_entropy_reference(x, weight, targets, ignore_index: int = -100):
    return F.cross_entropy(x @ weight.t(), targets, ignore_index=ignore_index)


# --- the kernel -----------------------------------------------------------------------------------------

@triton.jit
def _cross_entropy_rows_kernel(Logits, stride_row, Targets, Losses, V, ignore_index,
                               BLOCK_V: tl.constexpr, COMPUTE_GRAD: tl.constexpr):
    """One program: one row of logits (V,) -> its loss; with COMPUTE_GRAD the row becomes its gradient."""
    row = tl.program_id(0)
    Logits += row.to(tl.int64) * stride_row
    target = tl.load(Targets + row)
    counted = target != ignore_index
    # pass 1: running max and sum of exp over blocks of the row -> logsumexp
    m = tl.full((), float("-inf"), dtype=tl.float32)
    s = tl.zeros((), dtype=tl.float32)
    # The target logit is picked up here, inside the reductions: a load of it after pass 1 would not be
    # ordered against pass 2's writes from other warps, which may already have overwritten it.
    target_logit = tl.zeros((), dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(Logits + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        target_logit += tl.sum(tl.where(cols == target, z, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(Losses + row, tl.where(counted, lse - target_logit, 0.0))
    if COMPUTE_GRAD:
        # pass 2: d(loss)/d(logits), written over the logits
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(Logits + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = tl.where(counted, tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0), 0.0)
            tl.store(Logits + cols, grad.to(Logits.dtype.element_ty), mask=cols < V)


# --- the chunked forward and backward -------------------------------------------------------------------

def default_chunk_rows(n_rows: int, vocab_size: int) -> int:
    """An eighth of the rows (the logits buffer is then an eighth of the full logits), at least 1,024 so
    the matmuls stay efficient, at most 2^28 logits (512 MiB in bf16)."""
    rows = min(max(1024, triton.cdiv(n_rows, 8)), max(1, 2**28 // vocab_size))
    return max(1, min(rows, n_rows))


def linear_cross_entropy_forward(x, weight, targets, ignore_index: int = -100, grad_x: bool = True,
                                 grad_weight: bool = True, chunk_rows: int = 0, block_v: int = 0):
    """(loss_sum, dx, dw): the summed cross-entropy of x @ weight^T over the targets that are not
    ignore_index, and its gradients (dx in x's dtype, dw in fp32; empty where not asked for)."""
    N, d = x.shape
    V = weight.size(0)
    chunk_rows = chunk_rows or default_chunk_rows(N, V)
    block_v = block_v or min(64 if INTERPRET else 4096, triton.next_power_of_2(V))
    compute_grad = grad_x or grad_weight
    losses = torch.empty(N, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x) if grad_x else x.new_empty(0)
    dw = torch.zeros(V, d, device=x.device, dtype=torch.float32) if grad_weight else x.new_empty(0)
    buffer = x.new_empty(min(chunk_rows, N), V)
    for start in range(0, N, chunk_rows):
        stop = min(start + chunk_rows, N)
        logits = torch.mm(x[start:stop], weight.t(), out=buffer[:stop - start])
        _cross_entropy_rows_kernel[(stop - start,)](
            logits, logits.stride(0), targets[start:stop], losses[start:stop], V, ignore_index,
            BLOCK_V=block_v, COMPUTE_GRAD=compute_grad, num_warps=8)
        if grad_x:
            torch.mm(logits, weight, out=dx[start:stop])
        if grad_weight:
            dw += logits.t() @ x[start:stop]  # in x's dtype, summed over chunks in fp32
    return losses.sum(), dx, dw


# --- autograd and torch.compile -------------------------------------------------------------------------
# The chunked forward is one custom op, opaque to torch.compile (which sees only the shapes, from the fake
# function); an autograd.Function hands its gradients to the backward.

@torch.library.custom_op("nanoslm::linear_cross_entropy", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad_x: bool,
                grad_weight: bool, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(x.device.type, enabled=False):  # the matmuls run in x's dtype, as they were given
        return linear_cross_entropy_forward(x, weight, targets, ignore_index, grad_x, grad_weight, chunk_rows)


@_forward_op.register_fake
def _(x, weight, targets, ignore_index, grad_x, grad_weight, chunk_rows):
    dx = torch.empty_like(x) if grad_x else x.new_empty(0)
    dw = torch.empty_like(weight, dtype=torch.float32) if grad_weight else x.new_empty(0)
    return x.new_empty((), dtype=torch.float32), dx, dw


class LinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, grad_x, grad_weight, chunk_rows):
        n_counted = (targets != ignore_index).sum()
        loss_sum, dx, dw = _forward_op(x, weight, targets, ignore_index, grad_x, grad_weight, chunk_rows)
        ctx.save_for_backward(dx, dw, n_counted)
        ctx.weight_dtype = weight.dtype
        return loss_sum / n_counted  # nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw, n_counted = ctx.saved_tensors
        scale = grad_loss / n_counted.clamp(min=1)  # all ignored: the gradients are zero, as F.cross_entropy's
        dx = dx * scale.to(dx.dtype) if ctx.needs_input_grad[0] else None
        dw = (dw * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None, None, None


def linear_cross_entropy(x, weight, targets, ignore_index: int = -100, chunk_rows: int = 0):
    """Mean cross-entropy of x @ weight^T (x (N, d), weight (V, d)) against targets (N,), ignoring
    ignore_index; differentiable in x and weight. Targets must be in [0, V) or ignore_index. Under autocast
    x and weight are cast to its dtype, as F.linear's are. chunk_rows=0 picks default_chunk_rows."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if x.dim() != 2 or weight.dim() != 2 or x.size(1) != weight.size(1) or targets.shape != x.shape[:1]:
        raise ValueError(f"need x (N, d), weight (V, d), targets (N,); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}: cast one, or run under autocast")
    grad = torch.is_grad_enabled()
    return LinearCrossEntropy.apply(x.contiguous(), weight.contiguous(), targets.contiguous(), ignore_index,
                                    grad and x.requires_grad, grad and weight.requires_grad, chunk_rows)
