/* Single-label AS-Softmax forward, instantiated per REAL type by kernels.c (after multilabel.h,
 * whose layout conventions, LANES, BLOCK and LANES_MAX_C it shares).
 *
 * Per row with target t, m = max z, e = exp(z - m), S = sum e, p = e / S (the formulas of the
 * torch path in ops/single_label.py):
 *
 *   class i kept  iff  not (p_i < p_t - delta)        (the target always is; NaN rows keep all)
 *   K = sum of kept p,  loss = log(K / p_t)           (exactly 0 when only the target is kept)
 *   loss = log K - ((z_t - m) - log S)                when p_t < tiny (p_t lost digits)
 *
 * The forward writes v = p on kept classes, p_t - K at the target, 0 elsewhere, and the per-row
 * factor 1/K (0 for rows with loss exactly 0); the gradient is go * factor * v (ml_scale).
 * Rows whose target is ignore_index get loss 0, valid 0, v = 0 and factor 0 and are not read.
 */

static inline void SFX(sl_finish)(REAL m, REAL S, REAL pt, REAL zt, REAL K, int valid, REAL tiny,
                                  REAL *loss, REAL *factor) {
    REAL l = pt < tiny ? LOGR(K) - ((zt - m) - LOGR(S)) : LOGR(K / pt);
    l = valid ? l : (REAL)0;
    *loss = l;
    *factor = valid & (l != 0) ? (REAL)1 / K : (REAL)0;
}

/* One class's keep decision: it joins the kept mass K and keeps its p, or gives 0. NaN is kept,
 * so a NaN row's NaN reaches its loss. */
static inline REAL SFX(sl_keep)(REAL p, REAL thr, REAL *K) {
    int kept = !(p < thr);
    *K += kept ? p : (REAL)0;
    return kept ? p : (REAL)0;
}

/* Few classes, or samples contiguous along L: LANES rows at a time (see ml_lanes). x holds
 * C * LANES REALs. */
static void SFX(sl_lanes)(const REAL *s, const int64_t *target, int64_t ignore, REAL *loss,
                          uint8_t *valid, REAL *g, REAL *gf, long C, long L, long ssb, long ssc,
                          long ssl, long gsb, long gsc, long gsl, REAL delta, REAL tiny, long r0,
                          long r1, REAL *x) {
    long os[LANES], og[LANES], tc[LANES];
    REAL m[LANES], S[LANES], et[LANES], zt[LANES], pt[LANES], thr[LANES], K[LANES];
    REAL lo[LANES], fa[LANES];
    int vd[LANES], bad[LANES];
    for (long t0 = r0; t0 < r1; t0 += LANES) {
        long n = r1 - t0 < LANES ? r1 - t0 : LANES;
        int one_b = tile_within_one_b(t0, n, L);
        tile_offsets(t0, n, L, ssb, ssl, os);
        tile_offsets(t0, n, L, gsb, gsl, og);
        for (long j = 0; j < LANES; j++) {
            int64_t tj = target[t0 + (j < n ? j : 0)];
            vd[j] = tj != ignore;
            tc[j] = vd[j] ? (long)tj : 0;
        }
        SFX(tile_load)(s, os, one_b, n, C, ssc, ssl, x);
        for (long j = 0; j < LANES; j++) {
            m[j] = -INFR;
            bad[j] = 0;
            S[j] = 0;
            et[j] = 0;
            zt[j] = 0;
            K[j] = 0;
        }
        for (long c = 0; c < C; c++) {
            const REAL *xc = x + c * LANES;
#pragma omp simd
            for (long j = 0; j < LANES; j++) {
                REAL v = xc[j];
                m[j] = v > m[j] ? v : m[j];
                bad[j] |= v != v;
            }
        }
        for (long j = 0; j < LANES; j++) m[j] = bad[j] ? (REAL)NAN : m[j];
        for (long c = 0; c < C; c++) {
            REAL *xc = x + c * LANES;
#pragma omp simd
            for (long j = 0; j < LANES; j++) {
                REAL z = xc[j];
                REAL e = EXPR_BELOW(z - m[j]);
                int at = c == tc[j];
                et[j] = at ? e : et[j];
                zt[j] = at ? z : zt[j];
                S[j] += e;
                xc[j] = e;
            }
        }
#pragma omp simd
        for (long j = 0; j < LANES; j++) {
            REAL iS = (REAL)1 / S[j];
            S[j] = iS; /* S holds 1/S until the finish */
            pt[j] = et[j] * iS;
            thr[j] = vd[j] ? pt[j] - delta : INFR;
        }
        for (long c = 0; c < C; c++) {
            REAL *xc = x + c * LANES;
#pragma omp simd
            for (long j = 0; j < LANES; j++) xc[j] = SFX(sl_keep)(xc[j] * S[j], thr[j], &K[j]);
        }
#pragma omp simd
        for (long j = 0; j < LANES; j++) {
            SFX(sl_finish)(m[j], (REAL)1 / S[j], pt[j], zt[j], K[j], vd[j], tiny, &lo[j], &fa[j]);
        }
        for (long j = 0; j < n; j++) {
            loss[t0 + j] = lo[j];
            valid[t0 + j] = (uint8_t)vd[j];
        }
        if (!g) continue;
        for (long j = 0; j < n; j++) gf[t0 + j] = fa[j];
        for (long c = 0; c < C; c++) {
            REAL *xc = x + c * LANES;
#pragma omp simd
            for (long j = 0; j < LANES; j++) {
                REAL v = c == tc[j] ? pt[j] - K[j] : xc[j];
                xc[j] = vd[j] ? v : (REAL)0;
            }
        }
        SFX(tile_store)(g, x, og, one_b, n, C, gsc, gsl);
    }
}

/* Many classes: one row at a time, read in place when its classes are contiguous; the last
 * C % TAIL classes go through a chunk padded with -inf (see ml_rows). xbuf and vbuf hold C REALs
 * (v is g's row when that is contiguous). */
#define TAIL VL /* the passes step VL lanes at a time over whole chunks */
static void SFX(sl_rows)(const REAL *s, const int64_t *target, int64_t ignore, REAL *loss,
                         uint8_t *valid, REAL *g, REAL *gf, long C, long L, long ssb, long ssc,
                         long ssl, long gsb, long gsc, long gsl, REAL delta, REAL tiny, long r0,
                         long r1, REAL *xbuf, REAL *vbuf) {
    long full = C - C % TAIL, tail = C - full;
    REAL xt[TAIL], vt[TAIL];
    for (long r = r0; r < r1; r++) {
        long b = r / L, l = r - b * L;
        int64_t tr = target[r];
        int vd = tr != ignore;
        valid[r] = (uint8_t)vd;
        REAL *v = g && gsc == 1 ? g + b * gsb + l * gsl : vbuf;
        if (!vd) {
            loss[r] = 0;
            if (g) {
                gf[r] = 0;
                REAL *gr = g + b * gsb + l * gsl;
                for (long c = 0; c < C; c++) gr[c * gsc] = 0;
            }
            continue;
        }
        const REAL *x = s + b * ssb + l * ssl;
        if (ssc != 1) {
            for (long c = 0; c < C; c++) xbuf[c] = x[c * ssc];
            x = xbuf;
        }
        for (long i = 0; i < TAIL; i++) xt[i] = i < tail ? x[full + i] : -INFR;
        /* Each pass runs over the in-place classes, then over the padded tail chunk. */
        const REAL *xs[2] = {x, xt};
        REAL *vs[2] = {v, vt};
        long lens[2] = {full, TAIL};
        /* Every pass accumulates VL lanes over the in-place classes, then the padded tail. */
        REAL am[VL], bad[VL];
        for (int i = 0; i < VL; i++) am[i] = -INFR, bad[i] = 0;
        for (int k = 0; k < 2; k++) {
            const REAL *xk = xs[k];
            for (long c0 = 0; c0 < lens[k]; c0 += VL) {
#pragma omp simd
                for (int i = 0; i < VL; i++) {
                    REAL t = xk[c0 + i];
                    am[i] = t > am[i] ? t : am[i];
                    bad[i] += t != t;
                }
            }
        }
        REAL m = SFX(fold_sum)(bad) != 0 ? (REAL)NAN : SFX(fold_max)(am);
        REAL aS[VL];
        for (int i = 0; i < VL; i++) aS[i] = 0;
        for (int k = 0; k < 2; k++) {
            const REAL *xk = xs[k];
            REAL *vk = vs[k];
            for (long c0 = 0; c0 < lens[k]; c0 += VL) {
#pragma omp simd
                for (int i = 0; i < VL; i++) {
                    REAL e = EXPR_BELOW(xk[c0 + i] - m);
                    vk[c0 + i] = e;
                    aS[i] += e;
                }
            }
        }
        REAL S = SFX(fold_sum)(aS);
        for (long i = 0; i < tail; i++) v[full + i] = vt[i];
        REAL iS = (REAL)1 / S;
        REAL pt = v[tr] * iS, zt = x[tr];
        REAL thr = pt - delta, aK[VL];
        for (int i = 0; i < VL; i++) aK[i] = 0;
        for (int k = 0; k < 2; k++) {
            REAL *vk = vs[k];
            for (long c0 = 0; c0 < lens[k]; c0 += VL) {
#pragma omp simd
                for (int i = 0; i < VL; i++)
                    vk[c0 + i] = SFX(sl_keep)(vk[c0 + i] * iS, thr, &aK[i]);
            }
        }
        REAL K = SFX(fold_sum)(aK);
        for (long i = 0; i < tail; i++) v[full + i] = vt[i];
        REAL lo, fa;
        SFX(sl_finish)(m, S, pt, zt, K, 1, tiny, &lo, &fa);
        loss[r] = lo;
        if (g) {
            gf[r] = fa;
            v[tr] = pt - K;
            if (v == vbuf) {
                REAL *gr = g + b * gsb + l * gsl;
                for (long c = 0; c < C; c++) gr[c * gsc] = v[c];
            }
        }
    }
}
#undef TAIL

/* Rows r0 <= r < r1; target holds one int64 class index per row, in row order. g and gf may be
 * NULL (no gradient); so may total, else it receives the sum of the rows' losses, divided by the
 * number of rows not ignored (at least 1) when mean is set. Returns that number of rows, -1 if
 * the scratch memory could not be allocated, or -2 if a target is neither ignore nor in [0, C)
 * (the outputs are then unspecified). */
long SFX(singlelabel)(const REAL *s, const int64_t *target, int64_t ignore, REAL *loss,
                      uint8_t *valid, REAL *g, REAL *gf, REAL *total, int mean, long C, long L,
                      long ssb, long ssc, long ssl, long gsb, long gsc, long gsl, double delta,
                      double tiny, long r0, long r1) {
    long bad = 0;
#pragma omp simd reduction(+ : bad)
    for (long r = r0; r < r1; r++)
        bad += (target[r] != ignore) & ((uint64_t)target[r] >= (uint64_t)C);
    if (bad) return -2;
    int lanes = C < LANES_MAX_C || (ssl == 1 && L >= LANES && C <= 4096);
    long width = lanes ? C * LANES : C;
    REAL *buf = (REAL *)malloc((size_t)width * 2 * sizeof(REAL));
    if (!buf) return -1;
    fp_mode mode = flush_subnormals();
    if (lanes)
        SFX(sl_lanes)(s, target, ignore, loss, valid, g, gf, C, L, ssb, ssc, ssl, gsb, gsc, gsl,
                      (REAL)delta, (REAL)tiny, r0, r1, buf);
    else
        SFX(sl_rows)(s, target, ignore, loss, valid, g, gf, C, L, ssb, ssc, ssl, gsb, gsc, gsl,
                     (REAL)delta, (REAL)tiny, r0, r1, buf, buf + width);
    restore_fp_mode(mode);
    free(buf);
    long count = 0;
    double sum = 0;
    for (long r = r0; r < r1; r++) {
        count += valid[r];
        sum += loss[r]; /* 0 at ignored rows */
    }
    if (total) *total = (REAL)(mean ? sum / (double)(count > 0 ? count : 1) : sum);
    return count;
}
