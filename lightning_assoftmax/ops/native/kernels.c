/* Fused CPU kernels of lightning_assoftmax, compiled on first use (see ops/_native.py).
 *
 * Plain C11 with no Python or torch headers: the library is built with the system C compiler in
 * well under a second and called through ctypes, which releases the GIL during the call.
 *
 * Exponentials and logarithms of float rows come from the branch-free polynomials below (Cephes'
 * expf/logf, about 1 ulp), written with selects only so that the compiler vectorises the loops
 * that call them. They keep IEEE semantics: NaN propagates, exp underflows through subnormals to
 * 0 and overflows to inf. Double rows use libm.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Subnormal operands and results cost a microcode assist each (~100 cycles on x86), and e^(s - m)
 * is subnormal for any score 87 below its row's maximum. The kernels therefore flush subnormals
 * to zero while they run (the MXCSR is per thread and restored on return). Such values are
 * below float's resolution next to the row's other terms; positives that small take the exact
 * path anyway. */
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
typedef unsigned int fp_mode;
static inline fp_mode flush_subnormals(void) {
    fp_mode saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040u); /* FTZ | DAZ */
    return saved;
}
static inline void restore_fp_mode(fp_mode saved) { _mm_setcsr(saved); }
#else
typedef int fp_mode;
static inline fp_mode flush_subnormals(void) { return 0; }
static inline void restore_fp_mode(fp_mode saved) { (void)saved; }
#endif

static inline float f32_from_bits(int32_t i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}

static inline int32_t f32_bits(float f) {
    int32_t i;
    memcpy(&i, &f, sizeof i);
    return i;
}

/* e^r for |r| <= ln(2) / 2 after the reduction x = n ln 2 + r of a finite x (n returned):
 * Cephes' expf polynomial. n = round(x / ln 2) by the 1.5 * 2^23 trick (no rint call, so the
 * loops that call it vectorise). */
static inline float exp_reduced_f32(float x, float *n_out) {
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    *n_out = n;
    return p * r * r + r + 1.0f;
}

static inline float exp_f32(float x) {
    float xc = x < -104.0f ? -104.0f : x; /* exp(-104) rounds to 0, exp(89) to inf */
    xc = xc > 89.0f ? 89.0f : xc;
    xc = xc == xc ? xc : 0.0f;
    float n;
    float p = exp_reduced_f32(xc, &n);
    /* 2^n as two factors, each a normal float, so that results round once into subnormals. */
    int32_t k = (int32_t)n;
    int32_t k1 = k >> 1;
    int32_t k2 = k - k1;
    float y = p * f32_from_bits((k1 + 127) << 23) * f32_from_bits((k2 + 127) << 23);
    return x == x ? y : x;
}

/* e^x for x <= 0 or NaN, the exponentials of scores minus their row maximum (-inf gives 0).
 * Results below float's normal range (x < -87.3) are 0: the kernels flush subnormals anyway
 * (see flush_subnormals), so one power-of-two factor suffices and no upper clamp is needed. */
static inline float exp_below_f32(float x) {
    float xc = x < -87.3f ? -87.3f : x;
    xc = xc == xc ? xc : 0.0f;
    float n;
    float y = exp_reduced_f32(xc, &n) * f32_from_bits(((int32_t)n + 127) << 23);
    y = x < -87.3f ? 0.0f : y;
    return x == x ? y : x;
}

static inline float log_f32(float x) {
    int sub = x < 1.17549435e-38f;
    float xs = sub ? x * 8388608.0f : x; /* subnormals: scale by 2^23 first */
    int32_t bits = f32_bits(xs);
    int32_t e = ((bits >> 23) & 0xff) - 126 - (sub ? 23 : 0);
    float m = f32_from_bits((bits & 0x007fffff) | 0x3f000000); /* x = m 2^e, m in [0.5, 1) */
    int small = m < 0.707106781186547524f;
    float ef = (float)(e - small);
    m = small ? m + m - 1.0f : m - 1.0f;
    float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y = y + ef * -2.12194440e-4f;
    y = y - 0.5f * z;
    float r = m + y + ef * 0.693359375f;
    r = x == INFINITY ? x : r;
    r = x == 0.0f ? -INFINITY : r;
    return (x < 0.0f || x != x) ? NAN : r;
}

/* log(1 + a) for a >= 0 (or NaN/inf): log(u) * a / (u - 1) with u = 1 + a corrects u's rounding. */
static inline float log1p_f32(float a) {
    float u = 1.0f + a;
    float d = u - 1.0f;
    float r = log_f32(u) * (a / (d == 0.0f ? 1.0f : d));
    r = d == 0.0f ? a : r;
    return a == INFINITY ? a : r;
}

/* Rows per tile of the lanes kernels (one row per vector lane), rows per block of their tile
 * transposes, and the label count from which rows are processed one at a time instead. */
#define LANES 64
#define BLOCK 16
#ifndef LANES_MAX_C
#define LANES_MAX_C 128
#endif

/* Element offsets of rows t0 .. t0 + n - 1 (row r = b * L + l) for batch and sample strides sb, sl:
 * one division per tile, then the lanes step through (b, l). */
static inline void tile_offsets(long t0, long n, long L, long sb, long sl, long *o) {
    long b = t0 / L, l = t0 - b * L;
    for (long j = 0; j < n; j++) {
        o[j] = b * sb + l * sl;
        if (++l == L) {
            l = 0;
            b++;
        }
    }
}

/* Lanes of the per-row accumulators of the many-class kernels: a pass over a row accumulates
 * VL partial results, one per lane, and folds them by halving at the end (log2 VL dependent
 * steps; a vectorised reduction clause folds them one lane after another, which costs as much
 * as the pass itself at a few hundred classes). */
#define VL 16

/* Whether rows t0 .. t0 + n - 1 share one b (so they are evenly spaced in memory). */
static inline int tile_within_one_b(long t0, long n, long L) { return t0 / L == (t0 + n - 1) / L; }

/* The AVX-512 kernels for float rows with few labels (multilabel_avx512.h), where the compiler
 * targets such a CPU. Tests switch them off to run the generic kernels on the same inputs. */
int vector_kernels_enabled = 1;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__BMI2__)
#include "multilabel_avx512.h"
#define ML_SMALL_ROWS ml16_rows
#define ML_SMALL_SCALE ml16_scale
int vector_kernels_available(void) { return 1; }
#else
int vector_kernels_available(void) { return 0; }
#endif

#define REAL float
#define SFX(name) name##_f32
#define EXPR exp_f32
#define EXPR_BELOW exp_below_f32
#define LOGR log_f32
#define LOG1PR log1p_f32
#define INFR INFINITY
#include "tiles.h"
#include "multilabel.h"
#include "singlelabel.h"
#undef REAL
#undef SFX
#undef EXPR
#undef EXPR_BELOW
#undef LOGR
#undef LOG1PR
#undef INFR
#undef ML_SMALL_ROWS
#undef ML_SMALL_SCALE

/* Double rows: libm (float64 inputs, e.g. gradcheck, where speed matters less). */
#define REAL double
#define SFX(name) name##_f64
#define EXPR exp
#define EXPR_BELOW exp
#define LOGR log
#define LOG1PR log1p
#define INFR ((double)INFINITY)
#include "tiles.h"
#include "multilabel.h"
#include "singlelabel.h"

/* How many of the n contiguous labels are neither 0 nor 1 (NaN counts). */
long not_binary_f32(const float *y, long n) {
    long bad = 0;
#pragma omp simd reduction(+ : bad)
    for (long i = 0; i < n; i++) bad += !((y[i] == 0.0f) | (y[i] == 1.0f));
    return bad;
}

long not_binary_f64(const double *y, long n) {
    long bad = 0;
#pragma omp simd reduction(+ : bad)
    for (long i = 0; i < n; i++) bad += !((y[i] == 0.0) | (y[i] == 1.0));
    return bad;
}
