"""
llama.cpp as a decoding peer: greedy batch-1 generation from a GGUF file (export.py --to=gguf) through
llama-cpp-python, prefill and decode timed apart as bench_sample.py's time_ours times ours.

    from llama_cpp_peer import decode     # bench scripts run with bench/ on sys.path
    prefill_s, decode_s, tokens = decode("model.gguf", prompt_ids=[50256, 7454, 2402], new_tokens=128, n_threads=8)

The KV cache is kept in f32 as ours is (kv_type="f16" is llama.cpp's default): f16 keys and values move the
logits by about 1e-3, enough to flip a near-tied greedy token of a random-weight model; in f32 they stay within
1e-5 of ours. Needs llama-cpp-python (`make llama`: it builds llama.cpp from source, which takes minutes).
"""
import time
from typing import List, Tuple

import numpy as np


def load(gguf_path: str, n_ctx: int, n_threads: int, kv_type: str = "f32"):
    """llama_cpp.Llama on gguf_path with a context of n_ctx positions, n_threads for prefill and decode alike,
    and its KV cache in kv_type ("f32" or "f16")."""
    try:
        import llama_cpp
    except ImportError:
        raise RuntimeError("llama.cpp's Python binding is not installed: make llama (builds it, minutes)") from None
    cache = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv_type]
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads,
                          n_threads_batch=n_threads, type_k=cache, type_v=cache, logits_all=False, verbose=False)
    arch = llm.metadata.get("general.architecture")
    trained = int(llm.metadata.get(f"{arch}.context_length", n_ctx))
    if n_ctx > trained:
        raise ValueError(f"{n_ctx} positions is more than {gguf_path}'s context of {trained}")
    return llm


def next_token(llm) -> int:
    """The argmax of the logits after the last evaluated token (greedy: ties go to the lowest id, as torch's)."""
    import llama_cpp
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def decode(gguf_path: str, prompt_ids: List[int], new_tokens: int, n_threads: int,
           kv_type: str = "f32") -> Tuple[float, float, List[int]]:
    """(prefill seconds, decode seconds, the new_tokens generated ids) of greedy generation after prompt_ids.
    Prefill is the time to the first new token (the prompt in one batch, then its argmax); decode the rest,
    one token at a time. Loading the file is not timed."""
    if not prompt_ids or new_tokens < 1:
        raise ValueError("decode needs a prompt of one token or more and new_tokens >= 1")
    llm = load(gguf_path, len(prompt_ids) + new_tokens, n_threads, kv_type)
    try:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt_ids)
        tokens = [next_token(llm)]
        first = time.perf_counter()
        while len(tokens) < new_tokens:
            llm.eval(tokens[-1:])
            tokens.append(next_token(llm))
        end = time.perf_counter()
    finally:
        llm.close()
    return first - start, end - first, tokens
