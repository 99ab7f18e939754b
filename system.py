"""
The machine a script runs on: the native extension, CPU threads, the device and its dtype, torchrun's
processes, and the stop signals that let a run save a checkpoint before it exits.

    from system import pick_device, pick_dtype
    dev = pick_device("auto")                    # "cuda", "mps" or "cpu"
    dtype_name = pick_dtype("auto", "cuda")      # "bfloat16" where the GPU supports it, else "float32"
"""
import os
import signal

import torch

from configurator import ConfigError


class NativeMissing(ImportError):
    pass


def native(required: bool = True):
    """The C++ extension _nanoslm (built from csrc/ by setup.py). Missing: an error saying how to build it,
    or None when not required (the model then generates on PyTorch's ops alone)."""
    try:
        import _nanoslm
        return _nanoslm
    except ImportError as e:
        if not required:
            return None
        raise NativeMissing("the native extension _nanoslm is not built: run `make build` (or "
                            "`pip install -e . --no-build-isolation`) in the repository root") from e


def default_num_threads() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --- device, dtype, processes ------------------------------------------------------------------------------

def pick_device(requested: str, local_rank=None) -> str:
    """"auto": cuda, then mps, then cpu; under torchrun (local_rank given) "cuda" is this process's GPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    if requested == "cuda" and local_rank is not None:
        requested = f"cuda:{local_rank}"
    if requested.startswith("cuda"):
        torch.cuda.set_device(requested)
    return requested


def pick_dtype(requested: str, device_type: str) -> str:
    """"auto": bfloat16 on a CUDA GPU that supports it, else float32."""
    if requested == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float32"
    if requested not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={requested!r}: choose auto, float32, bfloat16 or float16")
    return requested


def setup_distributed(device: str):
    """(ddp, rank, local_rank, world_size): torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; NCCL between GPUs,
    gloo between CPU processes."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, 0, 0, 1
    backend = "nccl" if torch.cuda.is_available() and device in ("auto",) or device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    return True, dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()


# --- stop signals --------------------------------------------------------------------------------------------

def catch_stop_signals():
    """From now on SIGINT (Ctrl-C) and SIGTERM are noted in the returned list instead of stopping the process,
    so that the loop can save a checkpoint first; a second one stops at once."""
    stop_signal = []

    def request_stop(signum, frame):
        stop_signal.append(signum)
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return stop_signal


def release_stop_signals():
    """After the training loop there is no checkpoint to save first: Ctrl-C and SIGTERM stop at once again."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
