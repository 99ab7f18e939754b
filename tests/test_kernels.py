"""triton_ops/: the Triton attention and fused linear cross-entropy against float64 PyTorch references, values
and gradients, on odd shapes; the model with kernels='triton' against kernels='torch'; torch.compile,
autocast and DDP. Without CUDA every kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set below before triton_ops/ is imported: @triton.jit reads it when it wraps a kernel); with CUDA the same tests
run the compiled kernels. Nothing else in the suite imports triton, so the variable is harmless to the other
test files (and to the train.py processes they start, which use kernels='auto', torch on a CPU).
Tolerances (max abs and rel error against float64): fp32 1e-5, fp16 5e-3, bf16 5e-2 (bf16 has 8 bits of
mantissa; the kernels round the probabilities to it before multiplying by V, as flash attention does)."""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from triton_ops.attention import attention_backward, attention_forward, attention_reference, flash_attention  # noqa: E402
from triton_ops.cross_entropy import (linear_cross_entropy, linear_cross_entropy_forward,  # noqa: E402
                                   linear_cross_entropy_reference)
from model import GPT, GPTConfig  # noqa: E402
from ops import use_triton_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}


def close(actual, expected, dtype, what=""):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def randn(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=requires_grad)


# --- attention ------------------------------------------------------------------------------------------

def check_attention(B, H, T, D, dtype, fwd_blocks=None, dkdv_blocks=None, dq_blocks=None, seed=0):
    torch.manual_seed(seed)
    q, k, v = (randn(B, H, T, D, dtype=dtype) for _ in range(3))
    o, lse = attention_forward(q, k, v, fwd_blocks)
    do = torch.randn_like(o)
    dq, dk, dv = attention_backward(do, q, k, v, o, lse, dkdv_blocks, dq_blocks)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, lse64 = attention_reference(q64, k64, v64)
    o64.backward(do.double())
    assert o.dtype == dq.dtype == dk.dtype == dv.dtype == dtype and o.shape == q.shape
    close(o, o64, dtype, "o")
    close(lse, lse64, torch.float32, "lse")
    for name, ours, ref in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        close(ours, ref, dtype, name)


@pytest.mark.parametrize("B,H,T,D", [
    (2, 3, 40, 32),   # T not a multiple of the 16-wide tiles: the last tile is partly past the end
    (1, 2, 1, 64),    # one token
    (1, 1, 32, 128),  # T exactly two tiles
    (1, 2, 17, 64),   # one past a tile
    (2, 2, 37, 48),   # a head size that is not a power of two (padded to 64)
    (1, 2, 24, 16),   # the smallest head size tl.dot takes
])
def test_attention_fp32_matches_reference(B, H, T, D):
    check_attention(B, H, T, D, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,D", [(45, 64), (7, 32)])
def test_attention_16bit_matches_reference(dtype, T, D):
    check_attention(1, 2, T, D, dtype)


def test_attention_with_unequal_tiles():
    """BLOCK_M != BLOCK_N: the diagonal spans several key tiles (forward, dQ) or query tiles (dK, dV)."""
    check_attention(1, 2, 50, 32, torch.float32, fwd_blocks=(32, 16), dkdv_blocks=(16, 32), dq_blocks=(32, 16))


def test_attention_is_causal():
    torch.manual_seed(0)
    q, k, v = (randn(1, 2, 35, 32) for _ in range(3))
    o, _ = attention_forward(q, k, v)
    torch.testing.assert_close(o[:, :, 0], v[:, :, 0])  # the first query sees only the first key
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:], v2[:, :, 20:] = randn(1, 2, 15, 32), randn(1, 2, 15, 32)
    o2, _ = attention_forward(q, k2, v2)
    assert torch.equal(o[:, :, :20], o2[:, :, :20])  # bit for bit: later keys are never read by them
    assert not torch.allclose(o[:, :, 20:], o2[:, :, 20:])
    # and backward: a loss on the first 20 outputs gives the later keys and values zero gradient
    do = torch.zeros_like(o)
    do[:, :, :20] = 1.0
    _, dk, dv = attention_backward(do, q, k, v, o, attention_forward(q, k, v)[1])
    assert dk[:, :, 20:].abs().max() == 0 and dv[:, :, 20:].abs().max() == 0


def test_attention_takes_strided_inputs():
    """The model's q, k, v are views into one (B, T, 3C) tensor, transposed to (B, nh, T, hs)."""
    torch.manual_seed(0)
    B, T, H, D = 2, 20, 2, 32
    qkv = randn(B, T, 3 * H * D, requires_grad=True)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    y = flash_attention(q, k, v)
    y.square().sum().backward()
    qkv64 = qkv.detach().double().requires_grad_()
    q64, k64, v64 = (t.view(B, T, H, D).transpose(1, 2) for t in qkv64.split(H * D, dim=2))
    y64, _ = attention_reference(q64, k64, v64)
    y64.square().sum().backward()
    close(y, y64, torch.float32, "y")
    close(qkv.grad, qkv64.grad, torch.float32, "dqkv")


def test_attention_errors():
    q = randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="no dropout"):
        flash_attention(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="Tq == Tk"):
        flash_attention(q, randn(1, 2, 9, 32), randn(1, 2, 9, 32))
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q, q.half(), q)


def test_attention_under_autocast():
    autocast_dtype = torch.bfloat16
    torch.manual_seed(0)
    q, k, v = (randn(1, 2, 20, 32, requires_grad=True) for _ in range(3))
    with torch.autocast(DEVICE, dtype=autocast_dtype):
        y = flash_attention(q, k, v)
    assert y.dtype == autocast_dtype
    y.float().sum().backward()
    assert q.grad.dtype == torch.float32
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    y64, _ = attention_reference(q64, k64, v64)
    y64.sum().backward()
    close(y, y64, autocast_dtype, "y")
    close(k.grad, k64.grad, autocast_dtype, "dk")


def test_attention_custom_ops_and_compile():
    torch.manual_seed(0)
    q, k, v = (randn(1, 2, 20, 32) for _ in range(3))
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.nanoslm.flash_attention_forward, (q, k, v), test_utils=tests)
    o, lse = attention_forward(q, k, v)
    torch.library.opcheck(torch.ops.nanoslm.flash_attention_backward, (torch.randn_like(o), q, k, v, o, lse),
                          test_utils=tests)

    def loss(q, k, v):
        return flash_attention(q, k, v).square().sum()
    grads = [torch.autograd.grad(f(*t), t) for f, t in
             ((loss, [x.clone().requires_grad_() for x in (q, k, v)]),
              (torch.compile(loss, backend="aot_eager", fullgraph=True),
               [x.clone().requires_grad_() for x in (q, k, v)]))]
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(eager, compiled)


# --- fused linear + cross-entropy -----------------------------------------------------------------------

def check_cross_entropy(N, d, V, n_ignored, dtype, chunk_rows=0, block_v=0, seed=0):
    torch.manual_seed(seed)
    x, w = randn(N, d, dtype=dtype), randn(V, d, dtype=dtype) * 0.5
    targets = torch.randint(0, V, (N,), device=DEVICE)
    targets[torch.randperm(N)[:n_ignored]] = -100
    loss_sum, dx, dw = linear_cross_entropy_forward(x, w, targets, -100, True, True, chunk_rows, block_v)
    assert loss_sum.dtype == dw.dtype == torch.float32 and dx.dtype == dtype
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = linear_cross_entropy_reference(x64, w64, targets)
    ref.backward()
    if n_ignored == N:  # as F.cross_entropy: the mean over no targets is nan, the gradients zero
        assert loss_sum == 0 and dx.abs().max() == 0 and dw.abs().max() == 0
        x.requires_grad_()
        loss = linear_cross_entropy(x, w, targets)
        loss.backward()
        assert loss.isnan() and ref.isnan() and x.grad.abs().max() == 0
        return
    n = N - n_ignored  # the forward gives the summed loss and its gradients; the mean's are those over n
    close(loss_sum / n, ref, dtype, "loss")
    close(dx.double() / n, x64.grad, dtype, "dx")
    close(dw.double() / n, w64.grad, dtype, "dw")


@pytest.mark.parametrize("N,d,V,n_ignored,chunk_rows,block_v", [
    (37, 32, 100, 5, 16, 32),  # rows not a multiple of the chunk, vocab not a multiple of the block, some ignored
    (1, 16, 7, 0, 0, 0),       # one row, a vocabulary smaller than one block
    (9, 16, 50, 9, 4, 16),     # every target ignored
    (20, 48, 64, 0, 20, 16),   # one chunk, the vocabulary exactly four blocks
])
def test_cross_entropy_fp32_matches_reference(N, d, V, n_ignored, chunk_rows, block_v):
    check_cross_entropy(N, d, V, n_ignored, torch.float32, chunk_rows, block_v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_16bit_matches_reference(dtype):
    check_cross_entropy(24, 32, 100, 3, dtype, chunk_rows=8, block_v=32)


def test_cross_entropy_autograd_no_grad_and_frozen_weight():
    torch.manual_seed(0)
    x, w = randn(30, 32, requires_grad=True), randn(90, 32, requires_grad=True)
    targets = torch.randint(0, 90, (30,), device=DEVICE)
    targets[:4] = -100
    loss = linear_cross_entropy(x, w, targets, chunk_rows=8)
    loss.backward(torch.tensor(3.0, device=DEVICE))  # the gradients scale with the incoming one
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (3 * linear_cross_entropy_reference(x64, w64, targets)).backward()
    close(x.grad, x64.grad, torch.float32, "dx")
    close(w.grad, w64.grad, torch.float32, "dw")
    with torch.no_grad():
        close(linear_cross_entropy(x, w, targets), loss.detach(), torch.float32, "no_grad loss")
    frozen = w.detach()
    x.grad = None
    linear_cross_entropy(x, frozen, targets).backward()
    close(x.grad, x64.grad / 3, torch.float32, "dx, frozen weight")
    with pytest.raises(ValueError, match="need x"):
        linear_cross_entropy(x, w, targets[:5])


def test_cross_entropy_under_autocast():
    torch.manual_seed(0)
    x, w = randn(24, 32, requires_grad=True), randn(70, 32, requires_grad=True)
    targets = torch.randint(0, 70, (24,), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == w.grad.dtype == torch.float32
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = linear_cross_entropy_reference(x64, w64, targets)
    ref.backward()
    close(loss, ref, torch.bfloat16, "loss")
    close(w.grad, w64.grad, torch.bfloat16, "dw")


def test_cross_entropy_custom_op_and_compile():
    torch.manual_seed(0)
    x, w = randn(20, 16), randn(40, 16)
    targets = torch.randint(0, 40, (20,), device=DEVICE)
    torch.library.opcheck(torch.ops.nanoslm.linear_cross_entropy, (x, w, targets, -100, True, True, 8),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))

    def loss(x, w):
        return linear_cross_entropy(x, w, targets)
    grads = [torch.autograd.grad(f(*t), t) for f, t in
             ((loss, [x.clone().requires_grad_(), w.clone().requires_grad_()]),
              (torch.compile(loss, backend="aot_eager", fullgraph=True),
               [x.clone().requires_grad_(), w.clone().requires_grad_()]))]
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(eager, compiled)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA: the interpreter runs fixed 16-wide attention tiles "
                    "and small vocabulary blocks, not the autotuned tiles and 4096-wide blocks at real sizes")
@pytest.mark.parametrize("D", [64, 128])
def test_autotuned_kernels_at_real_sizes(D):
    check_attention(4, 6, 1000, D, torch.bfloat16)
    check_attention(2, 4, 2048, D, torch.float16)
    check_cross_entropy(3000, 6 * D, 50257, 100, torch.bfloat16)


# --- the model ------------------------------------------------------------------------------------------

def twin_models(**kw):
    """The same weights with kernels='triton' and kernels='torch'."""
    cfg = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=101, block_size=40)
    cfg.update(kw)
    torch.manual_seed(0)
    fast = GPT(GPTConfig(kernels="triton", **cfg)).to(DEVICE)
    slow = GPT(GPTConfig(kernels="torch", **cfg)).to(DEVICE)
    slow.load_state_dict(fast.state_dict())
    return fast, slow


@pytest.mark.parametrize("style", [dict(), dict(pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False)])
def test_model_loss_and_gradients_equal_with_triton_and_torch(style):
    fast, slow = twin_models(**style)
    idx = torch.randint(0, 101, (3, 37), device=DEVICE)
    targets = torch.roll(idx, -1, dims=1)
    targets[0, :10] = -100
    losses = []
    for model in (fast, slow):
        _, loss = model(idx, targets)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():  # the logits path (attention through the kernel, the plain projection)
        torch.testing.assert_close(fast(idx)[0], slow(idx)[0], atol=1e-5, rtol=1e-5)


def test_model_generates_the_same_tokens():
    """Prefill (Tq == Tk) goes through the kernel, decoding with the KV cache through SDPA."""
    fast, slow = twin_models()
    idx = torch.randint(0, 101, (2, 9), device=DEVICE)
    assert torch.equal(fast.generate(idx, 6, temperature=0), slow.generate(idx, 6, temperature=0))


def test_model_under_compile():
    fast, slow = twin_models(pos="rope")
    idx = torch.randint(0, 101, (2, 20), device=DEVICE)
    _, loss = torch.compile(fast, backend="aot_eager", fullgraph=True)(idx, idx)
    _, expected = slow(idx, idx)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_kernels_setting(monkeypatch):
    with pytest.raises(ValueError, match="kernels"):
        GPTConfig(kernels="cuda")
    assert not use_triton_kernels("auto", torch.device("cpu")) and not use_triton_kernels("torch", torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=50, block_size=8, kernels="triton"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        model(torch.zeros(1, 8, dtype=torch.long))  # on the CPU, without the interpreter
    # checkpoints leave the setting out, so a run trained with kernels='triton' samples anywhere
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=50, block_size=8, kernels="triton").to_dict()
    assert "kernels" not in config
    logits, _ = GPT(GPTConfig(**config))(torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, 50)
    import checkpoint
    run = {"model": dict(config), "tokenizer": {"name": "t", "content_hash": "h"}}
    checkpoint.check_compatible({"model": dict(config, kernels="triton"), "tokenizer": run["tokenizer"]},
                           dict(run, model=dict(config, kernels="torch")), "ckpt")


DDP_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
sys.path.insert(0, {root!r})
from model import GPT, GPTConfig
dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=61, block_size=24)
torch.manual_seed(0)
model = GPT(GPTConfig(kernels="triton", **cfg))
reference = GPT(GPTConfig(kernels="torch", **cfg))
reference.load_state_dict(model.state_dict())
idx = torch.randint(0, 61, (4, 24))
ddp = DDP(model)  # kept referenced until after backward: its reducer does the all-reduce
_, loss = ddp(idx[2 * rank:2 * rank + 2], idx[2 * rank:2 * rank + 2])
loss.backward()
_, ref_loss = reference(idx, idx)
ref_loss.backward()
for (name, p), q in zip(model.named_parameters(), reference.parameters()):
    torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m: name + ": " + m)
open(f"rank{{rank}}.ok", "w").close()  # a file each: the two processes' prints can interleave
dist.barrier()  # as train.py: gloo's workers let go of the last collective's tensors before the exit
dist.destroy_process_group()
"""


def test_model_under_ddp_two_gloo_processes(tmp_path):
    """DDP averages the kernels' gradients like any others: 2 processes, half the batch each, give the
    gradients of the whole batch in one process. On CPU, in the interpreter, on a GPU machine too."""
    script = tmp_path / "ddp_kernels.py"
    script.write_text(DDP_SCRIPT.format(root=ROOT))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()


# --- the compiled kernels -------------------------------------------------------------------------------

COMPILE_SCRIPT = """
import inspect, os, sys
sys.path.insert(0, {root!r})
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, compile
from triton_ops import attention, cross_entropy
if not os.path.exists(get_ptxas(90).path):
    sys.exit(3)


def compile_for_h100(kernel, pointers, constexprs, num_warps, num_stages):
    signature = {{name: "constexpr" if name in constexprs else
                 pointers.get(name, "fp32" if name == "sm_scale" else "i32")
                 for name in inspect.signature(kernel.fn).parameters}}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = compile(source, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    assert compiled.metadata.shared <= 227 * 1024, (kernel, compiled.metadata.shared)
    print("compiled", kernel.fn.__name__, "shared memory", compiled.metadata.shared)


pointers = {{name: "*bf16" for name in ("Q", "K", "V", "O", "dO", "dQ", "dK", "dV")}}
pointers.update(LSE="*fp32", Delta="*fp32")
for kernel, config in ((attention._attention_fwd_kernel, attention.FWD_CONFIGS[0]),
                       (attention._attention_bwd_dkdv_kernel, attention.DKDV_CONFIGS[0]),
                       (attention._attention_bwd_dq_kernel, attention.DQ_CONFIGS[0])):
    compile_for_h100(kernel, pointers, dict(HEAD_DIM=64, BLOCK_D=64, PRECISION="ieee", **config.kwargs),
                     config.num_warps, config.num_stages)
compile_for_h100(attention._attention_bwd_delta_kernel, pointers, dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=64), 4, 1)
# the largest head size in fp32: each kernel's last, smallest config must fit, so the autotuner has one
pointers = {{name: "*fp32" for name in pointers}}
for kernel, config in ((attention._attention_fwd_kernel, attention.FWD_CONFIGS[-1]),
                       (attention._attention_bwd_dkdv_kernel, attention.DKDV_CONFIGS[-1]),
                       (attention._attention_bwd_dq_kernel, attention.DQ_CONFIGS[-1])):
    compile_for_h100(kernel, pointers, dict(HEAD_DIM=256, BLOCK_D=256, PRECISION="ieee", **config.kwargs),
                     config.num_warps, config.num_stages)
compile_for_h100(cross_entropy._cross_entropy_rows_kernel,
                 dict(Logits="*bf16", Targets="*i64", Losses="*fp32"),
                 dict(BLOCK_V=4096, COMPUTE_GRAD=True), 8, 1)
"""


def test_kernels_compile_for_h100(tmp_path):
    """Compile each kernel to an sm_90 cubin, without a GPU, with Triton's own ptxas: this catches what the
    lax interpreter lets through (types, layouts, shared memory), though nothing runs. In a process without
    TRITON_INTERPRET, where @triton.jit makes compilable kernels."""
    script = tmp_path / "compile_kernels.py"
    script.write_text(COMPILE_SCRIPT.format(root=ROOT))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=500, env=env)
    if proc.returncode == 3:
        pytest.skip("triton's ptxas is missing: cannot compile for sm_90")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("compiled") == 8
