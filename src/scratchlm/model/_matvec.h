/*
 * Products of a few rows of x with a weight matrix laid out for streaming, y = x W^T, the work of a
 * decoding step: each product reads all of W for a handful of FLOPs, so what counts is how fast W's
 * bytes come from memory.
 *
 * The layout ("tiled", made by `kernels.pack_weight`): W's rows in groups of four, each row cut into
 * 64-byte chunks, and a group stored chunk by chunk with its four rows' chunks side by side:
 *
 *     group g: [row 4g chunk 0][row 4g+1 chunk 0][row 4g+2 chunk 0][row 4g+3 chunk 0][row 4g chunk 1]...
 *
 * so that four dot products at once (one load of x serves four rows) read memory in one sequential
 * stream. Read row by row instead, the four rows are four streams a row apart, which the prefetchers
 * follow poorly: 10 against 18 GB/s for int8 on one core of the 2-core EPYC here, 13 against 20 for
 * float32 (a C loop over a 151 MB matrix). Rows are padded with zeros to whole chunks (x's too) and
 * the rows to a multiple of four.
 *
 * Three formats, 64 bytes a chunk in each:
 * - int8 with one float scale per output channel (W ~ scale[o] * q[o, :]), x quantised on the fly to
 *   int8 per row (x ~ sx[r] * qx[r, :], sx = max |x[r]| / 127), each output one integer dot product:
 *   y[r, o] = scale[o] * sx[r] * sum_i qx[r, i] q[o, i]. The byte products use llama.cpp's sign trick:
 *   |q| (unsigned) times qx with q's sign (signed), the operand types of AVX2's vpmaddubsw and AVX-512
 *   VNNI's vpdpbusd, and no pair sum can saturate (2 * 127 * 127 < 2^15). 64 weights a chunk.
 * - bfloat16 (half the bytes of float32; a bf16 is a float's top 16 bits), x and the sums float32. 32.
 * - float32. 16.
 * The CPU's best path is picked at load time (`matvec_init`): AVX-512 (VNNI for int8), AVX2, or plain
 * C, capped by $SCRATCHLM_SIMD ("avx2" or "c") so that tests and benchmarks run every path on one
 * machine.
 *
 * Many rows (a batch of sequences, a GRPO step's rollouts): the AVX-512 paths take four rows of x at a
 * time against a group (`Dot4x4Fn`), sixteen sums in sixteen registers, so each load of W serves four
 * rows and each load of x four output channels (one load per two multiply-adds, not five per four),
 * and the sixteen sums reduce together (SUM16: 45 instructions, not 16 x 8). On one core at 256 rows of
 * d 128 (a GRPO step's rollouts), the products run at ~75 float32 GFLOP/s, near the core's peak. `matvec_range` computes the groups [begin, end) for every row: the unit of work callers
 * spread over threads. Shared by _quant.c (one product a call) and _decode.c (a decoding step a call).
 */
#ifndef SCRATCHLM_MATVEC_H
#define SCRATCHLM_MATVEC_H

#include "_cpu.h"

#include <stdlib.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define X86 1
#endif

enum { F32 = 0, BF16 = 1, INT8 = 2 };
#define CHUNK_BYTES 64

static const int64_t element_bytes[3] = {4, 2, 1};

/* d_in padded to whole chunks: the length of a packed row, and of x's rows. */
INLINE int64_t padded(int64_t d_in, int kind) {
    const int64_t chunk = CHUNK_BYTES / element_bytes[kind];
    return (d_in + chunk - 1) / chunk * chunk;
}

/* Four dot products of x (d elements, d a whole number of chunks) with one group of four rows. */
typedef void (*Dot4Fn)(const void *x, const void *w, int64_t d, float out[4]);

/* ---- int8 ---- */

static void int8_dot4_plain(const void *xv, const void *wv, int64_t d, float out[4]) {
    const int8_t *x = xv, *w = wv;
    int32_t acc[4] = {0, 0, 0, 0};
    for (int64_t c = 0; c < d; c += 64)
        for (int k = 0; k < 4; k++)
            for (int j = 0; j < 64; j++) acc[k] += (int32_t)x[c + j] * (int32_t)w[4 * c + 64 * k + j];
    for (int k = 0; k < 4; k++) out[k] = (float)acc[k];
}

#ifdef X86
__attribute__((target("avx2"))) static void int8_dot4_avx2(const void *xv, const void *wv, int64_t d, float out[4]) {
    const int8_t *x = xv, *w = wv;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int64_t c = 0; c < d; c += 64)
        for (int h = 0; h < 64; h += 32) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(x + c + h));
            for (int k = 0; k < 4; k++) {
                const __m256i wk = _mm256_loadu_si256((const __m256i *)(w + 4 * c + 64 * k + h));
                const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wk), _mm256_sign_epi8(a, wk));
                acc[k] = _mm256_add_epi32(acc[k], _mm256_madd_epi16(pairs, ones));
            }
        }
    const __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
    const __m128i four = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
    _mm_storeu_ps(out, _mm_cvtepi32_ps(four));
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void int8_dot4_vnni(const void *xv, const void *wv,
                                                                                 int64_t d, float out[4]) {
    const int8_t *x = xv, *w = wv;
    const __m512i zero = _mm512_setzero_si512();
    __m512i acc[4] = {zero, zero, zero, zero};
    for (int64_t c = 0; c < d; c += 64) {
        const __m512i a = _mm512_loadu_si512(x + c);
        for (int k = 0; k < 4; k++) {
            const __m512i wk = _mm512_loadu_si512(w + 4 * c + 64 * k);
            const __m512i signed_a = _mm512_mask_sub_epi8(a, _mm512_movepi8_mask(wk), zero, a); /* a * sign(w) */
            acc[k] = _mm512_dpbusd_epi32(acc[k], _mm512_abs_epi8(wk), signed_a);
        }
    }
    for (int k = 0; k < 4; k++) out[k] = (float)_mm512_reduce_add_epi32(acc[k]);
}
#endif

/* qx[r, :] = round(x[r, :] / sx[r]) with sx[r] = max |x[r, :]| / 127 (1 for a row of zeros); qx's rows
 * are d_pad long, zero past d. */
VECTORIZED static void quantize_rows(const float *restrict x, int64_t rows, int64_t d, int64_t d_pad,
                                     int8_t *restrict qx, float *restrict sx) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float top = 0.0f;
        for (int64_t i = 0; i < d; i++) {
            float v = fabsf(xr[i]);
            top = v > top ? v : top;
        }
        sx[r] = top > 0.0f ? top / 127.0f : 1.0f;
        const float inverse = 1.0f / sx[r];
        for (int64_t i = 0; i < d; i++) qx[r * d_pad + i] = (int8_t)lrintf(xr[i] * inverse);
        for (int64_t i = d; i < d_pad; i++) qx[r * d_pad + i] = 0;
    }
}

/* ---- bfloat16 ---- */

INLINE float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void bf16_dot4_plain(const void *xv, const void *wv, int64_t d, float out[4]) {
    const float *x = xv;
    const uint16_t *w = wv;
    for (int k = 0; k < 4; k++) {
        float lanes[32] = {0};
        for (int64_t c = 0; c < d; c += 32)
            for (int j = 0; j < 32; j++) lanes[j] += bf16_to_float(w[4 * c + 32 * k + j]) * x[c + j];
        float total = 0.0f;
        for (int j = 0; j < 32; j++) total += lanes[j];
        out[k] = total;
    }
}

#ifdef X86
__attribute__((target("avx2,fma"))) static void bf16_dot4_avx2(const void *xv, const void *wv, int64_t d,
                                                               float out[4]) {
    const float *x = xv;
    const uint16_t *w = wv;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t c = 0; c < d; c += 32)
        for (int h = 0; h < 32; h += 8) {
            const __m256 xv8 = _mm256_loadu_ps(x + c + h);
            for (int k = 0; k < 4; k++) {
                const __m128i b = _mm_loadu_si128((const __m128i *)(w + 4 * c + 32 * k + h));
                const __m256 wk = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
                acc[k] = _mm256_fmadd_ps(wk, xv8, acc[k]);
            }
        }
    const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1)));
}

__attribute__((target("avx512f"))) static void bf16_dot4_avx512(const void *xv, const void *wv, int64_t d,
                                                                float out[4]) {
    const float *x = xv;
    const uint16_t *w = wv;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = 0; c < d; c += 32)
        for (int h = 0; h < 32; h += 16) {
            const __m512 xv16 = _mm512_loadu_ps(x + c + h);
            for (int k = 0; k < 4; k++) {
                const __m256i b = _mm256_loadu_si256((const __m256i *)(w + 4 * c + 32 * k + h));
                const __m512 wk = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
                acc[k] = _mm512_fmadd_ps(wk, xv16, acc[k]);
            }
        }
    for (int k = 0; k < 4; k++) out[k] = _mm512_reduce_add_ps(acc[k]);
}
#endif

/* ---- float32 ---- */

static void f32_dot4_plain(const void *xv, const void *wv, int64_t d, float out[4]) {
    const float *x = xv, *w = wv;
    for (int k = 0; k < 4; k++) {
        float lanes[16] = {0};
        for (int64_t c = 0; c < d; c += 16)
            for (int j = 0; j < 16; j++) lanes[j] += w[4 * c + 16 * k + j] * x[c + j];
        float total = 0.0f;
        for (int j = 0; j < 16; j++) total += lanes[j];
        out[k] = total;
    }
}

#ifdef X86
__attribute__((target("avx2,fma"))) static void f32_dot4_avx2(const void *xv, const void *wv, int64_t d,
                                                              float out[4]) {
    const float *x = xv, *w = wv;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t c = 0; c < d; c += 16)
        for (int h = 0; h < 16; h += 8) {
            const __m256 xv8 = _mm256_loadu_ps(x + c + h);
            for (int k = 0; k < 4; k++) acc[k] = _mm256_fmadd_ps(_mm256_loadu_ps(w + 4 * c + 16 * k + h), xv8, acc[k]);
        }
    const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1)));
}

__attribute__((target("avx512f"))) static void f32_dot4_avx512(const void *xv, const void *wv, int64_t d,
                                                               float out[4]) {
    const float *x = xv, *w = wv;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = 0; c < d; c += 16) {
        const __m512 xv16 = _mm512_loadu_ps(x + c);
        for (int k = 0; k < 4; k++) acc[k] = _mm512_fmadd_ps(_mm512_loadu_ps(w + 4 * c + 16 * k), xv16, acc[k]);
    }
    for (int k = 0; k < 4; k++) out[k] = _mm512_reduce_add_ps(acc[k]);
}
#endif

/* ---- four rows at a time (AVX-512) ---- */

/* Sixteen dot products: rows r of x (x_stride elements apart) with rows k of one group, out[4 r + k]. */
typedef void (*Dot4x4Fn)(const void *x, int64_t x_stride, const void *w, int64_t d, float out[16]);

#ifdef X86
/* The sums of v[0..15]'s lanes, in one vector: lane i holds v[i]'s. Pairs add within 128-bit lanes
 * (interleaving 32-bit, then 64-bit elements), then the four 128-bit lanes fold together. The add is a
 * parameter so that the int32 sums (int8) stay exact. */
#define SUM16(v, add, cast_ps, cast_back)                                                                  \
    do {                                                                                                   \
        __m512 t[8], u[4], w2[2];                                                                          \
        for (int i = 0; i < 8; i++) {                                                                      \
            const __m512 a = cast_ps(v[2 * i]), b = cast_ps(v[2 * i + 1]);                                 \
            t[i] = cast_ps(add(cast_back(_mm512_unpacklo_ps(a, b)), cast_back(_mm512_unpackhi_ps(a, b)))); \
        }                                                                                                  \
        for (int i = 0; i < 4; i++) {                                                                      \
            const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);              \
            u[i] = cast_ps(add(cast_back(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b))),                      \
                               cast_back(_mm512_castpd_ps(_mm512_unpackhi_pd(a, b)))));                    \
        }                                                                                                  \
        for (int i = 0; i < 2; i++)                                                                        \
            w2[i] = cast_ps(add(cast_back(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88)),             \
                                cast_back(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xdd))));           \
        v[0] = add(cast_back(_mm512_shuffle_f32x4(w2[0], w2[1], 0x88)),                                    \
                   cast_back(_mm512_shuffle_f32x4(w2[0], w2[1], 0xdd)));                                   \
    } while (0)

#define SAME(x) (x)

__attribute__((target("avx512f"))) static void f32_dot4x4_avx512(const void *xv, int64_t x_stride, const void *wv,
                                                                 int64_t d, float out[16]) {
    const float *x = xv, *w = wv;
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16) {
        __m512 wk[4];
        for (int k = 0; k < 4; k++) wk[k] = _mm512_loadu_ps(w + 4 * c + 16 * k);
        for (int r = 0; r < 4; r++) {
            const __m512 xr = _mm512_loadu_ps(x + r * x_stride + c);
            for (int k = 0; k < 4; k++) acc[4 * r + k] = _mm512_fmadd_ps(wk[k], xr, acc[4 * r + k]);
        }
    }
    SUM16(acc, _mm512_add_ps, SAME, SAME);
    _mm512_storeu_ps(out, acc[0]);
}

__attribute__((target("avx512f"))) static void bf16_dot4x4_avx512(const void *xv, int64_t x_stride, const void *wv,
                                                                  int64_t d, float out[16]) {
    const float *x = xv;
    const uint16_t *w = wv;
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 32)
        for (int h = 0; h < 32; h += 16) {
            __m512 wk[4];
            for (int k = 0; k < 4; k++) {
                const __m256i b = _mm256_loadu_si256((const __m256i *)(w + 4 * c + 32 * k + h));
                wk[k] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
            }
            for (int r = 0; r < 4; r++) {
                const __m512 xr = _mm512_loadu_ps(x + r * x_stride + c + h);
                for (int k = 0; k < 4; k++) acc[4 * r + k] = _mm512_fmadd_ps(wk[k], xr, acc[4 * r + k]);
            }
        }
    SUM16(acc, _mm512_add_ps, SAME, SAME);
    _mm512_storeu_ps(out, acc[0]);
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void int8_dot4x4_vnni(const void *xv, int64_t x_stride,
                                                                                    const void *wv, int64_t d,
                                                                                    float out[16]) {
    const int8_t *x = xv, *w = wv;
    const __m512i zero = _mm512_setzero_si512();
    __m512i acc[16];
    for (int i = 0; i < 16; i++) acc[i] = zero;
    for (int64_t c = 0; c < d; c += 64) {
        __m512i magnitude[4];
        __mmask64 negative[4];
        for (int k = 0; k < 4; k++) {
            const __m512i wk = _mm512_loadu_si512(w + 4 * c + 64 * k);
            magnitude[k] = _mm512_abs_epi8(wk), negative[k] = _mm512_movepi8_mask(wk);
        }
        for (int r = 0; r < 4; r++) {
            const __m512i a = _mm512_loadu_si512(x + r * x_stride + c);
            for (int k = 0; k < 4; k++) /* |w| times a with w's sign, as in int8_dot4_vnni */
                acc[4 * r + k] =
                    _mm512_dpbusd_epi32(acc[4 * r + k], magnitude[k], _mm512_mask_sub_epi8(a, negative[k], zero, a));
        }
    }
    SUM16(acc, _mm512_add_epi32, _mm512_castsi512_ps, _mm512_castps_si512);
    _mm512_storeu_ps(out, _mm512_cvtepi32_ps(acc[0]));
}
#endif

/* ---- the product ---- */

static Dot4Fn dot4[3];
static Dot4x4Fn dot4x4[3]; /* NULL: four calls of dot4 */
static int use_avx512;     /* the float32 path is AVX-512's */
static const char *path_name[3] = {"plain", "plain", "c"};

/* The widest instruction set to use: the CPU's best unless $SCRATCHLM_SIMD caps it ("avx2" or "c").
 * 2 = AVX-512, 1 = AVX2, 0 = plain C. */
static int simd_cap(void) {
    const char *cap = getenv("SCRATCHLM_SIMD");
    if (cap && !strcmp(cap, "c")) return 0;
    if (cap && !strcmp(cap, "avx2")) return 1;
    return 2;
}

/* Picks each format's kernel for this CPU (call once, when the module loads). */
static void matvec_init(void) {
    dot4[F32] = f32_dot4_plain, dot4[BF16] = bf16_dot4_plain, dot4[INT8] = int8_dot4_plain;
#ifdef X86
    __builtin_cpu_init();
    const int cap = simd_cap();
    if (cap >= 2 && __builtin_cpu_supports("avx512f")) {
        dot4[F32] = f32_dot4_avx512, dot4[BF16] = bf16_dot4_avx512;
        dot4x4[F32] = f32_dot4x4_avx512, dot4x4[BF16] = bf16_dot4x4_avx512, use_avx512 = 1;
        path_name[F32] = path_name[BF16] = "avx512";
    } else if (cap >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        dot4[F32] = f32_dot4_avx2, dot4[BF16] = bf16_dot4_avx2;
        path_name[F32] = path_name[BF16] = "avx2";
    }
    if (cap >= 2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) {
        dot4[INT8] = int8_dot4_vnni, dot4x4[INT8] = int8_dot4x4_vnni, path_name[INT8] = "avx512-vnni";
    } else if (cap >= 1 && __builtin_cpu_supports("avx2")) {
        dot4[INT8] = int8_dot4_avx2, path_name[INT8] = "avx2";
    }
#endif
}

typedef struct {
    int kind;
    const void *x;      /* (rows, d_pad): float32, or int8 (quantised) for int8 weights */
    const void *w;      /* tiled, (d_out rounded up to 4) x d_pad */
    const float *scale; /* int8: (d_out,) */
    const float *sx;    /* int8: (rows,), x's scales */
    float *y;           /* (rows, d_out) */
    int64_t rows, d_pad, d_out;
} MatvecArgs;

/* The groups of four output channels [begin, end), for every row. */
static void matvec_range(const void *args, int64_t begin, int64_t end, int part) {
    (void)part;
    const MatvecArgs *s = args;
    const Dot4Fn fn = dot4[s->kind];
    const Dot4x4Fn fn4 = dot4x4[s->kind];
    const int64_t x_bytes = s->kind == INT8 ? 1 : 4, w_bytes = element_bytes[s->kind];
    float acc[16];
    for (int64_t g = begin; g < end; g++) {
        const char *w = (const char *)s->w + g * 4 * s->d_pad * w_bytes;
        const int64_t o = 4 * g, outputs = s->d_out - o < 4 ? s->d_out - o : 4; /* the last group may be short */
        const float *scale = s->kind == INT8 ? s->scale + o : NULL;
        for (int64_t r = 0; r < s->rows;) {
            const char *x = (const char *)s->x + r * s->d_pad * x_bytes;
            const int n = fn4 && r + 4 <= s->rows ? 4 : 1; /* rows this call */
            if (n == 4)
                fn4(x, s->d_pad, w, s->d_pad, acc);
            else
                fn(x, w, s->d_pad, acc);
            for (int i = 0; i < n; i++, r++) {
                float *y = s->y + r * s->d_out + o;
                if (scale)
                    for (int k = 0; k < outputs; k++) y[k] = scale[k] * s->sx[r] * acc[4 * i + k];
                else if (outputs == 4)
                    memcpy(y, acc + 4 * i, 4 * sizeof(float));
                else
                    for (int k = 0; k < outputs; k++) y[k] = acc[4 * i + k];
            }
        }
    }
}

/* x (rows, d_in) float32 into what the kernels read: rows of d_pad, float32 zero-padded or, for int8,
 * quantised (then `sx` holds the rows' scales). `buffer` holds rows * d_pad floats. */
static const void *prepare_x(const float *x, int64_t rows, int64_t d_in, int kind, void *buffer, float *sx) {
    const int64_t d_pad = padded(d_in, kind);
    if (kind == INT8) {
        quantize_rows(x, rows, d_in, d_pad, buffer, sx);
        return buffer;
    }
    if (d_pad == d_in) return x;
    float *out = buffer;
    for (int64_t r = 0; r < rows; r++) {
        memcpy(out + r * d_pad, x + r * d_in, (size_t)d_in * sizeof(float));
        memset(out + r * d_pad + d_in, 0, (size_t)(d_pad - d_in) * sizeof(float));
    }
    return out;
}

/* ---- many rows: the panel layout (float32, AVX-512) ----
 *
 * With many rows (a GRPO step's rollouts: 128 a thread) the products are bound by arithmetic, not by
 * reading W, and the dot products above spend a quarter of their instructions summing across lanes.
 * The panel layout (`kernels.panels`) serves outer products instead: W's rows (outputs) in panels of
 * sixteen, each panel stored input by input (panel p, input i: W[16p .. 16p+15, i], 64 bytes), zero rows
 * padding the last panel. Eight rows of x against two panels: each input loads two vectors of W,
 * broadcasts eight elements of x, and makes sixteen multiply-adds into sixteen sums that are already
 * the outputs, so nothing is reduced across lanes; x's eight rows stay in L1, W streams from L2. */
#define PANEL 16
#define PANEL_ROWS 8                 /* rows a tile */
#define PANEL_BLOCK_BYTES (256 << 10) /* W's panels that one pass of the row tiles reads (in L2) */

typedef struct {
    const float *x;      /* (rows, d_in) */
    const float *panels; /* (ceil(d_out / 16), d_in, 16) */
    float *y;            /* (rows, d_out) */
    int64_t rows, d_in, d_out;
} PanelArgs;

#ifdef X86
/* y[r, 16p + j] for rows r < mr and panels p < np, x's rows x_stride apart; `outputs` of the np * 16 are
 * real (the rest is padding, not stored). mr and np are constants where it is called, so it unrolls. */
__attribute__((target("avx512f"))) INLINE void panel_tile(const float *x, int64_t x_stride, const float *w,
                                                          int64_t d_in, int mr, int np, float *y,
                                                          int64_t y_stride, int64_t outputs) {
    __m512 acc[PANEL_ROWS][2];
    for (int r = 0; r < mr; r++)
        for (int p = 0; p < np; p++) acc[r][p] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d_in; i++) {
        __m512 b[2];
        for (int p = 0; p < np; p++) b[p] = _mm512_loadu_ps(w + (p * d_in + i) * PANEL);
        for (int r = 0; r < mr; r++) {
            const __m512 a = _mm512_set1_ps(x[r * x_stride + i]);
            for (int p = 0; p < np; p++) acc[r][p] = _mm512_fmadd_ps(a, b[p], acc[r][p]);
        }
    }
    for (int p = 0; p < np; p++) {
        const int64_t left = outputs - p * PANEL;
        const __mmask16 mask = left >= PANEL ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        for (int r = 0; r < mr; r++) _mm512_mask_storeu_ps(y + r * y_stride + p * PANEL, mask, acc[r][p]);
    }
}

/* Every row's outputs in the panels [begin, end): the unit of work callers spread over threads. The
 * panels go in blocks of PANEL_BLOCK_BYTES, which stay in L2 while every row's tile passes them: a
 * large W (SmolLM2's) is read from memory once, not once per tile. */
__attribute__((target("avx512f"), unused)) static void panels_range(const void *args, int64_t begin, int64_t end,
                                                                   int part) {
    (void)part;
    const PanelArgs *s = args;
    const int64_t d_in = s->d_in, d_out = s->d_out;
    int64_t block = PANEL_BLOCK_BYTES / (d_in * PANEL * (int64_t)sizeof(float));
    block = block < 2 ? 2 : block / 2 * 2; /* whole pairs */
    for (int64_t first = begin; first < end; first += block) {
        const int64_t last = first + block < end ? first + block : end;
        for (int64_t r = 0; r < s->rows; r += PANEL_ROWS) {
            const int64_t tile_rows = s->rows - r < PANEL_ROWS ? s->rows - r : PANEL_ROWS;
            for (int64_t p = first; p < last; p += 2) {
                const float *w = s->panels + p * PANEL * d_in;
                const int two = p + 1 < last;
                const int64_t outputs = d_out - p * PANEL;
                for (int64_t q = 0; q < tile_rows;) { /* eight rows at once, then the rest one by one */
                    const float *x = s->x + (r + q) * d_in;
                    float *y = s->y + (r + q) * d_out + p * PANEL;
                    if (tile_rows - q == PANEL_ROWS) {
                        if (two)
                            panel_tile(x, d_in, w, d_in, PANEL_ROWS, 2, y, d_out, outputs);
                        else
                            panel_tile(x, d_in, w, d_in, PANEL_ROWS, 1, y, d_out, outputs);
                        q += PANEL_ROWS;
                    } else {
                        if (two)
                            panel_tile(x, d_in, w, d_in, 1, 2, y, d_out, outputs);
                        else
                            panel_tile(x, d_in, w, d_in, 1, 1, y, d_out, outputs);
                        q += 1;
                    }
                }
            }
        }
    }
}
#endif

#endif
