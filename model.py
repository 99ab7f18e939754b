"""
The GPT: a decoder-only transformer in one file, read top to bottom in the order it runs.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=50257))
    logits, _ = model(idx)                 # (B, T, vocab_size)
    _, loss = model(idx, targets)          # next-token cross-entropy; logits are not materialised
    out = model.generate(idx, max_new_tokens=100, temperature=0.8, top_k=50)

Options (GPTConfig): learned or rotary positions, LayerNorm or RMSNorm, GELU or SwiGLU MLP, biases,
tied input/output embeddings. GPT-2 is pos="learned", norm="layernorm", mlp="gelu"; Llama-style is
pos="rope", norm="rmsnorm", mlp="swiglu". Attention and the loss each go through one function of ops.py
(causal_attention, lm_head_loss), where the faster kernels live.
"""
import math
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ops import causal_attention, lm_head_loss
from system import default_num_threads, native

_nanoslm = native(required=False)  # the C++ extension (setup.py); without it, generation runs on PyTorch's ops alone


@dataclass
class GPTConfig:
    block_size: int = 256  # longest context the model sees
    vocab_size: int = 50257  # GPT-2's; prepare.py's meta.json says what the data needs
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm layers (GPT-2 had them)
    pos: str = "learned"  # "learned" absolute position embeddings, or "rope" (rotary)
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    mlp: str = "gelu"  # "gelu" (4x wide), "swiglu" (gated, about 8/3x wide) or "relu2" (relu(x)^2, 4x wide)
    qk_norm: bool = False  # RMSNorm (with a gain per head dimension) on each head's queries and keys
    tie_embeddings: bool = True  # the output projection shares the token embedding matrix
    rope_theta: float = 10000.0
    kernels: str = "auto"  # attention and loss: "triton" (triton_ops/, CUDA), "torch", "auto" (triton on CUDA)

    def __post_init__(self):
        choices = {"pos": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu", "relu2"),
                   "kernels": ("auto", "triton", "torch")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r}: choose one of {allowed}")
        for key in ("block_size", "vocab_size", "n_head", "n_embd"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be positive")
        if self.n_layer < 0:  # 0 is a model of embeddings alone
            raise ValueError(f"n_layer={self.n_layer} must be 0 or more")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rotary positions need an even head size (n_embd / n_head)")

    @property
    def mlp_hidden(self) -> int:
        if self.mlp != "swiglu":
            return 4 * self.n_embd
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)  # SwiGLU: ~the parameters of a 4x GELU MLP

    def to_dict(self) -> dict:
        """What the model is, for checkpoints: kernels (how it runs) is left out, so a checkpoint trained
        with Triton kernels on a GPU samples on a CPU."""
        return {k: v for k, v in asdict(self).items() if k != "kernels"}


# --- layers ---------------------------------------------------------------------------------------------

class Norm(nn.Module):
    """LayerNorm with an optional bias, or RMSNorm."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.norm
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if config.bias and config.norm == "layernorm" else None

    def forward(self, x):
        if self.kind == "rmsnorm":
            return F.rms_norm(x, self.weight.shape, self.weight, eps=1e-5)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, eps=1e-5)


def rotary_tables(head_size: int, length: int, theta: float):
    """cos and sin of position * frequency, (length, head_size / 2) each."""
    freqs = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate pairs (x[i], x[i + hs/2]) of x (B, nh, T, hs) by the angles of their positions (T, hs/2):
    the half-split layout that Hugging Face's Llama uses, so weights export without permutation."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Keys and values of the positions seen so far, preallocated and written in place."""

    def __init__(self, batch_size, n_head, max_len, head_size, device, dtype):
        self.k = torch.empty(batch_size, n_head, max_len, head_size, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k, v):
        T = k.size(2)
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.kernels = config.kernels
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v together
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:  # Qwen3's q_norm and k_norm
            self.q_norm = nn.Parameter(torch.ones(config.n_embd // config.n_head))
            self.k_norm = nn.Parameter(torch.ones(config.n_embd // config.n_head))
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, rope=None, cache: Optional[KVCache] = None, attn_mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.q_norm is not None:
            q = F.rms_norm(q, self.q_norm.shape, self.q_norm, eps=1e-5)
            k = F.rms_norm(k, self.k_norm.shape, self.k_norm, eps=1e-5)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.append(k, v)
        if attn_mask is None:
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0, self.kernels)
        else:  # a left-padded batch: the mask (B, 1, T, Tk) is causal and hides the padding
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        self.squared = config.mlp == "relu2"
        hidden = config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, (2 if self.gated else 1) * hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.squared:
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU
        return self.dropout(self.c_proj(h))


class Block(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = Norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = Norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), rope, cache, attn_mask)
        return x + self.mlp(self.ln_2(x))


def left_padding(attention_mask, start: int, T: int):
    """For a left-padded batch whose attention_mask (B, start + T) is 0 on padding and 1 on tokens: the
    positions (B, T) of the last T columns, counting tokens only, and the attention mask (B, 1, T, start + T),
    True where a query may see a key. A padded row then computes exactly what it would alone: its tokens see
    no padding and sit at the positions they would have unpadded. A padding query sees only itself, so that
    no row of the softmax is empty."""
    if attention_mask.size(1) != start + T:
        raise ValueError(f"attention_mask covers {attention_mask.size(1)} positions, expected {start + T} "
                         "(the cached ones and the new ones)")
    positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, start:]
    keys = torch.arange(start + T, device=attention_mask.device)
    queries = keys[start:, None]
    visible = (keys <= queries) & (attention_mask.bool()[:, None, :] | (keys == queries))  # (B, T, start + T)
    return positions, visible[:, None]


# --- the model ------------------------------------------------------------------------------------------

class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=Norm(config),
        ))
        if config.pos == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:
            cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @torch.no_grad()
    def zero_output_projections_(self):
        """Start every block as the identity: its attention and MLP output projections at zero (modded-nanogpt's
        init; the residual stream then carries the embeddings unchanged until training opens the blocks)."""
        for block in self.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counted once when shared; non_embedding leaves out the token and position tables
        (with untied embeddings the output projection still counts)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per token (forward + backward): 6 per parameter that multiplies (the embedding
        tables are looked up, not multiplied, unless wte is also the output projection) plus attention's
        12 * n_layer * n_embd * T (the PaLM paper's estimate)."""
        T = seq_len or self.config.block_size
        looked_up = 0 if self.config.tie_embeddings else self.transformer.wte.weight.numel()
        if self.config.pos == "learned":
            looked_up += self.transformer.wpe.weight.numel()
        multiplying = self.num_params(non_embedding=False) - looked_up
        return 6 * multiplying + 12 * self.config.n_layer * self.config.n_embd * T

    def hidden_states(self, idx, caches: Optional[List[KVCache]] = None, start: int = 0, attention_mask=None):
        """Final-norm hidden states (B, T, C) of tokens idx (B, T) sitting at positions start, start+1, ...
        A left-padded batch passes attention_mask (B, start + T): 0 on padding, 1 on tokens (see left_padding)."""
        B, T = idx.size()
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        x = self.transformer.wte(idx)
        rope, attn_mask = None, None
        if attention_mask is None:
            positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        else:
            positions, attn_mask = left_padding(attention_mask, start, T)  # (B, T), (B, 1, T, start + T)
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(positions)
        elif attention_mask is None:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        else:  # per-row angles (B, 1, T, hs/2), broadcast over the heads
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, caches[i] if caches is not None else None, attn_mask)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """Returns (logits, None) without targets, (None, loss) with them: the loss path never needs the
        (B, T, vocab) logits, so a fused kernel need not build them. Targets of -100 are ignored."""
        x = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(x), None
        return None, lm_head_loss(x, self.lm_head.weight, targets, kernels=self.config.kernels)

    # --- generation -------------------------------------------------------------------------------------

    def new_caches(self, batch_size: int) -> List[KVCache]:
        c = self.config
        p = self.lm_head.weight
        return [KVCache(batch_size, c.n_head, c.block_size, c.n_embd // c.n_head, p.device, p.dtype)
                for _ in range(c.n_layer)]

    @torch.no_grad()
    def pack_weights_(self):
        """Move every parameter into one block of memory, layer by layer as a decoding step reads them, aligned to
        2 MB and backed by huge pages where the system allows (csrc/decode.h: WeightBlock); values unchanged.
        Decoding one sequence reads every weight once per token: for weights larger than the caches (a 42M
        model) that stream runs ~15% faster from one such block than from separate 4 KB-paged tensors. For
        inference (sample.py calls it after loading); a no-op without the extension or for non-fp32 or
        non-CPU weights. Returns the model."""
        params = list(self.parameters())  # each once: the tied embedding and lm_head are one parameter
        if _nanoslm is None or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
            return self
        for p, packed in zip(params, one_block(params)):
            p.data = packed
        return self

    def native_decoder(self, caches: List[KVCache], isa: str = ""):
        """The decoding step in C++ (csrc/decode.cpp): the whole model for one new token per sequence in one
        call, without eager PyTorch's per-operation overhead, over this model's weights and these caches.
        Returns step(tokens (B,), pos) -> logits (B, V), a buffer reused by the next call; or None where it
        does not apply: it needs the built extension, an fp32 model of plain layers on the CPU in eval mode,
        and one sequence. A model quantised by quantize.py is decoded from its int8 weights. isa: the vector kernels' instruction set, one of _nanoslm.decode_instruction_sets();
        empty for the widest this CPU runs (tests try the others)."""
        if _nanoslm is None or self.training or not caches or caches[0].k.size(0) != 1:
            return None  # (beyond one sequence, PyTorch's matrix-matrix products are as fast: measured)
        tensors = list(self.parameters()) + [t for cache in caches for t in (cache.k, cache.v)]
        if any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
            return None
        linears = [m for block in self.transformer.h for m in (block.attn.c_attn, block.attn.c_proj,
                                                                block.mlp.c_fc, block.mlp.c_proj)]
        if any(type(m) is not nn.Linear for m in linears):
            return None  # wrapped layers (finetune.py's LoRA adapters) compute more than their weight
        c = self.config

        def array(t):
            return None if t is None else t.detach().numpy()

        def matrix(name, module):  # its fp32 weight, and its int8 values and scales where quantize.py made them
            found = {name: array(module.weight)}
            if getattr(module, "weight_int8", None) is not None:
                found.update({name + "_q": array(module.weight_int8), name + "_scales": array(module.weight_scales)})
            return found

        def layer(block, cache):
            attn, mlp = block.attn, block.mlp
            return dict(ln_1_weight=array(block.ln_1.weight), ln_1_bias=array(block.ln_1.bias),
                        **matrix("attn_weight", attn.c_attn), attn_bias=array(attn.c_attn.bias),
                        q_norm=array(attn.q_norm), k_norm=array(attn.k_norm),
                        **matrix("attn_proj_weight", attn.c_proj), attn_proj_bias=array(attn.c_proj.bias),
                        ln_2_weight=array(block.ln_2.weight), ln_2_bias=array(block.ln_2.bias),
                        **matrix("fc_weight", mlp.c_fc), fc_bias=array(mlp.c_fc.bias),
                        **matrix("mlp_proj_weight", mlp.c_proj), mlp_proj_bias=array(mlp.c_proj.bias),
                        k_cache=array(cache.k), v_cache=array(cache.v))

        config = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, hidden=c.mlp_hidden,
                      vocab_size=c.vocab_size, block_size=c.block_size, batch_size=1,
                      rmsnorm=c.norm == "rmsnorm", swiglu=c.mlp == "swiglu", rope=c.pos == "rope", eps=1e-5,
                      relu2=c.mlp == "relu2", qk_norm=c.qk_norm,
                      group=getattr(self, "int8_group", 0))  # int8 weights (quantize.py): their group size
        weights = dict(**matrix("wte", self.transformer.wte), **matrix("lm_head", self.lm_head),
                       ln_f_weight=array(self.transformer.ln_f.weight), ln_f_bias=array(self.transformer.ln_f.bias))
        if c.pos == "rope":
            weights.update(rope_cos=array(self.rope_cos), rope_sin=array(self.rope_sin))
        else:
            weights.update(wpe=array(self.transformer.wpe.weight))
        layers = [layer(block, cache) for block, cache in zip(self.transformer.h, caches)]
        decoder = _nanoslm.Decoder(config, weights, layers, min(torch.get_num_threads(), default_num_threads()), isa)
        logits = torch.empty(1, c.vocab_size)

        def step(tokens, pos: int):
            decoder.step(tokens.contiguous().numpy(), pos, logits.numpy())
            for cache in caches:
                cache.length = pos + 1
            return logits

        return step

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                        top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                        eot_token: Optional[int] = None, use_cache: bool = True,
                        attention_mask=None) -> Iterator[torch.Tensor]:
        """Yield the next token of each sequence, (B,), max_new_tokens times or until every sequence has
        produced eot_token (a finished sequence keeps yielding eot_token). Context longer than block_size
        is cropped to its last block_size tokens, with or without the cache, so both give the same tokens.
        Prompts of different lengths go in one batch left-padded, with attention_mask (B, T) 0 on the padding:
        each row then yields what it would alone; such a batch is never cropped, so it must fit block_size."""
        block_size = self.config.block_size
        if attention_mask is not None and idx.size(1) + max_new_tokens > block_size:
            raise ValueError(f"a left-padded batch of {idx.size(1)} columns + {max_new_tokens} new tokens does not "
                             f"fit block_size {block_size}: lower max_new_tokens, or generate the prompts one by one")
        caches, cached, decoder = None, 0, None  # cached: how many tokens of idx the caches hold
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            context = idx[:, -block_size:]
            if not use_cache:
                x = self.hidden_states(context, attention_mask=attention_mask)
            elif caches is None or idx.size(1) > block_size:  # (re)fill the caches from the whole context
                caches = self.new_caches(idx.size(0))
                x = self.hidden_states(context, caches, attention_mask=attention_mask)
                cached = idx.size(1)
                decoder = self.native_decoder(caches) if attention_mask is None else None
            elif decoder is not None:  # only the newest token is new: the whole step in C++
                x = None
                logits = decoder(idx[:, -1], cached)
                cached = idx.size(1)
            else:  # only the newest token is new
                x = self.hidden_states(idx[:, cached:], caches, start=cached, attention_mask=attention_mask)
                cached = idx.size(1)
            if x is not None:
                logits = self.lm_head(x[:, -1, :]).float()
            token = sample_next(logits, temperature, top_k, top_p, generator)
            if eot_token is not None:
                token = torch.where(finished, torch.full_like(token, eot_token), token)
                finished |= token == eot_token
            idx = torch.cat((idx, token[:, None]), dim=1)
            if attention_mask is not None:
                attention_mask = F.pad(attention_mask, (0, 1), value=1)
            yield token
            if eot_token is not None and bool(finished.all()):
                return

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, **kwargs):
        """idx (B, T) followed by the generated tokens; see generate_stream for the options."""
        tokens = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + [t[:, None] for t in tokens], dim=1)


@torch.no_grad()
def one_block(tensors):
    """Copies of CPU tensors (any dtype) in one block of memory, in the order given, aligned to 2 MB and backed by
    huge pages where the system allows (csrc/decode.h: WeightBlock; needs the extension), each at a 64-byte
    boundary (whole vector loads) and over a storage of its own, so that saving (safetensors) sees no sharing."""
    sizes = [(t.numel() * t.element_size() + 63) // 64 * 16 for t in tensors]  # in floats, whole 64 bytes each
    block = _nanoslm.weight_block(sum(sizes))
    copies, offset = [], 0
    for t, size in zip(tensors, sizes):
        part = torch.from_numpy(block[offset:offset + size]).view(torch.uint8)[:t.numel() * t.element_size()]
        copies.append(part.view(t.dtype).view(t.shape).copy_(t))
        offset += size
    return copies


def sample_next(logits, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                generator: Optional[torch.Generator] = None):
    """One token per row of logits (B, V): greedy when temperature is 0; otherwise sampled from
    softmax(logits / temperature) restricted to the top_k most likely tokens and to the smallest set whose
    probability reaches top_p (nucleus sampling). With top_k, only those k columns are sorted and sampled,
    never the whole vocabulary."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    candidates = None  # the token id of each column of logits, once they are no longer the whole vocabulary
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # most likely first
    if top_p is not None and top_p < 1.0:
        if candidates is None:
            logits, candidates = torch.sort(logits, descending=True, dim=-1)
        probs = logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        drop = before >= top_p
        drop[..., 0] = False  # the most likely token always stays, whatever top_p
        logits = logits.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)  # (B, 1)
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(-1)
