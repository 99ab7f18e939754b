// The decoding step of decode.h. At batch 1 a step is ~25 matrix-vector products whose cost is reading the
// weights (60 MB for a 15M model with a 32K vocabulary), plus a few hundred tiny operations that cost
// eager PyTorch a few microseconds each. Here every thread runs the whole step in lockstep ("SPMD"):
// each computes its share of the rows of every matrix-vector product into a shared buffer and its share
// of the attention heads, then waits at a barrier; the tiny vector operations (norms, residual adds,
// activations) are done by every thread on its own copy, which costs less than another barrier.
#include "decode.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <new>
#include <stdexcept>
#include <system_error>
#include <cfloat>
#include <climits>
#include <thread>

#ifdef _WIN32
#include <process.h>
#define NSLM_GETPID() _getpid()
#else
#include <unistd.h>
#define NSLM_GETPID() getpid()
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define NSLM_PAUSE() _mm_pause()
#else
#define NSLM_PAUSE() std::this_thread::yield()
#endif

// Inlined into each kernel variant (see Kernels), so compiled for its instruction set.
#if defined(__GNUC__) || defined(__clang__)
#define NSLM_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define NSLM_INLINE __forceinline
#else
#define NSLM_INLINE inline
#endif
#if defined(__GNUC__) || defined(__clang__)
#define NSLM_UNROLL _Pragma("GCC unroll 4")
#else
#define NSLM_UNROLL
#endif

namespace nanoslm {
namespace {

// Waiting for another thread: spin first (the wait is usually microseconds), then yield the core, so that
// with more threads than free cores the thread waited for gets to run.
class Backoff {
  public:
    void pause() {
        if (++spins_ < (1 << 8)) NSLM_PAUSE();
        else std::this_thread::yield();
    }

  private:
    int spins_ = 0;
};

// All threads are busy until the step ends, so they spin at the barrier instead of sleeping.
class SpinBarrier {
  public:
    explicit SpinBarrier(int n) : n_(n) {}
    void wait() {
        if (n_ == 1) return;
        const int generation = generation_.load(std::memory_order_acquire);
        if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
            arrived_.store(0, std::memory_order_relaxed);
            generation_.fetch_add(1, std::memory_order_release);
        } else {
            Backoff backoff;
            while (generation_.load(std::memory_order_acquire) == generation) backoff.pause();
        }
    }

  private:
    const int n_;
    std::atomic<int> arrived_{0};
    std::atomic<int> generation_{0};
};

// Worker threads kept between steps: starting threads for every token would cost more than some layers.
// Between steps a worker spins briefly (the next token usually comes within a few hundred microseconds),
// then sleeps until woken. Created on first use and never destroyed (nothing to join at interpreter exit);
// a forked child, which has none of its parent's threads, makes its own.
class WorkerPool {
  public:
    static WorkerPool& get(int n_threads) {
        static std::mutex creation;
        static WorkerPool* pool = nullptr;
        static int most = INT_MAX;  // the size at which a thread could not start: no use asking for more
        std::lock_guard<std::mutex> lock(creation);
        if (pool && pool->pid_ != NSLM_GETPID()) most = INT_MAX;  // a forked child starts its own afresh
        n_threads = std::min(n_threads, most);
        if (!pool || pool->pid_ != NSLM_GETPID() || pool->size() < n_threads) {
            pool = new WorkerPool();
            // started one by one once the pool is whole; a thread that cannot start leaves a smaller pool
            try {
                while (pool->size() < n_threads) pool->add_worker();
            } catch (const std::system_error&) {
                most = pool->size();
            }
        }
        return *pool;
    }

    int size() const { return n_workers_ + 1; }

    // job(tid) for tid in [0, n): 0 on the calling thread, the others on workers; returns when all are done.
    void run(int n, const std::function<void(int)>& job) {
        std::lock_guard<std::mutex> one_job_at_a_time(running_);
        job_ = &job;
        n_active_ = n;
        pending_.store(n_workers_, std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            generation_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        job(0);
        Backoff backoff;
        while (pending_.load(std::memory_order_acquire) != 0) backoff.pause();
    }

  private:
    WorkerPool() : pid_(NSLM_GETPID()) {}

    void add_worker() {
        const int tid = n_workers_ + 1;
        std::thread([this, tid] { loop(tid); }).detach();
        ++n_workers_;
    }

    void loop(int tid) {
        uint64_t seen = 0;
        for (;;) {
            for (int spin = 0; spin < (1 << 16) && generation_.load(std::memory_order_acquire) == seen; ++spin)
                NSLM_PAUSE();
            if (generation_.load(std::memory_order_acquire) == seen) {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
            }
            seen = generation_.load(std::memory_order_acquire);
            if (tid < n_active_) (*job_)(tid);
            pending_.fetch_sub(1, std::memory_order_acq_rel);
        }
    }

    const int pid_;
    int n_workers_ = 0;
    std::mutex running_, mutex_;
    std::condition_variable wake_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> pending_{0};
    const std::function<void(int)>* job_ = nullptr;
    int n_active_ = 0;
};

// L floats in a vector the compiler lowers to the target's registers (GCC/Clang vector extensions): 16 fill
// an AVX-512 register, 8 an AVX2 one. The width must match the target: 16-float vectors compiled for AVX2
// made the step ~3x slower than 8-float ones (measured), and 8-float ones for AVX-512 ~20% slower than 16.
// Loads and stores need not be aligned.
#if (defined(__GNUC__) || defined(__clang__)) && !defined(NSLM_PORTABLE_VECTORS)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // "vector return changes the ABI": these are always inlined
#endif
template <int L>
struct Lanes {
    typedef float type __attribute__((vector_size(4 * L), aligned(4), may_alias));
};
template <int L>
using vec = typename Lanes<L>::type;
template <int L>
NSLM_INLINE vec<L> load(const float* p) {
    return *reinterpret_cast<const vec<L>*>(p);
}
template <int L>
NSLM_INLINE void store(float* p, vec<L> v) {
    *reinterpret_cast<vec<L>*>(p) = v;
}
#else  // other compilers: the same operations on a plain array, which they may vectorize
template <int L>
struct vec {
    float lane[L];
    float operator[](int j) const { return lane[j]; }
    vec& operator+=(const vec& o) {
        for (int j = 0; j < L; ++j) lane[j] += o.lane[j];
        return *this;
    }
};
template <int L>
NSLM_INLINE vec<L> operator+(vec<L> a, const vec<L>& b) {
    return a += b;
}
template <int L>
NSLM_INLINE vec<L> operator*(vec<L> a, const vec<L>& b) {
    for (int j = 0; j < L; ++j) a.lane[j] *= b.lane[j];
    return a;
}
template <int L>
NSLM_INLINE vec<L> operator*(float s, vec<L> a) {
    for (int j = 0; j < L; ++j) a.lane[j] *= s;
    return a;
}
template <int L>
NSLM_INLINE vec<L> load(const float* p) {
    vec<L> v;
    std::memcpy(v.lane, p, sizeof v.lane);
    return v;
}
template <int L>
NSLM_INLINE void store(float* p, const vec<L>& v) {
    std::memcpy(p, v.lane, sizeof v.lane);
}
#endif

// A tree of halvings in registers: a running sum over the lanes would be L dependent additions per row.
template <int L>
NSLM_INLINE float sum_lanes(vec<L> v) {
#if (defined(__clang__) || __GNUC__ >= 12) && !defined(NSLM_PORTABLE_VECTORS)
    typedef float vec4 __attribute__((vector_size(16)));
    vec4 q;
    if constexpr (L == 16) {
        const vec<8> h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
        q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    } else {
        static_assert(L == 8, "sum_lanes: 8 or 16 lanes");
        q = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
    }
    return (q[0] + q[2]) + (q[1] + q[3]);
#else
    float sum = 0.0f;
    for (int j = 0; j < L; ++j) sum += v[j];
    return sum;
#endif
}

template <int L>
NSLM_INLINE float dot(const float* a, const float* b, int n) {
    vec<L> acc = {};
    int i = 0;
    for (; i + L <= n; i += L) acc += load<L>(a + i) * load<L>(b + i);
    float sum = sum_lanes<L>(acc);
    for (; i < n; ++i) sum += a[i] * b[i];
    return sum;
}

// Y[b, r] = W[r] . X[b] + bias[r] for four rows r0..r0+3 and S sequences b0..b0+S-1: the 4 x S partial sums
// stay in registers, each load of w serves S sequences and each load of x four rows.
template <int L, int S>
NSLM_INLINE void four_rows(const float* W, const float* bias, const float* X, float* Y, int n_in, int n_out, int r0,
                           int b0) {
    const float* w[4];
    const float* x[S];
    for (int k = 0; k < 4; ++k) w[k] = W + size_t(r0 + k) * n_in;
    for (int s = 0; s < S; ++s) x[s] = X + size_t(b0 + s) * n_in;
    vec<L> acc[4][S] = {};
    int i = 0;
    for (; i + L <= n_in; i += L) {
        vec<L> xv[S];
        for (int s = 0; s < S; ++s) xv[s] = load<L>(x[s] + i);
        for (int k = 0; k < 4; ++k) {
            const vec<L> wv = load<L>(w[k] + i);
            for (int s = 0; s < S; ++s) acc[k][s] += wv * xv[s];
        }
    }
    float sum[4][S];  // the reductions stay in registers only when these loops are unrolled
    NSLM_UNROLL
    for (int k = 0; k < 4; ++k) {
        NSLM_UNROLL
        for (int s = 0; s < S; ++s) sum[k][s] = sum_lanes<L>(acc[k][s]);
    }
    for (; i < n_in; ++i)  // the tail, when n_in is not a multiple of L
        for (int k = 0; k < 4; ++k)
            for (int s = 0; s < S; ++s) sum[k][s] += w[k][i] * x[s][i];
    for (int k = 0; k < 4; ++k)
        for (int s = 0; s < S; ++s)
            Y[size_t(b0 + s) * n_out + r0 + k] = bias ? sum[k][s] + bias[r0 + k] : sum[k][s];
}

// Y[b, r] = W[r] . X[b] + bias[r] for rows r in [r0, r1) and every b < B. W: (n_out, n_in). A block of four
// rows stays in L1 while every sequence of the batch uses it, so the weights are read once per step.
template <int L>
NSLM_INLINE void matvec_rows(const float* W, const float* bias, const float* X, float* Y, int B, int n_in,
                             int n_out, int r0, int r1) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        int b = 0;
        for (; b + 4 <= B; b += 4) four_rows<L, 4>(W, bias, X, Y, n_in, n_out, r, b);
        for (; b + 2 <= B; b += 2) four_rows<L, 2>(W, bias, X, Y, n_in, n_out, r, b);
        for (; b < B; ++b) four_rows<L, 1>(W, bias, X, Y, n_in, n_out, r, b);
    }
    for (; r < r1; ++r)
        for (int b = 0; b < B; ++b) {
            const float s = dot<L>(W + size_t(r) * n_in, X + size_t(b) * n_in, n_in);
            Y[size_t(b) * n_out + r] = bias ? s + bias[r] : s;
        }
}

// One head of one sequence: write its new key and value into the cache at pos, then attend over 0..pos.
template <int L>
NSLM_INLINE void attend(int hs, float* q, const float* k, const float* v, float* k_cache, float* v_cache, int pos,
                        float* scores, float* out) {
    std::copy(k, k + hs, k_cache + size_t(pos) * hs);
    std::copy(v, v + hs, v_cache + size_t(pos) * hs);
    const float scale = 1.0f / std::sqrt(float(hs));
    float max_score = -INFINITY;
    for (int t = 0; t <= pos; ++t) {
        scores[t] = dot<L>(q, k_cache + size_t(t) * hs, hs) * scale;
        max_score = std::max(max_score, scores[t]);
    }
    float total = 0.0f;
    for (int t = 0; t <= pos; ++t) total += (scores[t] = std::exp(scores[t] - max_score));
    std::fill(out, out + hs, 0.0f);
    for (int t = 0; t <= pos; ++t) {
        const float p = scores[t] / total;
        const float* vt = v_cache + size_t(t) * hs;
        int i = 0;
        for (; i + L <= hs; i += L) store<L>(out + i, load<L>(out + i) + p * load<L>(vt + i));
        for (; i < hs; ++i) out[i] += p * vt[i];
    }
}

// The int8 kernels (decode_int8.h): a plain build, one for AVX2 (which plain AVX-512 uses too: its products of
// int8 pairs are AVX2 instructions), and one for AVX-512 VNNI. Each defines how a row of int8 weights meets a
// group of int8 inputs.
namespace int8_baseline {
using Acc = float;
template <int G>
NSLM_INLINE void add_group(Acc& acc, const int8_t* q, const int8_t* x, int i, float scale) {
    int32_t dot = 0;
    for (int j = i; j < i + G; ++j) dot += int32_t(q[j]) * int32_t(x[j]);
    acc += scale * float(dot);
}
NSLM_INLINE float sum_acc(Acc a) { return a; }
#include "decode_int8.h"
}  // namespace int8_baseline

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(NSLM_PORTABLE_VECTORS)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace int8_avx2 {
using Acc = __m256;  // 8 float partial sums
// 32 inputs at a time, as llama.cpp does: vpmaddubsw multiplies unsigned by signed bytes, so it takes |x| and
// the weights with x's signs; the pairs' sums fit int16 (2 * 127 * 127), vpmaddwd adds them to 8 int32s.
template <int G>
NSLM_INLINE void add_group(Acc& acc, const int8_t* q, const int8_t* x, int i, float scale) {
    static_assert(G % 32 == 0, "a group is whole 32-byte registers");
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i dot = _mm256_setzero_si256();
    NSLM_UNROLL
    for (int h = 0; h < G; h += 32) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + h));
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i + h));
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv));
        dot = _mm256_add_epi32(dot, _mm256_madd_epi16(pairs, ones));
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), acc);
}
NSLM_INLINE float sum_acc(Acc a) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
#include "decode_int8.h"
}  // namespace int8_avx2
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512vnni")
#endif
namespace int8_vnni {
using Acc = __m256;
// AVX2's group product with VNNI's vpdpbusd, which multiplies the same unsigned-by-signed byte pairs and adds
// each four into an int32 lane in one instruction (vpmaddubsw + vpmaddwd + vpaddd above). On 256-bit
// registers (AVX512VL), so that a group of 32 stays one register and its scale one broadcast.
template <int G>
NSLM_INLINE void add_group(Acc& acc, const int8_t* q, const int8_t* x, int i, float scale) {
    static_assert(G % 32 == 0, "a group is whole 32-byte registers");
    __m256i dot = _mm256_setzero_si256();
    NSLM_UNROLL
    for (int h = 0; h < G; h += 32) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + h));
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i + h));
        dot = _mm256_dpbusd_epi32(dot, _mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv));
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), acc);
}
NSLM_INLINE float sum_acc(Acc a) { return int8_avx2::sum_acc(a); }
#include "decode_int8.h"
}  // namespace int8_vnni
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

// The vector kernels, each compiled for one instruction set; decode_step uses the widest the CPU runs.
#define NSLM_MATVEC_ARGS const float *W, const float *bias, const float *X, float *Y, int B, int n_in, int n_out, \
                         int r0, int r1
#define NSLM_ATTEND_ARGS int hs, float *q, const float *k, const float *v, float *k_cache, float *v_cache, int pos, \
                         float *scores, float *out
#define NSLM_INT8_ARGS const int8_t *Q, const float *scales, int group, const float *bias, const float *X, \
                       float *Y, int B, int n_in, int n_out, int r0, int r1, int8_t *Xq, float *Xs
#define NSLM_KERNELS(suffix, target, L, int8)                                                             \
    target void matvec_rows_##suffix(NSLM_MATVEC_ARGS) { matvec_rows<L>(W, bias, X, Y, B, n_in, n_out, r0, r1); } \
    target void matvec_rows_int8_##suffix(NSLM_INT8_ARGS) {                                               \
        int8::matvec_rows_int8(Q, scales, group, bias, X, Y, B, n_in, n_out, r0, r1, Xq, Xs);             \
    }                                                                                                     \
    target void attend_##suffix(NSLM_ATTEND_ARGS) { attend<L>(hs, q, k, v, k_cache, v_cache, pos, scores, out); }

NSLM_KERNELS(baseline, , 8, int8_baseline)
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(NSLM_PORTABLE_VECTORS)
#define NSLM_X86_VARIANTS
NSLM_KERNELS(avx2, __attribute__((target("avx2,fma"))), 8, int8_avx2)
NSLM_KERNELS(avx512, __attribute__((target("avx512f,fma"))), 16, int8_avx2)
NSLM_KERNELS(avx512vnni, __attribute__((target("avx512f,avx512vl,avx512vnni,fma"))), 16, int8_vnni)
#endif

struct Kernels {
    const char* isa;
    void (*matvec_rows)(NSLM_MATVEC_ARGS);
    void (*matvec_rows_int8)(NSLM_INT8_ARGS);
    void (*attend)(NSLM_ATTEND_ARGS);
};

// Those this CPU runs, the widest first.
const std::vector<Kernels>& supported_kernels() {
    static const std::vector<Kernels> kernels = [] {
        std::vector<Kernels> found;
#ifdef NSLM_X86_VARIANTS
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) {
            if (__builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
                found.push_back(
                    {"avx512vnni", matvec_rows_avx512vnni, matvec_rows_int8_avx512vnni, attend_avx512vnni});
            found.push_back({"avx512", matvec_rows_avx512, matvec_rows_int8_avx512, attend_avx512});
        }
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            found.push_back({"avx2", matvec_rows_avx2, matvec_rows_int8_avx2, attend_avx2});
#endif
        found.push_back({"baseline", matvec_rows_baseline, matvec_rows_int8_baseline, attend_baseline});
        return found;
    }();
    return kernels;
}

const Kernels& kernels_for(const std::string& isa) {
    for (const Kernels& k : supported_kernels())
        if (isa.empty() || isa == k.isa) return k;
    throw std::invalid_argument("instruction set '" + isa + "' is not one this CPU runs the decoder with");
}

// This thread's share of n rows: contiguous, in multiples of 4 so the kernel's row blocks stay whole.
std::pair<int, int> share(int n, int tid, int n_threads) {
    const int blocks = (n + 3) / 4;
    const int begin = std::min(n, 4 * int(int64_t(blocks) * tid / n_threads));
    const int end = std::min(n, 4 * int(int64_t(blocks) * (tid + 1) / n_threads));
    return {begin, end};
}

void norm(const DecoderConfig& c, const float* x, const float* weight, const float* bias, float* out) {
    const int C = c.n_embd;
    for (int b = 0; b < c.batch_size; ++b, x += C, out += C) {
        if (c.rmsnorm) {
            float sum_sq = 0.0f;
            for (int i = 0; i < C; ++i) sum_sq += x[i] * x[i];
            const float inv = 1.0f / std::sqrt(sum_sq / C + c.eps);
            for (int i = 0; i < C; ++i) out[i] = x[i] * inv * weight[i];
        } else {
            float mean = 0.0f, var = 0.0f;
            for (int i = 0; i < C; ++i) mean += x[i];
            mean /= C;
            for (int i = 0; i < C; ++i) var += (x[i] - mean) * (x[i] - mean);
            const float inv = 1.0f / std::sqrt(var / C + c.eps);
            for (int i = 0; i < C; ++i) out[i] = (x[i] - mean) * inv * weight[i] + (bias ? bias[i] : 0.0f);
        }
    }
}

// v (n,) to v / rms(v) * weight, in place: RMSNorm of one head's query or key.
void rms_normalize(float* v, const float* weight, int n, float eps) {
    float sum_sq = 0.0f;
    for (int i = 0; i < n; ++i) sum_sq += v[i] * v[i];
    const float inv = 1.0f / std::sqrt(sum_sq / n + eps);
    for (int i = 0; i < n; ++i) v[i] = v[i] * inv * weight[i];
}

// Rotate the pairs (v[i], v[i + hs/2]) by the angles of one position: Hugging Face Llama's half-split layout.
void rotate(float* v, const float* cos, const float* sin, int half) {
    for (int i = 0; i < half; ++i) {
        const float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * cos[i] - x2 * sin[i];
        v[i + half] = x2 * cos[i] + x1 * sin[i];
    }
}

float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x)));
}

float silu(float x) { return x / (1.0f + std::exp(-x)); }

}  // namespace

constexpr size_t kHugePage = size_t(2) << 20;

WeightBlock::WeightBlock(size_t n_floats) {
    const size_t bytes = std::max<size_t>(1, (n_floats * sizeof(float) + kHugePage - 1) / kHugePage) * kHugePage;
    data_ = static_cast<float*>(::operator new(bytes, std::align_val_t(kHugePage)));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(data_, bytes, MADV_HUGEPAGE);  // before the first write faults the pages in; a hint, may be refused
#endif
}

WeightBlock::~WeightBlock() { ::operator delete(data_, std::align_val_t(kHugePage)); }

std::vector<std::string> decode_instruction_sets() {
    std::vector<std::string> names;
    for (const Kernels& k : supported_kernels()) names.push_back(k.isa);
    return names;
}

std::string resolve_instruction_set(const std::string& isa) { return kernels_for(isa).isa; }

void decode_step(const DecoderConfig& c, const DecoderWeights& w, const int64_t* tokens, int pos, float* logits,
                 int n_threads, const std::string& isa) {
    const int B = c.batch_size, C = c.n_embd, V = c.vocab_size;
    const int hs = C / c.n_head;
    // without layers there is no MLP: hidden is then checked against no weight, so nothing is sized by it
    const int H = c.n_layer ? c.hidden : 0;
    const int fc_rows = c.swiglu ? 2 * H : H;
    // Shared: the outputs of the matrix-vector products, each row written by one thread.
    std::vector<float> qkv(size_t(B) * 3 * C), heads(size_t(B) * C), attn_out(size_t(B) * C),
        fc_out(size_t(B) * fc_rows), mlp_out(size_t(B) * C);
    const Kernels& kernels = kernels_for(isa);
    // rows [r0, r1) of Y = W X + bias, for the (B, n_in) inputs X: W fp32 or int8 (decode.h: Matrix)
    // (int8: X quantised first, into this thread's Xq and Xs)
    auto matvec = [&](const Matrix& W, const float* bias, const float* X, float* Y, int n_in, int n_out, int r0,
                      int r1, int8_t* Xq, float* Xs) {
        if (W.q) kernels.matvec_rows_int8(W.q, W.scales, c.group, bias, X, Y, B, n_in, n_out, r0, r1, Xq, Xs);
        else kernels.matvec_rows(W.w, bias, X, Y, B, n_in, n_out, r0, r1);
    };
    WorkerPool* pool = n_threads > 1 ? &WorkerPool::get(n_threads) : nullptr;
    if (pool) n_threads = std::min(n_threads, pool->size());
    SpinBarrier barrier(n_threads);

    auto run = [&](int tid) {
        // Private: the residual stream and the vectors derived from it, identical in every thread.
        std::vector<float> x(size_t(B) * C), xn(size_t(B) * C), act(size_t(B) * H), scores(pos + 1);
        const int widest = std::max(C, H);  // the longest input of a matrix-vector product
        std::vector<int8_t> xq(c.group ? size_t(B) * widest : 0);
        std::vector<float> xs(c.group ? size_t(B) * ((widest + c.group - 1) / c.group) : 0);
        for (int b = 0; b < B; ++b) {
            const size_t row = size_t(tokens[b]);
            const int n_groups = c.group ? (C + c.group - 1) / c.group : 0;
            for (int i = 0; i < C; ++i) {
                const float e = w.wte.q ? float(w.wte.q[row * C + i]) * w.wte.scales[row * n_groups + i / c.group]
                                        : w.wte.w[row * C + i];
                x[size_t(b) * C + i] = e + (w.wpe ? w.wpe[size_t(pos) * C + i] : 0.0f);
            }
        }
        for (const DecoderLayer& L : w.layers) {
            norm(c, x.data(), L.ln_1_weight, L.ln_1_bias, xn.data());
            auto [q0, q1] = share(3 * C, tid, n_threads);
            matvec(L.attn_weight, L.attn_bias, xn.data(), qkv.data(), C, 3 * C, q0, q1, xq.data(), xs.data());
            barrier.wait();
            for (int task = tid; task < B * c.n_head; task += n_threads) {
                const int b = task / c.n_head, h = task % c.n_head;
                float* q = qkv.data() + size_t(b) * 3 * C + h * hs;  // this task's slice only
                float* k = q + C;
                if (c.qk_norm) {
                    rms_normalize(q, L.q_norm, hs, c.eps);
                    rms_normalize(k, L.k_norm, hs, c.eps);
                }
                if (c.rope) {
                    const float* cos = w.rope_cos + size_t(pos) * (hs / 2);
                    const float* sin = w.rope_sin + size_t(pos) * (hs / 2);
                    rotate(q, cos, sin, hs / 2);
                    rotate(k, cos, sin, hs / 2);
                }
                const size_t cache_offset = size_t(task) * c.block_size * hs;  // (b, h) of (B, nh, block, hs)
                kernels.attend(hs, q, k, q + 2 * C, L.k_cache + cache_offset, L.v_cache + cache_offset, pos, scores.data(),
                       heads.data() + size_t(b) * C + h * hs);
            }
            barrier.wait();
            auto [p0, p1] = share(C, tid, n_threads);
            matvec(L.attn_proj_weight, L.attn_proj_bias, heads.data(), attn_out.data(), C, C, p0, p1, xq.data(),
                   xs.data());
            barrier.wait();
            for (size_t i = 0; i < x.size(); ++i) x[i] += attn_out[i];
            norm(c, x.data(), L.ln_2_weight, L.ln_2_bias, xn.data());
            auto [f0, f1] = share(fc_rows, tid, n_threads);
            matvec(L.fc_weight, L.fc_bias, xn.data(), fc_out.data(), C, fc_rows, f0, f1, xq.data(), xs.data());
            barrier.wait();
            for (int b = 0; b < B; ++b) {
                const float* h = fc_out.data() + size_t(b) * fc_rows;
                float* a = act.data() + size_t(b) * H;
                if (c.swiglu) for (int i = 0; i < H; ++i) a[i] = silu(h[i]) * h[H + i];
                else if (c.relu2) for (int i = 0; i < H; ++i) a[i] = h[i] > 0.0f ? h[i] * h[i] : 0.0f;
                else for (int i = 0; i < H; ++i) a[i] = gelu_tanh(h[i]);
            }
            matvec(L.mlp_proj_weight, L.mlp_proj_bias, act.data(), mlp_out.data(), H, C, p0, p1, xq.data(),
                   xs.data());
            barrier.wait();
            for (size_t i = 0; i < x.size(); ++i) x[i] += mlp_out[i];
        }
        norm(c, x.data(), w.ln_f_weight, w.ln_f_bias, xn.data());
        auto [v0, v1] = share(V, tid, n_threads);
        matvec(w.lm_head, nullptr, xn.data(), logits, C, V, v0, v1, xq.data(), xs.data());
    };

    if (n_threads == 1) run(0);
    else pool->run(n_threads, run);
}

}  // namespace nanoslm
