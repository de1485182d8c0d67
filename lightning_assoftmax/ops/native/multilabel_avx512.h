/* Multi-label AS-Softmax for float (M, C) rows with C <= 16 stored contiguously, on CPUs with
 * AVX-512 (included by kernels.c only when the compiler targets one). Same formulas, outputs and
 * redo rule as ml_lanes in multilabel.h, with the keep thresholds of ops/multi_label.py
 * (p >= min_P p - delta, p <= max_Q p + delta); 16 rows per tile, one row per vector lane, so
 * every per-row quantity stays in a register.
 *
 * Why: at a few labels per row the generic tile kernel spends most of its time moving single
 * elements between rows and class vectors. Here a tile's 16 C contiguous scores are loaded as C
 * vectors and vector permutes make the C class vectors (and the gradient rows on the way back).
 * e^x and log x use the AVX-512 scale and exponent instructions; 1/p is the 14-bit reciprocal
 * estimate refined by one Newton step (within 2 ulp). */
#include <immintrin.h>

#define ML16 16

/* Permute tables for one C. Class vector c, lane j, is flat element f = j C + c of the tile:
 * lane f mod 32 of the input vector pair (2q, 2q + 1), q = f / 32. Output row vector k, lane i,
 * is flat element f = 16 k + i: lane f / C of class vector f mod C. */
typedef struct {
    __m512i in_idx[ML16][ML16 / 2];  /* [c][q] */
    __mmask16 in_sel[ML16][ML16 / 2];
    __m512i out_idx[ML16][ML16 / 2]; /* [k][q]: from the class pair (2q, 2q + 1) */
    __mmask16 out_sel[ML16][ML16 / 2];
    __m512i row_of[ML16];            /* [k]: tile row of each lane of row vector k */
    /* Labels as bits: flat element f is bit f of 64-bit word f / 64 (f mod 64 in it); class c's
     * bits (one per row) are extracted from word w with bit_sel[c][w] and shifted by
     * bit_at[c][w] (the bits that earlier words gave). */
    uint64_t bit_sel[ML16][ML16 / 4];
    int bit_at[ML16][ML16 / 4];
    int pairs, words;
} ml16_tables;

static void ml16_prepare(ml16_tables *t, int C) {
    int lanes[ML16];
    t->pairs = (C + 1) / 2;
    t->words = (C + 3) / 4;
    for (int c = 0; c < C; c++) {
        int at = 0;
        for (int w = 0; w < t->words; w++) {
            uint64_t sel = 0;
            for (int f = 64 * w; f < 64 * w + 64 && f < ML16 * C; f++)
                if (f % C == c) sel |= (uint64_t)1 << (f - 64 * w);
            t->bit_sel[c][w] = sel;
            t->bit_at[c][w] = at;
            at += __builtin_popcountll(sel);
        }
    }
    for (int c = 0; c < C; c++) {
        for (int q = 0; q < t->pairs; q++) {
            unsigned sel = 0;
            for (int j = 0; j < ML16; j++) {
                int f = j * C + c;
                lanes[j] = f & 31;
                sel |= (unsigned)(f / 32 == q) << j;
            }
            t->in_idx[c][q] = _mm512_loadu_si512(lanes);
            t->in_sel[c][q] = (__mmask16)sel;
        }
    }
    for (int k = 0; k < C; k++) {
        for (int i = 0; i < ML16; i++) lanes[i] = (k * ML16 + i) / C;
        t->row_of[k] = _mm512_loadu_si512(lanes);
        for (int q = 0; q < t->pairs; q++) {
            unsigned sel = 0;
            for (int i = 0; i < ML16; i++) {
                int f = k * ML16 + i, c = f % C;
                lanes[i] = f / C + (c & 1) * ML16;
                sel |= (unsigned)(c / 2 == q) << i;
            }
            t->out_idx[k][q] = _mm512_loadu_si512(lanes);
            t->out_sel[k][q] = (__mmask16)sel;
        }
    }
}

/* C vectors through the tables: rows to classes (in_*) or classes to rows (out_*). */
static inline void ml16_permute(const __m512i idx[][ML16 / 2], const __mmask16 sel[][ML16 / 2],
                                int pairs, const __m512 *src, __m512 *dst, int C) {
    for (int c = 0; c < C; c++) {
        __m512 x = _mm512_permutex2var_ps(src[0], idx[c][0], src[C > 1]);
        for (int q = 1; q < pairs; q++) {
            __m512 hi = 2 * q + 1 < C ? src[2 * q + 1] : src[2 * q];
            x = _mm512_mask_mov_ps(x, sel[c][q], _mm512_permutex2var_ps(src[2 * q], idx[c][q], hi));
        }
        dst[c] = x;
    }
}

/* Lanes of vector k (of 16) that hold one of the first `count` flat elements. */
static inline __mmask16 ml16_mask(long count, long k) {
    long left = count - k * ML16;
    return left >= ML16 ? (__mmask16)0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
}

/* e^x for x <= 88 or NaN (NaN stays NaN; -inf and underflow give 0, flushed subnormals too). */
static inline __m512 ml16_exp_below(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x); /* NaN is the second operand: kept */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f); /* the polynomial of exp_f32 (kernels.c) */
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    return _mm512_scalef_ps(_mm512_add_ps(p, _mm512_set1_ps(1.0f)), n);
}

/* e^x: overflow gives inf. */
static inline __m512 ml16_exp(__m512 x) {
    return ml16_exp_below(_mm512_min_ps(_mm512_set1_ps(89.0f), x)); /* NaN kept, as above */
}

/* log x for x >= 1 or NaN (the only arguments here: 1 + a with a >= 0); log inf = inf. */
static inline __m512 ml16_log_above_one(__m512 x) {
    __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_nan); /* x = m 2^e */
    __m512 e = _mm512_getexp_ps(x);
    __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237f), _CMP_GT_OQ);
    m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f)); /* m in [sqrt(1/2), sqrt(2)] */
    e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
    m = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
    __m512 z = _mm512_mul_ps(m, m);
    __m512 y = _mm512_set1_ps(7.0376836292e-2f); /* the polynomial of log_f32 (kernels.c) */
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.1514610310e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(1.1676998740e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.2420140846e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(1.4249322787e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.6668057665e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(2.0000714765e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-2.4999993993e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(3.3333331174e-1f));
    y = _mm512_mul_ps(_mm512_mul_ps(y, m), z);
    y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
    y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, y);
    __m512 r = _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(m, y));
    __mmask16 inf = _mm512_cmp_ps_mask(x, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ);
    return _mm512_mask_mov_ps(r, inf, x);
}

/* log(1 + a) for a >= 0, inf or NaN, with log1p_f32's correction of 1 + a's rounding. */
static inline __m512 ml16_log1p(__m512 a) {
    __m512 one = _mm512_set1_ps(1.0f);
    __m512 u = _mm512_add_ps(one, a);
    __m512 d = _mm512_sub_ps(u, one);
    __mmask16 exact = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_EQ_OQ) |
                      _mm512_cmp_ps_mask(a, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ);
    __m512 r = _mm512_mul_ps(ml16_log_above_one(u),
                             _mm512_div_ps(a, _mm512_mask_mov_ps(d, exact, one)));
    return _mm512_mask_mov_ps(r, exact, a); /* log1p(a) = a below float's resolution, inf */
}

/* The C vectors of a tile's n rows (zero past them). */
static inline void ml16_load(const float *src, long n, int C, __m512 *in) {
    for (int k = 0; k < C; k++)
        in[k] = _mm512_maskz_loadu_ps(ml16_mask(n * C, k), src + (long)k * ML16);
}

/* Label masks of a tile: Y[c] bit j is set when row j's label c is nonzero (NaN too, as in
 * ml_lanes). Labels are compared where they lie (C vectors of 16) and the bits regrouped by
 * class with pext. Returns the lanes holding a label other than 0 and 1. */
static inline __mmask16 ml16_labels(const ml16_tables *t, const void *yv, int y_real, long n,
                                    int C, __mmask16 *Y) {
    uint64_t words[ML16 / 4] = {0, 0, 0, 0};
    __mmask16 not_binary = 0;
    for (int k = 0; k < C; k++) {
        __mmask16 mk = ml16_mask(n * C, k), nonzero;
        if (y_real) {
            __m512 y = _mm512_maskz_loadu_ps(mk, (const float *)yv + (long)k * ML16);
            nonzero = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_NEQ_UQ);
            not_binary |= nonzero & _mm512_cmp_ps_mask(y, _mm512_set1_ps(1.0f), _CMP_NEQ_UQ);
        } else {
            __m128i y = _mm_maskz_loadu_epi8(mk, (const uint8_t *)yv + (long)k * ML16);
            nonzero = _mm_test_epi8_mask(y, y);
            not_binary |= _mm_cmpgt_epu8_mask(y, _mm_set1_epi8(1));
        }
        words[k / 4] |= (uint64_t)nonzero << (16 * (k % 4));
    }
    for (int c = 0; c < C; c++) {
        uint64_t bits = 0;
        for (int w = 0; w < t->words; w++)
            bits |= _pext_u64(words[w], t->bit_sel[c][w]) << t->bit_at[c][w];
        Y[c] = (__mmask16)bits;
    }
    return not_binary;
}

/* The class vectors V of tile rows t0 .. t0 + n - 1 into a gradient with strides (gsb, gsc, gsl)
 * over (B, C, L): one masked store per class where the rows are contiguous along L, else one
 * element at a time. */
static void ml16_store_strided(float *g, const __m512 *V, long t0, long n, long C, long L,
                               long gsb, long gsc, long gsl) {
    long b = t0 / L, l = t0 - b * L;
    if (gsl == 1 && l + n <= L) {
        for (long c = 0; c < C; c++)
            _mm512_mask_storeu_ps(g + b * gsb + c * gsc + l, ml16_mask(n, 0), V[c]);
        return;
    }
    float vals[ML16 * ML16];
    for (long c = 0; c < C; c++) _mm512_storeu_ps(vals + c * ML16, V[c]);
    for (long j = 0; j < n; j++) {
        float *row = g + b * gsb + l * gsl;
        for (long c = 0; c < C; c++) row[c * gsc] = vals[c * ML16 + j];
        if (++l == L) {
            l = 0;
            b++;
        }
    }
}

/* Rows r0 <= r < r1 of (B, C, L) scores s and labels y (float, or bytes when !y_real) whose rows
 * r = b L + l lie one after another in memory (row r starts at r C). The gradient g (strides gsb,
 * gsc, gsl), gn and gp may be NULL. Adds the rows' losses to *sum. Returns the number of rows
 * flagged in redo, or -2 if a label is neither 0 nor 1. */
static long ml16_rows(const float *s, const void *yv, int y_real, float *loss, float *g, float *gn,
                      float *gp, uint8_t *redo, long C, long L, long gsb, long gsc, long gsl,
                      float delta, float tiny, float ebig, long r0, long r1, double *sum) {
    const int g_rows = gsc == 1 && gsl == C && (r1 <= L || gsb == L * C);
    ml16_tables t;
    ml16_prepare(&t, (int)C);
    const int nc = (int)C;
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    const __m512 inf = _mm512_set1_ps(INFINITY), vdelta = _mm512_set1_ps(delta);
    long count = 0;
    double total = 0;
    __mmask16 not_binary = 0; /* lanes past the tile's rows load 0: never flagged */
    __m512 in[ML16], X[ML16], V[ML16];
    __mmask16 Y[ML16];
    for (long t0 = r0; t0 < r1; t0 += ML16) {
        long n = r1 - t0 < ML16 ? r1 - t0 : ML16;
        ml16_load(s + t0 * C, n, nc, in);
        ml16_permute(t.in_idx, t.in_sel, t.pairs, in, X, nc);
        const void *y = y_real ? (const void *)((const float *)yv + t0 * C)
                               : (const void *)((const uint8_t *)yv + t0 * C);
        not_binary |= ml16_labels(&t, y, y_real, n, nc, Y);
        /* A NaN score is skipped by the max (second operand) but its e = exp(NaN) makes S, and
         * so every p of the row, NaN: the row keeps every term and its loss is NaN, as in
         * ml_lanes. A +inf score does the same through exp(inf - inf). */
        __m512 m = _mm512_set1_ps(-INFINITY);
        __mmask16 any_pos = 0, any_neg = 0;
        for (int c = 0; c < nc; c++) {
            any_pos |= Y[c];
            any_neg |= (__mmask16)~Y[c];
            m = _mm512_max_ps(X[c], m);
        }
        /* e = exp(s - m); the extremes of e give those of p = e / S (same rounding). */
        __m512 S = zero, min_pos = inf, max_neg = zero;
        for (int c = 0; c < nc; c++) {
            __m512 e = ml16_exp_below(_mm512_sub_ps(X[c], m));
            S = _mm512_add_ps(S, e);
            min_pos = _mm512_mask_min_ps(min_pos, Y[c], e, min_pos); /* a NaN e is skipped */
            max_neg = _mm512_mask_max_ps(max_neg, (__mmask16)~Y[c], e, max_neg);
            X[c] = e;
        }
        __m512 iS = _mm512_div_ps(one, S);
        min_pos = _mm512_mul_ps(min_pos, iS);
        max_neg = _mm512_mul_ps(max_neg, iS);
        __m512 low = _mm512_sub_ps(min_pos, vdelta), high = _mm512_add_ps(max_neg, vdelta);
        __mmask16 no_pos = (__mmask16)~any_pos, no_neg = (__mmask16)~any_neg;
        __m512 A = zero, Bs = zero;
        for (int c = 0; c < nc; c++) {
            __m512 p = _mm512_mul_ps(X[c], iS);
            /* Unordered comparisons: NaN keeps, so a NaN row's NaN reaches its loss. */
            __mmask16 keep_neg = (__mmask16)~Y[c] & (no_pos | _mm512_cmp_ps_mask(p, low, _CMP_NLT_UQ));
            __mmask16 keep_pos = Y[c] & (no_neg | _mm512_cmp_ps_mask(p, high, _CMP_NGT_UQ));
            /* p = 0 gives NaN here, in a row that is redone (its min_pos < tiny). */
            __m512 r = _mm512_rcp14_ps(p);
            __m512 ip = _mm512_mul_ps(r, _mm512_fnmadd_ps(p, r, _mm512_set1_ps(2.0f)));
            A = _mm512_mask_add_ps(A, keep_neg, A, p);
            Bs = _mm512_mask_add_ps(Bs, keep_pos, Bs, ip);
            V[c] = _mm512_mask_sub_ps(_mm512_maskz_mov_ps(keep_neg, p), keep_pos, zero, ip);
        }
        /* As ml_finish: one logarithm per row, and the redo flags. */
        __m512 el = _mm512_mul_ps(ml16_exp(m), S);
        __m512 iel = _mm512_div_ps(one, el);
        __m512 a = _mm512_mul_ps(A, el), b = _mm512_mul_ps(Bs, iel);
        __m512 l = ml16_log1p(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_mul_ps(a, b)));
        __m512 vebig = _mm512_set1_ps(ebig);
        __mmask16 rows = ml16_mask(n, 0);
        __mmask16 rd = (any_pos & _mm512_cmp_ps_mask(min_pos, _mm512_set1_ps(tiny), _CMP_LT_OQ)) |
                       _mm512_cmp_ps_mask(el, vebig, _CMP_GT_OQ) |
                       _mm512_cmp_ps_mask(_mm512_mul_ps(el, vebig), one, _CMP_LT_OQ) |
                       _mm512_cmp_ps_mask(l, inf, _CMP_EQ_OQ);
        rd &= rows;
        _mm512_mask_storeu_ps(loss + t0, rows, l);
        total += _mm512_mask_reduce_add_ps(rows, l);
        _mm_mask_storeu_epi8(redo + t0, rows, _mm_maskz_mov_epi8(rd, _mm_set1_epi8(1)));
        count += __builtin_popcount((unsigned)rd);
        if (g) {
            _mm512_mask_storeu_ps(gn + t0, rows, _mm512_div_ps(one, _mm512_add_ps(iel, A)));
            _mm512_mask_storeu_ps(gp + t0, rows, _mm512_div_ps(one, _mm512_add_ps(el, Bs)));
            if (g_rows) {
                ml16_permute(t.out_idx, t.out_sel, t.pairs, V, in, nc);
                for (int k = 0; k < nc; k++)
                    _mm512_mask_storeu_ps(g + t0 * C + (long)k * ML16, ml16_mask(n * C, k), in[k]);
            } else {
                ml16_store_strided(g, V, t0, n, C, L, gsb, gsc, gsl);
            }
        }
    }
    *sum += total;
    return not_binary ? -2 : count;
}

/* The backward of ml16_rows (see ml_scale): out = go * v * (v < 0 ? gp : gn) per row (go NULL:
 * go_value), exactly 0 where v is 0; the per-row factors reach a row's lanes through one permute
 * per vector. */
static void ml16_scale(const float *v, float *out, const float *gn, const float *gp,
                       const float *go, float go_value, long C, long r0, long r1) {
    ml16_tables t;
    ml16_prepare(&t, (int)C);
    const __m512 zero = _mm512_setzero_ps();
    for (long t0 = r0; t0 < r1; t0 += ML16) {
        long n = r1 - t0 < ML16 ? r1 - t0 : ML16;
        __mmask16 rows = ml16_mask(n, 0);
        __m512 grad = go ? _mm512_maskz_loadu_ps(rows, go + t0) : _mm512_set1_ps(go_value);
        __m512 fn = _mm512_mul_ps(_mm512_maskz_loadu_ps(rows, gn + t0), grad);
        __m512 fp = _mm512_mul_ps(_mm512_maskz_loadu_ps(rows, gp + t0), grad);
        for (long k = 0; k < C; k++) {
            __mmask16 mk = ml16_mask(n * C, k);
            __m512 x = _mm512_maskz_loadu_ps(mk, v + t0 * C + k * ML16);
            __mmask16 neg = _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ);
            __mmask16 nonzero = _mm512_cmp_ps_mask(x, zero, _CMP_NEQ_UQ);
            __m512 f = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(t.row_of[k], fn), neg,
                                                  t.row_of[k], fp);
            _mm512_mask_storeu_ps(out + t0 * C + k * ML16, mk,
                                  _mm512_maskz_mul_ps(nonzero, x, f));
        }
    }
}
