"""
The model's two hot functions, attention and the loss, each with its fast paths and the plain reference
beside them: on CUDA our Triton kernels (triton_ops/, GPTConfig.kernels), on the CPU a chunked loss whose
(N, vocab) logits never exist, elsewhere PyTorch's own ops. model.py calls only causal_attention and
lm_head_loss, so faster kernels switch in without touching the model.

    from ops import causal_attention, lm_head_loss
    y = causal_attention(q, k, v)                  # (B, nh, T, hs)
    loss = lm_head_loss(x, wte.weight, targets)    # x (B, T, C): the mean next-token cross-entropy

tests/test_model.py and tests/test_kernels.py compare every path with plain_lm_head_loss and SDPA.
"""
import importlib.util
import math
import os
import threading

import torch
import torch.nn.functional as F

HAS_TRITON = importlib.util.find_spec("triton") is not None  # imported only when used (triton_ops/)


def use_triton_kernels(kernels: str, device) -> bool:
    """Whether attention and the loss run as our Triton kernels (triton_ops/) on device, for
    GPTConfig.kernels: "auto" on CUDA when triton is installed, "triton" always (or an error), "torch" never."""
    if kernels == "torch" or (kernels == "auto" and not (device.type == "cuda" and HAS_TRITON)):
        return False
    if not HAS_TRITON:
        raise ValueError("kernels='triton' needs triton: pip install triton (or use kernels='torch')")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"kernels='triton' needs a CUDA device, not {device.type}: use kernels='auto' or "
                         "'torch' (or set TRITON_INTERPRET=1 to run the kernels, slowly, in Triton's interpreter)")
    return True


def causal_attention(q, k, v, dropout_p: float = 0.0, kernels: str = "torch"):
    """softmax(q k^T / sqrt(hs)) v with a causal mask. q: (B, nh, Tq, hs); k, v: (B, nh, Tk, hs), Tk >= Tq;
    query i sits at position Tk - Tq + i (the cache holds the earlier positions). Training and prefill
    (Tq == Tk) may run as our Triton kernel (see use_triton_kernels); it has no dropout, so "auto" then
    falls back to SDPA and "triton" raises."""
    Tq, Tk = q.size(2), k.size(2)
    if Tq == Tk and use_triton_kernels(kernels, q.device) and (dropout_p == 0 or kernels == "triton"):
        from triton_ops.attention import flash_attention
        return flash_attention(q, k, v, dropout_p)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if Tq == 1 and q.device.type == "cpu" and dropout_p == 0.0:
        # one new token against the cache: two small matmuls. SDPA's CPU flash kernel takes milliseconds here.
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, 1, Tk)
        return torch.matmul(scores.softmax(dim=-1), v)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def lm_head_loss(x, weight, targets, ignore_index: int = -100, kernels: str = "torch"):
    """Mean next-token cross-entropy of the logits x @ weight^T against targets. x: (B, T, C).
    On the CPU the logits are never held whole (ChunkedLinearCrossEntropy), nor with Triton kernels
    (triton_ops/cross_entropy.py, see use_triton_kernels); elsewhere PyTorch's ops."""
    if use_triton_kernels(kernels, x.device):
        from triton_ops.cross_entropy import linear_cross_entropy
        return linear_cross_entropy(x.reshape(-1, x.size(-1)), weight, targets.reshape(-1), ignore_index)
    if x.device.type == "cpu":
        want_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        return ChunkedLinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), weight, targets.reshape(-1), ignore_index,
                                               want_grad)
    return plain_lm_head_loss(x, weight, targets, ignore_index)


def plain_lm_head_loss(x, weight, targets, ignore_index: int = -100):
    """The reference: the whole (B*T, vocab) logits, then F.cross_entropy."""
    logits = F.linear(x, weight)
    logits = logits.reshape(-1, logits.size(-1)).to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The projection to the vocabulary and the loss in one, over chunks of rows, so the (N, V) logits (412 MB
    for 2,048 tokens of GPT-2's vocabulary in fp32) never exist, nor the log-softmax and gradient tensors of
    the same size that F.cross_entropy's backward makes. Each chunk's logits are turned into their gradient
    in place while the forward runs (softmax minus one-hot, over the count of counted targets), and dX and dW
    are accumulated then; backward only scales them. Chunks stay large (>= 512 rows) because every chunk
    re-reads and re-writes the whole dW."""

    chunk_elements = 1 << 25  # 128 MB of fp32 logits per chunk
    # The chunk buffer is kept from one call to the next (per thread, dtype and device): allocated afresh, its
    # tens of MB come as new pages the kernel must fault in and zero on every step, ~5-8% of a CPU step here.
    _buffers = threading.local()

    @staticmethod
    def logits_buffer(rows, V, dtype, device):
        buffers = ChunkedLinearCrossEntropy._buffers.__dict__
        buffer = buffers.get((dtype, device))
        if buffer is None or buffer.numel() < rows * V:
            buffer = buffers[(dtype, device)] = torch.empty(rows * V, dtype=dtype, device=device)
        return buffer[:rows * V].view(rows, V)

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, want_grad):  # x: (N, C), weight: (V, C), targets: (N,)
        N, V = x.size(0), weight.size(0)
        rows = min(N, max(512, ChunkedLinearCrossEntropy.chunk_elements // V))
        block_rows = max(1, (1 << 18) // V)
        counted = targets != ignore_index
        n_counted = counted.sum()
        acc_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 sums for fp16/bf16 inputs
        scale = 1.0 / n_counted.to(acc_dtype)  # inf when every target is ignored: the loss is nan, as in F.cross_entropy
        grad_scale = torch.where(n_counted > 0, scale, torch.zeros_like(scale))
        dx = torch.empty_like(x) if want_grad else None
        dw = torch.zeros_like(weight) if want_grad else None
        logits = ChunkedLinearCrossEntropy.logits_buffer(rows, V, x.dtype, x.device)
        total = torch.zeros((), dtype=acc_dtype, device=x.device)
        for start in range(0, N, rows):
            end = min(N, start + rows)
            xc, keep = x[start:end], counted[start:end]
            target = torch.where(keep, targets[start:end], 0)[:, None]
            lc = torch.mm(xc, weight.t(), out=logits[:end - start]).to(acc_dtype)  # no copy in fp32
            target_logit = lc.gather(1, target).squeeze(1)
            lse = torch.empty(end - start, dtype=acc_dtype, device=x.device)
            row_scale = keep * grad_scale  # counted rows: 1 / the count of counted targets; others 0
            # logsumexp and softmax in place, one exp per logit, over ~1 MB of rows at a time so that the
            # passes over them stay in the core's cache; no temporary the size of the chunk
            for r in range(0, end - start, block_rows):
                block = lc[r:r + block_rows]
                row_max = block.amax(dim=1, keepdim=True)
                sum_exp = block.sub_(row_max).exp_().sum(dim=1)
                lse[r:r + block_rows] = row_max.squeeze(1) + sum_exp.log()
                if want_grad:
                    block.mul_((row_scale[r:r + block_rows] / sum_exp)[:, None])  # softmax, scaled
            total += ((lse - target_logit) * keep).sum()
            if want_grad:
                lc.scatter_add_(1, target, -row_scale[:, None].to(lc.dtype))  # minus one-hot
                g = lc.to(x.dtype)
                torch.mm(g, weight, out=dx[start:end])
                dw.addmm_(g.t(), xc)
        ctx.save_for_backward(dx, dw)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        return dx * grad_loss, dw * grad_loss, None, None, None
