/*
 * What the CPU kernels (_kernels.c, _attention.c) share: one contiguous range of work per OpenMP thread
 * (the GIL released), loops compiled twice (for x86-64-v3 = AVX2 + FMA, and for the baseline) and
 * picked at load time by the CPU, a vectorizable exp, and the row reductions built on it.
 *
 * Built (setup.py) with -O3, -fopenmp, and -fno-trapping-math, without which gcc does not vectorize
 * the clamps in exp_poly (it may not evaluate both sides of a comparison that could trap).
 */
#ifndef SCRATCHLM_CPU_H
#define SCRATCHLM_CPU_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MIN_ELEMENTS_PER_THREAD 16384 /* below this, starting a thread costs more than it saves */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTORIZED __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VECTORIZED
#endif
/* Helpers are inlined into each clone (a plain `inline` is not, into the AVX2 one, and the loop that
 * calls it then stays scalar). */
#define INLINE static inline __attribute__((always_inline))

/* exp(x) = 2^k * exp(r), k = round(x / ln 2), |r| <= ln2 / 2; exp(r) by the polynomial of Cephes' expf.
 * Branch-free, so that gcc vectorizes loops that call it. A NaN stays NaN through the arithmetic. */
INLINE float exp_poly(float x) {
    x = x < -87.33654f ? -87.33654f : x; /* keeps 2^k a normal float; with -fno-trapping-math these */
    x = x > 88.0f ? 88.0f : x;           /* vectorize as blends, where fminf / fmaxf do not */
    float k = x * 1.44269504088896341f + 12582912.0f; /* round to nearest via the float's mantissa */
    k -= 12582912.0f;
    float r = x - k * 0.693359375f; /* ln 2 in two parts, so r is exact */
    r = r + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* e[i] = exp(-x[i]) for a block of at most EXP_BLOCK elements. Loops that use exp_poly in a quotient
 * (SiLU: g / (1 + exp(-g))) take it from such a block, not inline: inline, gcc gives each clamp of
 * exp_poly a path of its own, where exp is a constant, and evaluates every path for every lane before
 * blending; the path of x < -87 divides g by 1 + e^87, whose quotient is subnormal, and Intel cores
 * compute subnormals in microcode. SwiGLU's activation ran 12x slower for it (8.7 against 0.7 ns an
 * element on a Xeon; AMD's cores pay little). */
#define EXP_BLOCK 256
INLINE void exp_negated(const float *restrict x, float *restrict e, int64_t n) {
    for (int64_t i = 0; i < n; i++) e[i] = exp_poly(-x[i]);
}

/* ---- splitting work over threads ---- */

typedef void (*RangeFn)(const void *args, int64_t begin, int64_t end, int part);

/* Runs fn over [0, n) in up to `threads` contiguous parts, in OpenMP threads, with the GIL released.
 * PyTorch's CPU wheels ship their own libgomp.so.1; imported after torch, this module shares that
 * runtime and so the same worker threads (its own POSIX threads were 2x slower: they competed with
 * PyTorch's, which spin-wait for work after each operation). `cost` is the number of elements each of
 * the n items touches. Returns the number of parts. */
static inline int parallel_for(RangeFn fn, const void *args, int64_t n, int64_t cost, int threads) {
    int64_t useful = (n * cost) / MIN_ELEMENTS_PER_THREAD;
    if (threads > useful) threads = (int)(useful > 1 ? useful : 1);
    if (threads > n) threads = (int)(n > 1 ? n : 1);
    Py_BEGIN_ALLOW_THREADS
    if (threads == 1) {
        fn(args, 0, n, 0);
    } else {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
        for (int t = 0; t < threads; t++) fn(args, n * t / threads, n * (t + 1) / threads, t);
    }
    Py_END_ALLOW_THREADS
    return threads;
}

#define LANES 8 /* independent partial sums, so the reductions vectorize without reassociation flags */

INLINE float dot(const float *restrict a, const float *restrict b, int64_t d) {
    float lanes[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= d; j += LANES)
        for (int l = 0; l < LANES; l++) lanes[l] += a[j + l] * b[j + l];
    float total = 0.0f;
    for (; j < d; j++) total += a[j] * b[j];
    for (int l = 0; l < LANES; l++) total += lanes[l];
    return total;
}

INLINE float row_max(const float *restrict z, int64_t n) {
    float lanes[LANES];
    for (int l = 0; l < LANES; l++) lanes[l] = -INFINITY;
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) lanes[l] = z[j + l] > lanes[l] ? z[j + l] : lanes[l];
    float top = -INFINITY;
    for (; j < n; j++) top = z[j] > top ? z[j] : top;
    for (int l = 0; l < LANES; l++) top = lanes[l] > top ? lanes[l] : top;
    return top;
}

/* z <- exp(z - top) (when `keep`), returns the sum of exp(z - top). */
INLINE float exp_sum(float *restrict z, float top, int64_t n, int keep) {
    float lanes[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float e = exp_poly(z[j + l] - top);
            if (keep) z[j + l] = e;
            lanes[l] += e;
        }
    float total = 0.0f;
    for (; j < n; j++) {
        float e = exp_poly(z[j] - top);
        if (keep) z[j] = e;
        total += e;
    }
    for (int l = 0; l < LANES; l++) total += lanes[l];
    return total;
}

INLINE void scale(float *restrict z, float factor, int64_t n) {
    for (int64_t j = 0; j < n; j++) z[j] *= factor;
}

#define PTR(type, v) ((type *)(uintptr_t)(v))

#endif
