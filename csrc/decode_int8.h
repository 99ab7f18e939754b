// The int8 matrix-vector kernels of decode.cpp's step: included there once for each instruction set, inside a
// namespace that first defines, for that set, how a row of int8 weights meets a group of int8 inputs:
//   Acc                               a row's running sum of scaled group products (a float, or a vector)
//   add_group<G>(acc, q, x, i, scale) acc += scale * (q[i..i+G) . x[i..i+G)), the dot product in integers
//   sum_acc(acc)                      the float total of an Acc
// Not a header to include anywhere else.

// X (B, n_in) fp32 -> Xq (B, n_in) int8 with Xs (B, ceil(n_in / G)) scales: each group of G inputs of a row
// quantised as the weights are (quantize.py: quantize_int8), scale = max |x| / 127 and q = x / scale rounded
// half to even, the same numbers as PyTorch's reference. A row's last group may be shorter.
template <int G>
NSLM_INLINE void quantize_inputs(const float* X, int B, int n_in, int8_t* Xq, float* Xs) {
    const int n_groups = (n_in + G - 1) / G;
    for (int b = 0; b < B; ++b) {
        const float* x = X + size_t(b) * n_in;
        int8_t* xq = Xq + size_t(b) * n_in;
        for (int g = 0; g < n_groups; ++g) {
            const int i0 = g * G, i1 = std::min(n_in, i0 + G);
            float amax = 0.0f;
            for (int i = i0; i < i1; ++i) amax = std::max(amax, std::fabs(x[i]));
            const float scale = amax / 127.0f;
            Xs[size_t(b) * n_groups + g] = scale;
            const float divisor = scale > 0.0f ? scale : FLT_MIN;  // an all-zero group: every q is 0
            for (int i = i0; i < i1; ++i) {
                const float v = std::nearbyint(x[i] / divisor);  // the default rounding: half to even
                xq[i] = int8_t(v >= 127.0f ? 127 : v <= -127.0f ? -127 : v == v ? int(v) : 0);  // NaN: 0
            }
        }
    }
}

// y[r] = sum over groups g of scales[r, g] * xs[g] * (Q[r] . xq over g) + bias[r], for one row r of one
// sequence: llama.cpp's Q8_0 x Q8_0 product. The integer dot products are exact (at most 64 * 127 * 127); the
// scales multiply each group's once. One row at a time, unlike the fp32 kernel's four: an int8 row is a few
// hundred bytes, and four of them read in step are four short streams that the hardware prefetcher does not
// follow (measured: 42M at batch 1 decoded at 290 t/s with four rows at a time, 520 with one).
template <int G>
NSLM_INLINE void row_int8(const int8_t* Q, const float* scales, const float* bias, const int8_t* xq,
                          const float* xs, float* y, int n_in, int r) {
    const int n_groups = (n_in + G - 1) / G;
    const int8_t* q = Q + size_t(r) * n_in;
    const float* s = scales + size_t(r) * n_groups;
    Acc acc{};
    int i = 0, g = 0;
    for (; i + G <= n_in; i += G, ++g) add_group<G>(acc, q, xq, i, s[g] * xs[g]);
    float sum = sum_acc(acc);
    if (i < n_in) {  // a last, shorter group, when n_in is not a multiple of G
        int32_t dot = 0;
        for (int j = i; j < n_in; ++j) dot += int32_t(q[j]) * int32_t(xq[j]);
        sum += s[g] * xs[g] * float(dot);
    }
    y[r] = bias ? sum + bias[r] : sum;
}

// matvec_rows for an int8 matrix (decode.h: Matrix): rows [r0, r1) of every sequence. Xq, Xs: room for the
// quantised inputs, (B, n_in) and (B, ceil(n_in / G)).
template <int G>
NSLM_INLINE void matvec_rows_int8_g(const int8_t* Q, const float* scales, const float* bias, const float* X,
                                    float* Y, int B, int n_in, int n_out, int r0, int r1, int8_t* Xq, float* Xs) {
    quantize_inputs<G>(X, B, n_in, Xq, Xs);
    const int n_groups = (n_in + G - 1) / G;
    for (int r = r0; r < r1; ++r)
        for (int b = 0; b < B; ++b)
            row_int8<G>(Q, scales, bias, Xq + size_t(b) * n_in, Xs + size_t(b) * n_groups, Y + size_t(b) * n_out,
                        n_in, r);
}

NSLM_INLINE void matvec_rows_int8(const int8_t* Q, const float* scales, int group, const float* bias,
                                  const float* X, float* Y, int B, int n_in, int n_out, int r0, int r1, int8_t* Xq,
                                  float* Xs) {
    if (group == 32) matvec_rows_int8_g<32>(Q, scales, bias, X, Y, B, n_in, n_out, r0, r1, Xq, Xs);
    else matvec_rows_int8_g<64>(Q, scales, bias, X, Y, B, n_in, n_out, r0, r1, Xq, Xs);  // checked: 32 or 64
}
