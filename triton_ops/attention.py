"""
Causal self-attention as Triton kernels, flash-attention style: forward and backward, for CUDA.

    from triton_ops.attention import flash_attention
    y = flash_attention(q, k, v)   # q, k, v: (B, nh, T, hs) -> y: (B, nh, T, hs), = SDPA(q, k, v, is_causal=True)

    python -m pytest -q tests/test_kernels.py -k attention   # CPU: Triton's interpreter against attention_reference
    python bench/bench_kernels.py --only=attention           # GPU: TFLOP/s against SDPA's flash backend

The forward walks a tile of queries along the tiles of keys and values up to the diagonal, keeping a running
max and sum of the softmax (the online softmax), so the (T, T) probabilities never exist in memory; it saves
each query's logsumexp. The backward recomputes the probabilities of a tile from q, k and that logsumexp:
one kernel walks a tile of keys down the queries that see it (dK, dV), another walks a tile of queries along
its keys (dQ), so neither needs atomics. Products are accumulated in fp32 for fp32, fp16 and bf16 inputs.
Any T (tiles past the end are masked) and any head size (padded to a power of two, at least 16).

On a GPU the tile sizes are autotuned once per head size and power-of-two bucket of T; in the interpreter
(TRITON_INTERPRET=1, set before this module is imported) they are 16, so small tests cross several tiles.
"""
import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): the kernels work in base 2, as the GPU does


# --- the reference: what the kernels compute, written plainly -------------------------------------------

def attention_reference(q, k, v):
    """(y, lse): causal softmax(q k^T / sqrt(hs)) v, and the logsumexp of each query's scores (B, nh, T)."""
    T = q.size(2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v, scores.logsumexp(dim=-1)


# --- kernels --------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(base, stride_t, rows, dims, T, HEAD_DIM: tl.constexpr):
    """Rows `rows` of a (T, HEAD_DIM) matrix whose rows are stride_t apart, zero past T and in the padding."""
    mask = (rows[:, None] < T) & (dims[None, :] < HEAD_DIM)
    return tl.load(base + rows[:, None] * stride_t + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, stride_t, rows, dims, T, HEAD_DIM: tl.constexpr, tile):
    mask = (rows[:, None] < T) & (dims[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None] * stride_t + dims[None, :], tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _head_offset(stride_b, stride_h, b, h):
    return b * stride_b + h * stride_h


@triton.jit
def _forward_tile(acc, m, l, q, K, V, stride_kt, stride_vt, rows, start_n, T, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr, ON_DIAGONAL: tl.constexpr):
    """Fold one tile of keys/values into the running output acc, max m and sum l (online softmax)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load_tile(K, stride_kt, cols, dims, T, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 units
    if ON_DIAGONAL:
        s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)  # rescales what was summed under the old max
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    v = _load_tile(V, stride_vt, cols, dims, T, HEAD_DIM)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l


@triton.jit
def _attention_fwd_kernel(Q, K, V, O, LSE, sm_scale, H, T, T_BUCKET,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head). T_BUCKET is only the autotuning key."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # the longest rows first: less tail
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    Q += _head_offset(stride_qb, stride_qh, b, h)
    K += _head_offset(stride_kb, stride_kh, b, h)
    V += _head_offset(stride_vb, stride_vh, b, h)
    O += _head_offset(stride_ob, stride_oh, b, h)
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_tile(Q, stride_qt, rows, dims, T, HEAD_DIM)
    qk_scale = sm_scale * LOG2E
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Keys before the tile are visible to every query in it; the first of them (key 0) keeps every row's
    # max finite, so the masked tiles below never compute exp2(-inf - -inf).
    for start_n in range(0, start_m, BLOCK_N):
        acc, m, l = _forward_tile(acc, m, l, q, K, V, stride_kt, stride_vt, rows, start_n, T, qk_scale,
                                  HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, False)
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        acc, m, l = _forward_tile(acc, m, l, q, K, V, stride_kt, stride_vt, rows, start_n, T, qk_scale,
                                  HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, True)
    _store_tile(O, stride_ot, rows, dims, T, HEAD_DIM, acc / l[:, None])
    tl.store(LSE + bh * T + rows, (m + tl.log2(l)) / LOG2E, mask=rows < T)


@triton.jit
def _attention_bwd_delta_kernel(O, dO, Delta, H, T, stride_ob, stride_oh, stride_ot,
                                stride_dob, stride_doh, stride_dot,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta = rowsum(dO * O), (B * nh, T): the term of dS = P * (dP - Delta) that one row shares."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    o = _load_tile(O + _head_offset(stride_ob, stride_oh, b, h), stride_ot, rows, dims, T, HEAD_DIM)
    do = _load_tile(dO + _head_offset(stride_dob, stride_doh, b, h), stride_dot, rows, dims, T, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh * T + rows, delta, mask=rows < T)


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, dO, LSE, Delta, stride_qt, stride_dot, cols, start_m, T, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               PRECISION: tl.constexpr, ON_DIAGONAL: tl.constexpr):
    """Add one tile of queries' share to dK and dV of a tile of keys. Queries past T load as zeros (and
    lse = Delta = 0): their p is finite and multiplies dO = 0, so they add nothing."""
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_tile(Q, stride_qt, rows, dims, T, HEAD_DIM)
    do = _load_tile(dO, stride_dot, rows, dims, T, HEAD_DIM)
    lse = tl.load(LSE + rows, mask=rows < T, other=0.0) * LOG2E
    delta = tl.load(Delta + rows, mask=rows < T, other=0.0)
    sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    pT = tl.exp2(sT - lse[None, :])
    if ON_DIAGONAL:
        pT = tl.where(cols[:, None] <= rows[None, :], pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(Q, K, V, dO, dK, dV, LSE, Delta, sm_scale, H, T, T_BUCKET,
                               stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                               stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                               stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One program: dK and dV of BLOCK_N keys of one (batch, head), from the queries at or after them."""
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    Q += _head_offset(stride_qb, stride_qh, b, h)
    dO += _head_offset(stride_dob, stride_doh, b, h)
    LSE += bh * T
    Delta += bh * T
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load_tile(K + _head_offset(stride_kb, stride_kh, b, h), stride_kt, cols, dims, T, HEAD_DIM)
    v = _load_tile(V + _head_offset(stride_vb, stride_vh, b, h), stride_vt, cols, dims, T, HEAD_DIM)
    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(start_n, tl.minimum(start_n + BLOCK_N, T), BLOCK_M):  # the diagonal
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, dO, LSE, Delta, stride_qt, stride_dot, cols, start_m, T,
                            qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION, True)
    for start_m in range(start_n + BLOCK_N, T, BLOCK_M):  # queries after the tile see all of it
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, dO, LSE, Delta, stride_qt, stride_dot, cols, start_m, T,
                            qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION, False)
    _store_tile(dK + _head_offset(stride_dkb, stride_dkh, b, h), stride_dkt, cols, dims, T, HEAD_DIM,
                dk * sm_scale)
    _store_tile(dV + _head_offset(stride_dvb, stride_dvh, b, h), stride_dvt, cols, dims, T, HEAD_DIM, dv)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, rows, start_n, T, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
             PRECISION: tl.constexpr, ON_DIAGONAL: tl.constexpr):
    """Add one tile of keys' share to dQ of a tile of queries."""
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load_tile(K, stride_kt, cols, dims, T, HEAD_DIM)
    v = _load_tile(V, stride_vt, cols, dims, T, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if ON_DIAGONAL:
        p = tl.where(cols[None, :] <= rows[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(Q, K, V, dO, dQ, LSE, Delta, sm_scale, H, T, T_BUCKET,
                             stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                             stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                             stride_dqb, stride_dqh, stride_dqt,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One program: dQ of BLOCK_M queries of one (batch, head), from the keys at or before them."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # the longest rows first
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    K += _head_offset(stride_kb, stride_kh, b, h)
    V += _head_offset(stride_vb, stride_vh, b, h)
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + _head_offset(stride_qb, stride_qh, b, h), stride_qt, rows, dims, T, HEAD_DIM)
    do = _load_tile(dO + _head_offset(stride_dob, stride_doh, b, h), stride_dot, rows, dims, T, HEAD_DIM)
    lse = tl.load(LSE + bh * T + rows, mask=rows < T, other=0.0) * LOG2E
    delta = tl.load(Delta + bh * T + rows, mask=rows < T, other=0.0)
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, start_m, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, rows, start_n, T, qk_scale,
                      HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, False)
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, rows, start_n, T, qk_scale,
                      HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, True)
    _store_tile(dQ + _head_offset(stride_dqb, stride_dqh, b, h), stride_dqt, rows, dims, T, HEAD_DIM,
                dq * sm_scale)


def _configs(shapes):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) -> triton.Config; shared memory that a config overflows
    makes the autotuner skip it. Each list ends with 32 x 32 tiles in one stage, which fit the shared memory
    of current GPUs even at head size 256 in fp32 (~100 KB), where the larger tiles need up to ~500 KB."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
                        (64, 32, 4, 2), (32, 32, 4, 1)])
DKDV_CONFIGS = _configs([(32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2),
                         (16, 64, 4, 2), (32, 32, 4, 1)])
DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2),
                       (32, 32, 4, 1)])
INTERPRETER_BLOCKS = (16, 16)  # (BLOCK_M, BLOCK_N) when not autotuned
_tuned = {}


def _kernel_and_blocks(kernel, configs, blocks):
    """The autotuned kernel on a GPU, or the kernel with fixed blocks (the interpreter, or blocks given)."""
    if blocks is None and not INTERPRET:
        if kernel not in _tuned:
            _tuned[kernel] = triton.autotune(configs=configs, key=["HEAD_DIM", "T_BUCKET"])(kernel)
        return _tuned[kernel], {}
    block_m, block_n = blocks or INTERPRETER_BLOCKS
    return kernel, {"BLOCK_M": block_m, "BLOCK_N": block_n}


# --- launchers ------------------------------------------------------------------------------------------

def _strides(t):
    """Strides of the batch, head and position dims; the head dim must be contiguous."""
    assert t.stride(3) == 1, "the last dim must be contiguous"
    return t.stride(0), t.stride(1), t.stride(2)


def _empty_heads(q):
    """(B, nh, T, hs) laid out as (B, T, nh, hs), like SDPA's output: the model's transpose back is free."""
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2)


def _precision(dtype):
    """fp32 inputs multiply in full fp32 unless torch allows TF32 matmuls; 16-bit inputs ignore this."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _check_inputs(q, k, v):
    if not (q.shape == k.shape == v.shape and q.dim() == 4):
        raise ValueError(f"q, k, v must all be (B, nh, T, hs), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}: the kernel does causal self-attention (Tq == Tk) only")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one dtype of float32, float16, bfloat16; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if q.size(-1) > 256:
        raise ValueError(f"head size {q.size(-1)} is more than the kernel's 256")


def attention_forward(q, k, v, blocks=None):
    """(o, lse) = the causal attention of q, k, v (B, nh, T, hs), and each query's logsumexp (B, nh, T)
    in fp32. blocks=(BLOCK_M, BLOCK_N) fixes the tiles (BLOCK_M a multiple of BLOCK_N); None autotunes."""
    _check_inputs(q, k, v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, T, D = q.shape
    o = _empty_heads(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    kernel, meta = _kernel_and_blocks(_attention_fwd_kernel, FWD_CONFIGS, blocks)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](q, k, v, o, lse, 1.0 / math.sqrt(D), H, T, triton.next_power_of_2(T),
                 *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                 HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), PRECISION=_precision(q.dtype), **meta)
    return o, lse


def attention_backward(do, q, k, v, o, lse, dkdv_blocks=None, dq_blocks=None):
    """(dq, dk, dv) given dL/do. dkdv_blocks: BLOCK_N a multiple of BLOCK_M; dq_blocks: the reverse."""
    q, k, v, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, do))
    B, H, T, D = q.shape
    block_d = max(16, triton.next_power_of_2(D))
    precision = _precision(q.dtype)
    delta = torch.empty_like(lse)
    _attention_bwd_delta_kernel[(triton.cdiv(T, 64), B * H)](o, do, delta, H, T, *_strides(o), *_strides(do),
                                                             HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=64)
    dq, dk, dv = _empty_heads(q), _empty_heads(k), _empty_heads(v)
    common = (1.0 / math.sqrt(D), H, T, triton.next_power_of_2(T),
              *_strides(q), *_strides(k), *_strides(v), *_strides(do))
    kernel, meta = _kernel_and_blocks(_attention_bwd_dkdv_kernel, DKDV_CONFIGS, dkdv_blocks)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_N"]), B * H)  # noqa: E731
    kernel[grid](q, k, v, do, dk, dv, lse, delta, *common, *_strides(dk), *_strides(dv),
                 HEAD_DIM=D, BLOCK_D=block_d, PRECISION=precision, **meta)
    kernel, meta = _kernel_and_blocks(_attention_bwd_dq_kernel, DQ_CONFIGS, dq_blocks)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](q, k, v, do, dq, lse, delta, *common, *_strides(dq),
                 HEAD_DIM=D, BLOCK_D=block_d, PRECISION=precision, **meta)
    return dq, dk, dv


# --- autograd and torch.compile -------------------------------------------------------------------------
# Each half is a custom op, opaque to torch.compile (which sees only the shapes, from the fake functions);
# an autograd.Function joins them.

@torch.library.custom_op("nanoslm::flash_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v)


@_forward_op.register_fake
def _(q, k, v):
    B, H, T, D = q.shape
    return _empty_heads(q), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("nanoslm::flash_attention_backward", mutates_args=())
def _backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, o, lse)


@_backward_op.register_fake
def _(do, q, k, v, o, lse):
    return _empty_heads(q), _empty_heads(k), _empty_heads(v)


class FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = _forward_op(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        return _backward_op(do, *ctx.saved_tensors)


def flash_attention(q, k, v, dropout_p: float = 0.0):
    """Causal self-attention of q, k, v (B, nh, T, hs) with the kernels above; differentiable. Under
    autocast the inputs are cast to its dtype, as SDPA's are."""
    if dropout_p > 0:
        raise ValueError(f"the Triton attention kernel has no dropout (dropout_p={dropout_p}): train with "
                         "dropout=0, or use kernels='torch' for attention dropout")
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    _check_inputs(q, k, v)
    return FlashAttention.apply(q, k, v)
