/* Multi-label AS-Softmax, instantiated per REAL type by kernels.c.
 *
 * Logits are viewed as (B, C, L) with element strides; row r = b * L + l holds the C scores of
 * sample (b, l), so (M, C) logits are (1, C, M) with strides (0, 1, C) and channel-second
 * (N, C, L) logits are themselves. Per row, with m = max s, e = exp(s - m), S = sum e,
 * p = e / S and lse = m + log S (the same formulas as the torch path in ops/multi_label.py):
 *
 *   negative i kept  iff  no positives, or not (min_P p - p_i > delta)
 *   positive j kept  iff  no negatives, or not (p_j - max_Q p > delta)
 *   A = sum of kept negative p,  Bs = sum of kept positive 1/p
 *   loss = log1p(A e^lse) + log1p(Bs e^-lse)
 *   grad = p / (e^-lse + A) on kept negatives, -(1/p) / (e^lse + Bs) on kept positives, else 0
 *
 * The forward writes v = p on kept negatives, -1/p on kept positives and 0 elsewhere, plus the
 * per-row factors sn = 1 / (e^-lse + A) and sp = 1 / (e^lse + Bs); ml_scale turns v into the
 * gradient (times the incoming per-row gradient) in one pass, in the backward.
 *
 * NaN comparisons are false, so a row with a NaN (or +inf, whose softmax is NaN) keeps every
 * term and its NaN surfaces. Rows where the shortcut loses digits (a positive with p < tiny,
 * |lse| > big, or an infinite loss) are flagged in `redo` for the exact path of the caller.
 * v has its own strides (gsb, gsc, gsl); the backward pass (ml_scale) reads it as contiguous
 * (B, C, L) or, with L = 1, as contiguous (rows, C).
 */

/* Loss, gradient factors and redo flag of one row from its reductions. With a = A e^lse and
 * b = Bs e^-lse, loss = log1p(a) + log1p(b) = log1p(a + b + ab): one logarithm per row. e^lse is
 * e^m S; "|lse| > big" is tested on it (a NaN row is never flagged: its NaN must surface). */
static inline void SFX(finish)(REAL m, REAL S, REAL A, REAL Bs, REAL min_pos, int has_pos,
                               REAL tiny, REAL ebig, REAL *loss, REAL *neg_scale,
                               REAL *pos_scale, uint8_t *redo) {
    REAL el = EXPR(m) * S;
    REAL iel = (REAL)1 / el;
    REAL a = A * el, b = Bs * iel;
    REAL l = LOG1PR(a + b + a * b);
    *loss = l;
    *neg_scale = (REAL)1 / (iel + A);
    *pos_scale = (REAL)1 / (el + Bs);
    *redo = (uint8_t)((has_pos & (min_pos < tiny)) | (el > ebig) | (el * ebig < (REAL)1) |
                      (l == INFR));
}

/* One label of a row: e = exp(s - m) joins the sum and, by side, the extremes that set the keep
 * thresholds (those of e give those of p = e / S: same rounding). */
static inline REAL SFX(ml_exp)(REAL t, REAL m, int pos, REAL *S, REAL *min_pos, REAL *max_neg) {
    REAL e = EXPR_BELOW(t - m);
    REAL mp = pos ? e : INFR;
    REAL mq = pos ? (REAL)0 : e;
    *S += e;
    *min_pos = mp < *min_pos ? mp : *min_pos;
    *max_neg = mq > *max_neg ? mq : *max_neg;
    return e;
}

/* One label's keep decision: its share of A (kept negative) or Bs (kept positive), and its v. */
static inline REAL SFX(ml_keep)(REAL p, int pos, int no_pos, int no_neg, REAL min_pos,
                                REAL max_neg, REAL delta, REAL *A, REAL *Bs) {
    int keep_neg = (!pos) & (no_pos | !(min_pos - p > delta));
    int keep_pos = pos & (no_neg | !(p - max_neg > delta));
    REAL ip = (REAL)1 / p;
    *A += keep_neg ? p : (REAL)0;
    *Bs += keep_pos ? ip : (REAL)0;
    return keep_neg ? p : (keep_pos ? -ip : (REAL)0);
}

/* Few classes, or samples contiguous along L: LANES rows at a time, one per vector lane.
 * x and v hold C * LANES REALs, yy C * LANES bytes. */
static long SFX(ml_lanes)(const REAL *s, const void *yv, int y_real, REAL *loss, REAL *g, REAL *gn,
                          REAL *gp, uint8_t *redo, long C, long L, long ssb, long ssc, long ssl,
                          long syb, long syc, long syl, long gsb, long gsc, long gsl, REAL delta, REAL tiny, REAL ebig, long r0,
                          long r1, REAL *x, REAL *v, uint8_t *yy) {
    long count = 0;
    long os[LANES], oy[LANES], og[LANES];
    REAL m[LANES], S[LANES], iS[LANES], min_pos[LANES], max_neg[LANES], A[LANES], Bs[LANES];
    REAL lo[LANES], sn[LANES], sp[LANES];
    int npos[LANES], bad[LANES];
    uint8_t rd[LANES];
    for (long t0 = r0; t0 < r1; t0 += LANES) {
        long n = r1 - t0 < LANES ? r1 - t0 : LANES;
        int one_b = tile_within_one_b(t0, n, L);
        /* Within one b the rows are evenly spaced: only the first offset is needed. */
        long walk = one_b ? 1 : n;
        tile_offsets(t0, walk, L, ssb, ssl, os);
        tile_offsets(t0, walk, L, syb, syl, oy);
        tile_offsets(t0, walk, L, gsb, gsl, og);
        SFX(tile_load)(s, os, one_b, n, C, ssc, ssl, x);
        /* Labels as 0/1 bytes, class-major like the scores (read as REAL or as bytes). */
        for (long c = 0; c < C; c++) {
            uint8_t *yc = yy + c * LANES;
            long step = one_b ? syl : 0;
            if (y_real) {
                const REAL *y = (const REAL *)yv + c * syc;
                for (long j = 0; j < n; j++) yc[j] = y[oy[one_b ? 0 : j] + j * step] != 0;
            } else {
                const uint8_t *y = (const uint8_t *)yv + c * syc;
                for (long j = 0; j < n; j++) yc[j] = y[oy[one_b ? 0 : j] + j * step] != 0;
            }
            for (long j = n; j < LANES; j++) yc[j] = yc[0];
        }
        for (long j = 0; j < LANES; j++) {
            m[j] = -INFR;
            npos[j] = 0;
            bad[j] = 0;
            S[j] = 0;
            min_pos[j] = INFR;
            max_neg[j] = 0;
            A[j] = 0;
            Bs[j] = 0;
        }
        for (long c = 0; c < C; c++) {
            const REAL *xc = x + c * LANES;
            const uint8_t *yc = yy + c * LANES;
#pragma omp simd
            for (long j = 0; j < LANES; j++) {
                REAL t = xc[j];
                m[j] = t > m[j] ? t : m[j];
                bad[j] |= t != t;
                npos[j] += yc[j];
            }
        }
        for (long j = 0; j < LANES; j++) m[j] = bad[j] ? (REAL)NAN : m[j];
        /* e = exp(s - m); the extremes of e give those of p = e / S (same rounding). */
        for (long c = 0; c < C; c++) {
            const REAL *xc = x + c * LANES;
            const uint8_t *yc = yy + c * LANES;
            REAL *vc = v + c * LANES;
#pragma omp simd
            for (long j = 0; j < LANES; j++)
                vc[j] = SFX(ml_exp)(xc[j], m[j], yc[j], &S[j], &min_pos[j], &max_neg[j]);
        }
#pragma omp simd
        for (long j = 0; j < LANES; j++) {
            iS[j] = (REAL)1 / S[j];
            min_pos[j] = min_pos[j] * iS[j];
            max_neg[j] = max_neg[j] * iS[j];
        }
        for (long c = 0; c < C; c++) {
            REAL *vc = v + c * LANES;
            const uint8_t *yc = yy + c * LANES;
#pragma omp simd
            for (long j = 0; j < LANES; j++)
                vc[j] = SFX(ml_keep)(vc[j] * iS[j], yc[j], npos[j] == 0, npos[j] == C, min_pos[j],
                                     max_neg[j], delta, &A[j], &Bs[j]);
        }
#pragma omp simd
        for (long j = 0; j < LANES; j++) {
            SFX(finish)(m[j], S[j], A[j], Bs[j], min_pos[j], npos[j] > 0, tiny, ebig, &lo[j], &sn[j],
                        &sp[j], &rd[j]);
        }
        for (long j = 0; j < n; j++) {
            loss[t0 + j] = lo[j];
            redo[t0 + j] = rd[j];
            count += rd[j];
        }
        if (g) {
            for (long j = 0; j < n; j++) {
                gn[t0 + j] = sn[j];
                gp[t0 + j] = sp[j];
            }
            SFX(tile_store)(g, v, og, one_b, n, C, gsc, gsl);
        }
    }
    return count;
}

/* Many classes: one row at a time; the row is read in place when its classes are contiguous.
 * The vector loops run over the first C - C % TAIL classes (a whole number of vectors); the last
 * C % TAIL classes go through a TAIL-long chunk padded with -inf logits and negative labels,
 * which change no sum or extreme, so no class runs in a scalar remainder loop.
 * xbuf, vbuf and yrow hold C REALs (v is g's row when that is contiguous). */
#define TAIL 16
static long SFX(ml_rows)(const REAL *s, const void *yv, int y_real, REAL *loss, REAL *g, REAL *gn,
                         REAL *gp, uint8_t *redo, long C, long L, long ssb, long ssc, long ssl,
                         long syb, long syc, long syl, long gsb, long gsc, long gsl, REAL delta,
                         REAL tiny, REAL ebig, long r0, long r1, REAL *xbuf, REAL *vbuf,
                         REAL *yrow) {
    long count = 0;
    long full = C - C % TAIL, tail = C - full;
    REAL xt[TAIL], vt[TAIL], yt[TAIL];
    for (long r = r0; r < r1; r++) {
        long b = r / L, l = r - b * L;
        const REAL *x = s + b * ssb + l * ssl;
        REAL *v = g && gsc == 1 ? g + b * gsb + l * gsl : vbuf;
        if (ssc != 1) {
            for (long c = 0; c < C; c++) xbuf[c] = x[c * ssc];
            x = xbuf;
        }
        /* Labels as REAL 0/1: mixing byte and float lanes would narrow the vector loops. */
        if (y_real) {
            const REAL *y = (const REAL *)yv + b * syb + l * syl;
            for (long c = 0; c < C; c++) yrow[c] = y[c * syc] != 0;
        } else {
            const uint8_t *y = (const uint8_t *)yv + b * syb + l * syl;
            for (long c = 0; c < C; c++) yrow[c] = y[c * syc] != 0;
        }
        const REAL *yr = yrow;
        for (long i = 0; i < TAIL; i++) {
            xt[i] = i < tail ? x[full + i] : -INFR;
            yt[i] = i < tail ? yr[full + i] : 0;
        }
        /* Each pass runs over the in-place classes, then over the padded tail chunk. */
        const REAL *xs[2] = {x, xt}, *ys[2] = {yr, yt};
        REAL *vs[2] = {v, vt};
        long lens[2] = {full, TAIL};
        REAL m = -INFR;
        int bad = 0, npos = 0;
        for (int k = 0; k < 2; k++) {
            const REAL *xk = xs[k], *yk = ys[k];
#pragma omp simd reduction(max : m) reduction(| : bad) reduction(+ : npos)
            for (long c = 0; c < lens[k]; c++) {
                m = xk[c] > m ? xk[c] : m;
                bad |= xk[c] != xk[c];
                npos += yk[c] != 0;
            }
        }
        m = bad ? (REAL)NAN : m;
        REAL S = 0, min_pos = INFR, max_neg = 0;
        for (int k = 0; k < 2; k++) {
            const REAL *xk = xs[k], *yk = ys[k];
            REAL *vk = vs[k];
#pragma omp simd reduction(+ : S) reduction(min : min_pos) reduction(max : max_neg)
            for (long c = 0; c < lens[k]; c++)
                vk[c] = SFX(ml_exp)(xk[c], m, yk[c] != 0, &S, &min_pos, &max_neg);
        }
        REAL iS = (REAL)1 / S;
        min_pos = min_pos * iS;
        max_neg = max_neg * iS;
        REAL A = 0, Bs = 0;
        for (int k = 0; k < 2; k++) {
            const REAL *yk = ys[k];
            REAL *vk = vs[k];
#pragma omp simd reduction(+ : A, Bs)
            for (long c = 0; c < lens[k]; c++)
                vk[c] = SFX(ml_keep)(vk[c] * iS, yk[c] != 0, npos == 0, npos == C, min_pos,
                                     max_neg, delta, &A, &Bs);
        }
        for (long i = 0; i < tail; i++) v[full + i] = vt[i];
        REAL sn, sp;
        uint8_t rd;
        SFX(finish)(m, S, A, Bs, min_pos, npos > 0, tiny, ebig, &loss[r], &sn, &sp, &rd);
        redo[r] = rd;
        count += rd;
        if (g) {
            gn[r] = sn;
            gp[r] = sp;
            if (v == vbuf) {
                REAL *gr = g + b * gsb + l * gsl;
                for (long c = 0; c < C; c++) gr[c * gsc] = v[c];
            }
        }
    }
    return count;
}
#undef TAIL

/* Whether every label of rows r0 <= r < r1 is 0 or 1 (labels as REAL, or as bytes). */
static int SFX(ml_labels_binary)(const void *yv, int y_real, long C, long L, long syb, long syc,
                                 long syl, long r0, long r1) {
    long bad = 0;
    for (long r = r0; r < r1; r++) {
        long b = r / L, l = r - b * L;
        if (y_real) {
            const REAL *y = (const REAL *)yv + b * syb + l * syl;
            for (long c = 0; c < C; c++) bad += !((y[c * syc] == 0) | (y[c * syc] == 1));
        } else {
            const uint8_t *y = (const uint8_t *)yv + b * syb + l * syl;
            for (long c = 0; c < C; c++) bad += y[c * syc] > 1;
        }
    }
    return bad == 0;
}

/* Rows r0 <= r < r1. y holds 0/1 labels as bytes (y_real = 0) or as REAL (y_real = 1). g, gn and
 * gp may be NULL (no gradient); so may total, else it receives total_scale times the sum of the
 * rows' losses (the mean or sum reduction). Returns the number of rows flagged in redo, -1 if the
 * scratch memory could not be allocated, or -2 if a label is neither 0 nor 1 (the outputs are
 * then unspecified). */
long SFX(multilabel)(const REAL *s, const void *y, int y_real, REAL *loss, REAL *g, REAL *gn,
                     REAL *gp, uint8_t *redo, REAL *total, long C, long L, long ssb, long ssc,
                     long ssl, long syb, long syc, long syl, long gsb, long gsc, long gsl,
                     double delta, double tiny, double ebig, double total_scale, long r0,
                     long r1) {
    long count;
#ifdef ML_SMALL_ROWS
    /* Score and label rows one after another in memory (the gradient may have any strides);
     * rows below L are all in the first b, whatever the b stride. */
    int one_b = r1 <= L;
    if (vector_kernels_enabled && C <= 16 && ssc == 1 && ssl == C && (one_b || ssb == L * C) &&
        syc == 1 && syl == C && (one_b || syb == L * C)) {
        fp_mode saved = flush_subnormals();
        double sum = 0;
        count = ML_SMALL_ROWS(s, y, y_real, loss, g, gn, gp, redo, C, L, gsb, gsc, gsl,
                              (REAL)delta, (REAL)tiny, (REAL)ebig, r0, r1, &sum);
        restore_fp_mode(saved);
        if (count >= 0 && total) *total = (REAL)(sum * total_scale);
        return count;
    }
#endif
    if (!SFX(ml_labels_binary)(y, y_real, C, L, syb, syc, syl, r0, r1)) return -2;
    /* Below LANES_MAX_C classes a row is too short for its vector loops; tiles of LANES rows are
     * faster even though rows are then gathered and scattered. */
    int lanes = C < LANES_MAX_C || (ssl == 1 && L >= LANES && C <= 4096);
    long width = lanes ? C * LANES : C;
    REAL *buf = (REAL *)malloc((size_t)width * 3 * sizeof(REAL));
    if (!buf) return -1;
    fp_mode mode = flush_subnormals();
    uint8_t *ybuf = (uint8_t *)(buf + 2 * width);
    count = lanes ? SFX(ml_lanes)(s, y, y_real, loss, g, gn, gp, redo, C, L, ssb, ssc, ssl, syb,
                                  syc, syl, gsb, gsc, gsl, (REAL)delta, (REAL)tiny, (REAL)ebig, r0,
                                  r1, buf, buf + width, ybuf)
                  : SFX(ml_rows)(s, y, y_real, loss, g, gn, gp, redo, C, L, ssb, ssc, ssl, syb,
                                 syc, syl, gsb, gsc, gsl, (REAL)delta, (REAL)tiny, (REAL)ebig, r0,
                                 r1, buf, buf + width, buf + 2 * width);
    restore_fp_mode(mode);
    free(buf);
    if (total) {
        double sum = 0;
        for (long r = r0; r < r1; r++) sum += loss[r];
        *total = (REAL)(sum * total_scale);
    }
    return count;
}

/* Backward: out = go[r] * v * (v < 0 ? gp : gn) per row r0 <= r < r1 of the contiguous (B, C, L)
 * buffer v (out may be v itself); go NULL means go_value for every row (a reduced loss). Entries
 * with v = 0 (masked terms, and every term of a masked row) get exactly 0, whatever go is. */
void SFX(ml_scale)(const REAL *v, REAL *out, const REAL *gn, const REAL *gp, const REAL *go,
                   double go_value, long C, long L, long r0, long r1) {
#ifdef ML_SMALL_SCALE
    if (vector_kernels_enabled && L == 1 && C <= 16) {
        ML_SMALL_SCALE(v, out, gn, gp, go, (REAL)go_value, C, r0, r1);
        return;
    }
#endif
    REAL same[16];
    for (int i = 0; i < 16; i++) same[i] = (REAL)go_value;
    if (L == 1 && C < 16) {
        /* Short rows: walk blocks of 16 rows as one flat run of 16 C entries, each reading its
         * row's factors through a table of row numbers (a vector gather, no division). */
        int row_of[16 * 16];
        for (int k = 0; k < 16 * C; k++) row_of[k] = k / (int)C;
        long r = r0;
        for (; r + 16 <= r1; r += 16) {
            const REAL *vr = v + r * C, *n = gn + r, *p = gp + r, *g = go ? go + r : same;
            REAL *o = out + r * C;
#pragma omp simd
            for (long k = 0; k < 16 * C; k++) {
                REAL t = vr[k];
                int i = row_of[k];
                o[k] = t == 0 ? (REAL)0 : t * (t < 0 ? p[i] : n[i]) * g[i];
            }
        }
        r0 = r; /* the last rows below */
    }
    if (L == 1) {
        for (long r = r0; r < r1; r++) {
            const REAL *vr = v + r * C;
            REAL *o = out + r * C;
            REAL gr = go ? go[r] : (REAL)go_value;
            REAL n = gn[r] * gr, p = gp[r] * gr;
#pragma omp simd
            for (long c = 0; c < C; c++) {
                REAL t = vr[c];
                o[c] = t == 0 ? (REAL)0 : t * (t < 0 ? p : n);
            }
        }
        return;
    }
    /* Rows of one b are contiguous along L: walk [r0, r1) in runs that stay within one b. */
    for (long r = r0; r < r1;) {
        long b = r / L, l0 = r - b * L;
        long l1 = L - l0 > r1 - r ? l0 + (r1 - r) : L;
        const REAL *n = gn + b * L, *p = gp + b * L, *g = go ? go + b * L : NULL;
        REAL g0 = (REAL)go_value;
        for (long c = 0; c < C; c++) {
            const REAL *vc = v + (b * C + c) * L;
            REAL *o = out + (b * C + c) * L;
            if (g) {
#pragma omp simd
                for (long l = l0; l < l1; l++) {
                    REAL t = vc[l];
                    o[l] = t == 0 ? (REAL)0 : t * (t < 0 ? p[l] : n[l]) * g[l];
                }
            } else {
#pragma omp simd
                for (long l = l0; l < l1; l++) {
                    REAL t = vc[l];
                    o[l] = t == 0 ? (REAL)0 : t * (t < 0 ? p[l] : n[l]) * g0;
                }
            }
        }
        r += l1 - l0;
    }
}


