/* Tile transposes shared by the lanes kernels of multilabel.h and singlelabel.h, instantiated per
 * REAL type by kernels.c. A tile holds LANES rows class-major: x[c * LANES + j] is class c of row
 * t0 + j. Within one b the rows are evenly spaced, so they are read and written with strides and
 * no offset table, in blocks of BLOCK rows that stay in L1 cache while every class is visited.
 * Always inlined: as calls they cost the small-C kernels about 10%. */

/* Scores of the n rows whose logits start at os[j] (class stride ssc) into the tile x; lanes past
 * n repeat row t0 (they are computed and never stored). */
static inline __attribute__((always_inline)) void SFX(tile_load)(const REAL *s, const long *os,
                                                                 int one_b, long n, long C,
                                                                 long ssc, long ssl, REAL *x) {
    for (long j0 = 0; j0 < n; j0 += BLOCK) {
        long j1 = j0 + BLOCK < n ? j0 + BLOCK : n;
        for (long c = 0; c < C; c++) {
            REAL *xc = x + c * LANES;
            if (one_b) {
                const REAL *sc = s + os[0] + c * ssc;
                for (long j = j0; j < j1; j++) xc[j] = sc[j * ssl];
            } else {
                for (long j = j0; j < j1; j++) xc[j] = s[os[j] + c * ssc];
            }
        }
    }
    for (long c = 0; c < C; c++)
        for (long j = n; j < LANES; j++) x[c * LANES + j] = x[c * LANES];
}

/* The first n rows of the tile v into the gradient rows starting at og[j] (class stride gsc). */
static inline __attribute__((always_inline)) void SFX(tile_store)(REAL *g, const REAL *v,
                                                                  const long *og, int one_b,
                                                                  long n, long C, long gsc,
                                                                  long gsl) {
    for (long j0 = 0; j0 < n; j0 += BLOCK) {
        long j1 = j0 + BLOCK < n ? j0 + BLOCK : n;
        for (long c = 0; c < C; c++) {
            const REAL *vc = v + c * LANES;
            if (one_b && gsl == 1) {
                memcpy(g + og[0] + c * gsc + j0, vc + j0, (size_t)(j1 - j0) * sizeof(REAL));
            } else if (one_b) {
                REAL *gc = g + og[0] + c * gsc;
                for (long j = j0; j < j1; j++) gc[j * gsl] = vc[j];
            } else {
                for (long j = j0; j < j1; j++) g[og[j] + c * gsc] = vc[j];
            }
        }
    }
}

/* Folds of VL per-lane partial results (see VL in kernels.c); a is overwritten. NaN lanes are
 * skipped by the max, as in the passes that fill them. */
static inline REAL SFX(fold_sum)(REAL *a) {
    for (int w = VL / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) a[i] += a[i + w];
    return a[0];
}

static inline REAL SFX(fold_max)(REAL *a) {
    for (int w = VL / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) a[i] = a[i + w] > a[i] ? a[i + w] : a[i];
    return a[0];
}

static inline REAL SFX(fold_min)(REAL *a) {
    for (int w = VL / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) a[i] = a[i + w] < a[i] ? a[i + w] : a[i];
    return a[0];
}
