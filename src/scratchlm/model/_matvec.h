/*
 * Products of a few rows of x with a weight matrix stored for streaming, y = x W^T, the work of a
 * decoding step: each product reads all of W for a handful of FLOPs, so what counts is moving W's
 * bytes from memory. W is row-major (d_out, d_in) in one of three formats:
 *
 * - int8 with one float scale per output channel (W ~ scale[o] * q[o, :]), x quantised on the fly to
 *   int8 per row (x ~ sx[r] * qx[r, :], sx = max |x[r]| / 127), each output one integer dot product:
 *   y[r, o] = scale[o] * sx[r] * sum_i qx[r, i] q[o, i]. The byte products use llama.cpp's sign trick:
 *   |q| (unsigned) times qx with q's sign (signed), the operand types of AVX2's vpmaddubsw and AVX-512
 *   VNNI's vpdpbusd, and no pair sum can saturate (2 * 127 * 127 < 2^15).
 * - bfloat16 (half the bytes of float32), x and the sums float32.
 * - float32.
 * Each kernel computes four output channels at once (one load of x serves four weight rows); the CPU's
 * best path is picked at load time (`matvec_init`): AVX-512 (VNNI for int8), AVX2, or plain C, capped by
 * $SCRATCHLM_SIMD ("avx2" or "c") so that tests and benchmarks can run every path on one machine.
 * The `*_range` functions compute output channels [begin, end) in groups of four for every row: the unit
 * of work callers spread over threads. Shared by _quant.c (one product a call) and _decode.c (a whole
 * decoding step a call).
 */
#ifndef SCRATCHLM_MATVEC_H
#define SCRATCHLM_MATVEC_H

#include "_cpu.h"

#include <stdlib.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define X86 1
#endif

/* How many groups of four rows ahead the kernels ask for weights before they need them (0: none). */
static int64_t prefetch_groups = 2;
#define PREFETCH_GROUPS prefetch_groups

/* ---- int8 weights ---- */

/* Four dot products at once, of `a` with the rows w, w + d, w + 2d, w + 3d: each load of `a` serves
 * four weight rows and one horizontal sum finishes all four. */
typedef void (*Dot4Fn)(const int8_t *a, const int8_t *w, int64_t d, int32_t out[4]);

static int32_t dot_plain(const int8_t *restrict a, const int8_t *restrict w, int64_t d) {
    int32_t acc = 0;
    for (int64_t i = 0; i < d; i++) acc += (int32_t)a[i] * (int32_t)w[i];
    return acc;
}

static void dot4_plain(const int8_t *a, const int8_t *w, int64_t d, int32_t out[4]) {
    for (int k = 0; k < 4; k++) out[k] = dot_plain(a, w + k * d, d);
}

#ifdef X86
__attribute__((target("avx2"))) static void dot4_avx2(const int8_t *a, const int8_t *w, int64_t d, int32_t out[4]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    int64_t i = 0;
    for (; i + 32 <= d; i += 32) {
        if (!(i & 63))
            for (int k = 0; k < 4; k++) _mm_prefetch((const char *)(w + (k + 4 * PREFETCH_GROUPS) * d + i), _MM_HINT_T0);
        const __m256i x = _mm256_loadu_si256((const __m256i *)(a + i));
        for (int k = 0; k < 4; k++) {
            const __m256i wk = _mm256_loadu_si256((const __m256i *)(w + k * d + i));
            const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wk), _mm256_sign_epi8(x, wk));
            acc[k] = _mm256_add_epi32(acc[k], _mm256_madd_epi16(pairs, ones));
        }
    }
    const __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
    const __m128i four = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
    _mm_storeu_si128((__m128i *)out, four);
    for (int k = 0; k < 4; k++) out[k] += dot_plain(a + i, w + k * d + i, d - i);
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void dot4_vnni(const int8_t *a, const int8_t *w,
                                                                            int64_t d, int32_t out[4]) {
    const __m512i zero = _mm512_setzero_si512();
    __m512i acc[4] = {zero, zero, zero, zero};
    int64_t i = 0;
    for (; i + 64 <= d; i += 64) {
        for (int k = 0; k < 4; k++) _mm_prefetch((const char *)(w + (k + 4 * PREFETCH_GROUPS) * d + i), _MM_HINT_T0);
        const __m512i x = _mm512_loadu_si512(a + i);
        for (int k = 0; k < 4; k++) {
            const __m512i wk = _mm512_loadu_si512(w + k * d + i);
            const __m512i signed_x = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(wk), zero, x); /* x * sign(w) */
            acc[k] = _mm512_dpbusd_epi32(acc[k], _mm512_abs_epi8(wk), signed_x);
        }
    }
    for (int k = 0; k < 4; k++) out[k] = _mm512_reduce_add_epi32(acc[k]) + dot_plain(a + i, w + k * d + i, d - i);
}
#endif

/* The widest instruction set to use: the CPU's best unless $SCRATCHLM_SIMD caps it ("avx2" or "c"), so
 * that tests and benchmarks can run every path on one machine. 2 = AVX-512, 1 = AVX2, 0 = plain C. */
static int simd_cap(void) {
    const char *cap = getenv("SCRATCHLM_SIMD");
    if (cap && !strcmp(cap, "c")) return 0;
    if (cap && !strcmp(cap, "avx2")) return 1;
    return 2;
}

static Dot4Fn best_dot4(const char **name) {
#ifdef X86
    __builtin_cpu_init();
    if (simd_cap() >= 2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) {
        *name = "avx512-vnni";
        return dot4_vnni;
    }
    if (simd_cap() >= 1 && __builtin_cpu_supports("avx2")) {
        *name = "avx2";
        return dot4_avx2;
    }
#endif
    *name = "c";
    return dot4_plain;
}

static Dot4Fn dot4_int8;
static const char *dot_name;

typedef struct {
    const int8_t *qx; /* (rows, d_in) */
    const float *sx;  /* (rows,) */
    const int8_t *q;  /* (d_out, d_in) */
    const float *scale;
    float *y; /* (rows, d_out) */
    int64_t rows, d_in, d_out;
} Int8Args;

/* Output channels [begin, end) for every row; the work is split over threads in groups of four. */
static void int8_range(const void *args, int64_t begin, int64_t end, int part) {
    (void)part;
    const Int8Args *s = args;
    const int64_t d = s->d_in;
    int32_t acc[4];
    for (int64_t g = begin * 4; g < end * 4 && g < s->d_out; g += 4) {
        const int64_t n = s->d_out - g < 4 ? s->d_out - g : 4;
        for (int64_t r = 0; r < s->rows; r++) {
            if (n == 4) {
                dot4_int8(s->qx + r * d, s->q + g * d, d, acc);
            } else {
                for (int64_t k = 0; k < n; k++) acc[k] = dot_plain(s->qx + r * d, s->q + (g + k) * d, d);
            }
            for (int64_t k = 0; k < n; k++) s->y[r * s->d_out + g + k] = s->scale[g + k] * s->sx[r] * (float)acc[k];
        }
    }
}

/* qx[r, :] = round(x[r, :] / sx[r]) with sx[r] = max |x[r, :]| / 127 (1 for a row of zeros). */
VECTORIZED static void quantize_rows(const float *restrict x, int64_t rows, int64_t d, int8_t *restrict qx,
                                     float *restrict sx) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float top = 0.0f;
        for (int64_t i = 0; i < d; i++) {
            float v = fabsf(xr[i]);
            top = v > top ? v : top;
        }
        sx[r] = top > 0.0f ? top / 127.0f : 1.0f;
        const float inverse = 1.0f / sx[r];
        for (int64_t i = 0; i < d; i++) qx[r * d + i] = (int8_t)lrintf(xr[i] * inverse);
    }
}

/* ---- bfloat16 weights: half the bytes of float32, no rounding of x; a bf16 is a float's top 16 bits ---- */

typedef void (*Bf16Dot4Fn)(const float *x, const uint16_t *w, int64_t d, float out[4]);

INLINE float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void bf16_dot4_plain(const float *x, const uint16_t *w, int64_t d, float out[4]) {
    for (int k = 0; k < 4; k++) {
        float lanes[LANES] = {0};
        const uint16_t *wk = w + k * d;
        int64_t i = 0;
        for (; i + LANES <= d; i += LANES)
            for (int l = 0; l < LANES; l++) lanes[l] += bf16_to_float(wk[i + l]) * x[i + l];
        float total = 0.0f;
        for (; i < d; i++) total += bf16_to_float(wk[i]) * x[i];
        for (int l = 0; l < LANES; l++) total += lanes[l];
        out[k] = total;
    }
}

#ifdef X86
__attribute__((target("avx2,fma"))) static void bf16_dot4_avx2(const float *x, const uint16_t *w, int64_t d,
                                                               float out[4]) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i);
        for (int k = 0; k < 4; k++) {
            const __m128i h = _mm_loadu_si128((const __m128i *)(w + k * d + i));
            const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            acc[k] = _mm256_fmadd_ps(wv, xv, acc[k]);
        }
    }
    const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1)));
    for (int k = 0; k < 4; k++)
        for (int64_t j = i; j < d; j++) out[k] += bf16_to_float(w[k * d + j]) * x[j];
}

/* AVX-512F: the same widening (a bf16 is the top half of a float) over 16 lanes; the products and their
 * sums stay float32, so the result differs from the AVX2 path only in the order of the additions. */
__attribute__((target("avx512f"))) static void bf16_dot4_avx512(const float *x, const uint16_t *w, int64_t d,
                                                                float out[4]) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
        if (!(i & 31))
            for (int k = 0; k < 4; k++) _mm_prefetch((const char *)(w + (k + 4 * PREFETCH_GROUPS) * d + i), _MM_HINT_T0);
        const __m512 xv = _mm512_loadu_ps(x + i);
        for (int k = 0; k < 4; k++) {
            const __m256i h = _mm256_loadu_si256((const __m256i *)(w + k * d + i));
            const __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            acc[k] = _mm512_fmadd_ps(wv, xv, acc[k]);
        }
    }
    for (int k = 0; k < 4; k++) {
        out[k] = _mm512_reduce_add_ps(acc[k]);
        for (int64_t j = i; j < d; j++) out[k] += bf16_to_float(w[k * d + j]) * x[j];
    }
}
#endif

static Bf16Dot4Fn bf16_dot4;
static const char *bf16_name = "plain";

typedef struct {
    const float *x;    /* (rows, d_in) */
    const uint16_t *w; /* (d_out, d_in) bfloat16 */
    float *y;          /* (rows, d_out) */
    int64_t rows, d_in, d_out;
} Bf16Args;

static void bf16_range(const void *args, int64_t begin, int64_t end, int part) {
    (void)part;
    const Bf16Args *s = args;
    const int64_t d = s->d_in;
    float acc[4];
    for (int64_t g = begin * 4; g < end * 4 && g < s->d_out; g += 4) {
        const int64_t n = s->d_out - g < 4 ? s->d_out - g : 4;
        for (int64_t r = 0; r < s->rows; r++) {
            if (n == 4) {
                bf16_dot4(s->x + r * d, s->w + g * d, d, acc);
            } else {
                for (int64_t k = 0; k < n; k++) { /* the last channels, one at a time */
                    acc[k] = 0.0f;
                    for (int64_t i = 0; i < d; i++) acc[k] += bf16_to_float(s->w[(g + k) * d + i]) * s->x[r * d + i];
                }
            }
            for (int64_t k = 0; k < n; k++) s->y[r * s->d_out + g + k] = acc[k];
        }
    }
}

/* ---- float32 weights ---- */

typedef void (*F32Dot4Fn)(const float *x, const float *w, int64_t d, float out[4]);

static void f32_dot4_plain(const float *x, const float *w, int64_t d, float out[4]) {
    for (int k = 0; k < 4; k++) out[k] = dot(x, w + k * d, d);
}

#ifdef X86
__attribute__((target("avx2,fma"))) static void f32_dot4_avx2(const float *x, const float *w, int64_t d, float out[4]) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i);
        for (int k = 0; k < 4; k++) acc[k] = _mm256_fmadd_ps(_mm256_loadu_ps(w + k * d + i), xv, acc[k]);
    }
    const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1)));
    for (int k = 0; k < 4; k++)
        for (int64_t j = i; j < d; j++) out[k] += w[k * d + j] * x[j];
}

__attribute__((target("avx512f"))) static void f32_dot4_avx512(const float *x, const float *w, int64_t d,
                                                               float out[4]) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
        for (int k = 0; k < 4; k++) _mm_prefetch((const char *)(w + (k + 4 * PREFETCH_GROUPS) * d + i), _MM_HINT_T0);
        const __m512 xv = _mm512_loadu_ps(x + i);
        for (int k = 0; k < 4; k++) acc[k] = _mm512_fmadd_ps(_mm512_loadu_ps(w + k * d + i), xv, acc[k]);
    }
    for (int k = 0; k < 4; k++) {
        out[k] = _mm512_reduce_add_ps(acc[k]);
        for (int64_t j = i; j < d; j++) out[k] += w[k * d + j] * x[j];
    }
}
#endif

static F32Dot4Fn f32_dot4;
static const char *f32_name = "plain";

typedef struct {
    const float *x; /* (rows, d_in) */
    const float *w; /* (d_out, d_in) */
    float *y;       /* (rows, d_out) */
    int64_t rows, d_in, d_out;
} F32Args;

static void f32_range(const void *args, int64_t begin, int64_t end, int part) {
    (void)part;
    const F32Args *s = args;
    const int64_t d = s->d_in;
    float acc[4];
    for (int64_t g = begin * 4; g < end * 4 && g < s->d_out; g += 4) {
        const int64_t n = s->d_out - g < 4 ? s->d_out - g : 4;
        for (int64_t r = 0; r < s->rows; r++) {
            if (n == 4) {
                f32_dot4(s->x + r * d, s->w + g * d, d, acc);
            } else {
                for (int64_t k = 0; k < n; k++) acc[k] = dot(s->x + r * d, s->w + (g + k) * d, d);
            }
            for (int64_t k = 0; k < n; k++) s->y[r * s->d_out + g + k] = acc[k];
        }
    }
}

/* Picks each format's kernel for this CPU (call once, when the module loads). */
static void matvec_init(void) {
    dot4_int8 = best_dot4(&dot_name);
    bf16_dot4 = bf16_dot4_plain;
    f32_dot4 = f32_dot4_plain;
#ifdef X86
    if (simd_cap() >= 2 && __builtin_cpu_supports("avx512f")) {
        bf16_dot4 = bf16_dot4_avx512;
        f32_dot4 = f32_dot4_avx512;
        bf16_name = f32_name = "avx512";
    } else if (simd_cap() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        bf16_dot4 = bf16_dot4_avx2;
        f32_dot4 = f32_dot4_avx2;
        bf16_name = f32_name = "avx2";
    }
#endif
}

#endif
