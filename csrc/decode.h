// One decoding step of model.py's GPT on the CPU, in one call: B sequences each take one new token, against
// the key/value caches that the PyTorch prefill filled. The same math as GPT.hidden_states + lm_head, with
// none of the per-operation overhead that dominates a small model's step in eager PyTorch. The weights of the
// matrix-vector products are fp32, or int8 with a scale per group of inputs (quantize.py), whose kernels
// quantise each input vector the same way and multiply int8 by int8: norms, attention, the residual stream
// and the caches stay fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace nanoslm {

struct DecoderConfig {
    int n_layer, n_head, n_embd, hidden, vocab_size, block_size, batch_size;
    bool rmsnorm;  // RMSNorm, else LayerNorm
    bool swiglu;   // SwiGLU MLP (c_fc gives the gate rows then the up rows), else GELU (tanh) or ReLU^2
    bool rope;     // rotary positions, else a learned position table
    float eps;
    bool relu2;    // without swiglu: relu(x)^2 instead of GELU
    bool qk_norm;  // RMSNorm of each head's q and k (gains q_norm, k_norm), before the rotation
    int group;     // 0: fp32 matrices; else int8 ones, one scale per `group` inputs of a row (a multiple of 16)
};

// A weight matrix (n_out, n_in), row-major: fp32 values w, or int8 values q with scales (n_out, ceil(n_in /
// group)), w[r, i] = q[r, i] * scales[r, i / group] (a row's last group may be shorter).
struct Matrix {
    const float* w = nullptr;
    const int8_t* q = nullptr;
    const float* scales = nullptr;
};

// Pointers into the model's own tensors (row-major, as PyTorch holds them); a null bias means none.
struct DecoderLayer {
    const float *ln_1_weight, *ln_1_bias;
    Matrix attn_weight;                              // (3C, C): q, k, v
    const float* attn_bias;
    const float *q_norm, *k_norm;                    // (head_size,) each, or null without qk_norm
    Matrix attn_proj_weight;                         // (C, C)
    const float* attn_proj_bias;
    const float *ln_2_weight, *ln_2_bias;
    Matrix fc_weight;                                // (H, C), or (2H, C) for SwiGLU
    const float* fc_bias;
    Matrix mlp_proj_weight;                          // (C, H)
    const float* mlp_proj_bias;
    float *k_cache, *v_cache;                        // (B, n_head, block_size, head_size)
};

struct DecoderWeights {
    Matrix wte;                                // (V, C): a token's row is read (and dequantised) alone
    const float* wpe;                          // (block_size, C), or null with rope
    const float *rope_cos, *rope_sin;          // (block_size, head_size / 2), or null without rope
    std::vector<DecoderLayer> layers;
    const float *ln_f_weight, *ln_f_bias;
    Matrix lm_head;                            // (V, C), may be wte itself
};

// Memory for a model's weights (GPT.pack_weights_ puts them all in one, in the order a step reads them):
// aligned to 2 MB and, on Linux, backed by transparent huge pages where the system allows. Every token reads
// every weight once, and with 4 KB pages the TLB misses of that stream cost ~15% of a 42M model's step.
class WeightBlock {
  public:
    explicit WeightBlock(size_t n_floats);
    ~WeightBlock();
    WeightBlock(const WeightBlock&) = delete;
    WeightBlock& operator=(const WeightBlock&) = delete;
    float* data() { return data_; }

  private:
    float* data_;
};

// The instruction sets the step's vector kernels are built for that this CPU runs, the widest first:
// some of "avx512", "avx2", and always "baseline".
std::vector<std::string> decode_instruction_sets();

// The one of decode_instruction_sets() that decode_step runs for isa: isa itself, or the widest when empty.
// Throws std::invalid_argument for a name this CPU does not run.
std::string resolve_instruction_set(const std::string& isa);

// tokens: (B,) the new tokens, at position pos (the caches hold positions 0..pos-1 and get pos written).
// logits: (B, V) out. The work is split over n_threads threads (the caller's included). isa: one of
// decode_instruction_sets(), or empty for the widest.
void decode_step(const DecoderConfig& config, const DecoderWeights& weights, const int64_t* tokens, int pos,
                 float* logits, int n_threads, const std::string& isa = "");

}  // namespace nanoslm
