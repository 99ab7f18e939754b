// The int8 matrix-vector kernels of decode.cpp's step: included there once for each instruction set, inside
// a namespace that first defines load_int8<L>(p), L int8 weights as L floats (vec<L>) for that set.
// Not a header to include anywhere else.

// y[r] = (Q[r] * scales[r]) . x + bias[r] for K rows r0..r0+K-1 of an int8 matrix and one sequence, groups of
// G inputs: each group's K partial sums are plain int8 x fp32 products in registers, scaled once per group and
// row. Batch-1 decoding is bound by reading the weights, and int8 ones are a quarter of the bytes (plus a
// scale per G); the conversion to float is cheap next to that.
template <int L, int G, int K>
NSLM_INLINE void rows_int8(const int8_t* Q, const float* scales, const float* bias, const float* x, float* y,
                           int n_in, int r0) {
    static_assert(G % L == 0, "a group is whole vectors");
    const int n_groups = (n_in + G - 1) / G;
    const int8_t* q[K];
    const float* s[K];
    for (int k = 0; k < K; ++k) {
        q[k] = Q + size_t(r0 + k) * n_in;
        s[k] = scales + size_t(r0 + k) * n_groups;
    }
    vec<L> acc[K] = {};
    int i = 0, g = 0;
    for (; i + G <= n_in; i += G, ++g) {
        vec<L> part[K] = {};
        NSLM_UNROLL
        for (int j = i; j < i + G; j += L) {
            const vec<L> xv = load<L>(x + j);
            for (int k = 0; k < K; ++k) part[k] += load_int8<L>(q[k] + j) * xv;
        }
        for (int k = 0; k < K; ++k) acc[k] += s[k][g] * part[k];
    }
    float sum[K];
    NSLM_UNROLL
    for (int k = 0; k < K; ++k) sum[k] = sum_lanes<L>(acc[k]);
    if (i < n_in)  // a last, shorter group, when n_in is not a multiple of G
        for (int k = 0; k < K; ++k) {
            float part = 0.0f;
            for (int j = i; j < n_in; ++j) part += float(q[k][j]) * x[j];
            sum[k] += s[k][g] * part;
        }
    for (int k = 0; k < K; ++k) y[r0 + k] = bias ? sum[k] + bias[r0 + k] : sum[k];
}

// matvec_rows for an int8 matrix (decode.h: Matrix): rows [r0, r1) of every sequence, four rows at a time.
template <int L, int G>
NSLM_INLINE void matvec_rows_int8_g(const int8_t* Q, const float* scales, const float* bias, const float* X,
                                    float* Y, int B, int n_in, int n_out, int r0, int r1) {
    int r = r0;
    for (; r + 4 <= r1; r += 4)
        for (int b = 0; b < B; ++b)
            rows_int8<L, G, 4>(Q, scales, bias, X + size_t(b) * n_in, Y + size_t(b) * n_out, n_in, r);
    for (; r < r1; ++r)
        for (int b = 0; b < B; ++b)
            rows_int8<L, G, 1>(Q, scales, bias, X + size_t(b) * n_in, Y + size_t(b) * n_out, n_in, r);
}

template <int L>
NSLM_INLINE void matvec_rows_int8(const int8_t* Q, const float* scales, int group, const float* bias,
                                  const float* X, float* Y, int B, int n_in, int n_out, int r0, int r1) {
    if (group == 32) matvec_rows_int8_g<L, 32>(Q, scales, bias, X, Y, B, n_in, n_out, r0, r1);
    else matvec_rows_int8_g<L, 64>(Q, scales, bias, X, Y, B, n_in, n_out, r0, r1);  // checked: 32 or 64
}

