/* Drivers for one element type (see bn_impl.h): split the work into tasks, run them on an
 * OpenMP team of `nt` threads, turn the sums into per-channel coefficients.
 * Every driver runs without the GIL; it only touches the buffers it is given. */

/* Pivot per channel: the mean of the first few values, so (x - pivot) is small even under a
 * large common offset and the sum of squares keeps its digits. */
static void SFX(pivots)(const T *x, int64_t N, int64_t C, int64_t S, int nhwc, T *piv) {
    if (nhwc) {
        /* row by row, in memory order: a column walk would stride C values per step, and for
         * C a multiple of 1024 every step falls into one L1 set (measured: 1 ms of a 1.2 ms
         * forward on (256, 4096)). The sum is in T: a pivot only needs to be near the data,
         * and forward and backward compute the same one. Each term is scaled first, so values
         * near the largest finite T do not overflow the sum. */
        int64_t k = N < 64 ? N : 64;
        T inv = (T)(1.0 / (double)k);
        for (int64_t c = 0; c < C; c++) piv[c] = x[c] * inv;
        for (int64_t r = 1; r < k; r++)
            for (int64_t c = 0; c < C; c++) piv[c] += x[r * C + c] * inv;
        return;
    }
    for (int64_t c = 0; c < C; c++) {
        double s = 0.0;
        int64_t k = 0;
        for (; k < S && k < 64; k++) s += x[c * S + k];
        piv[c] = (T)(s / (double)(k ? k : 1));
    }
}

/* Mean, variance, invstd and the normalising coefficients of channel c from its sums. */
static void SFX(finalize)(int64_t c, double s1, double s2, double n, T piv, const T *w,
                          const T *b, double eps, T *mean_o, T *var_o, T *invstd_o, T *delta_o,
                          T *thr_o, T *ctr, T *sc, T *sh) {
    double m1 = s1 / n;
    double var = s2 / n - m1 * m1;
    if (var < 0) var = 0;
    double mean = (double)piv + m1;
    T invstd = (T)(1.0 / sqrt(var + eps));
    T center = (T)mean;
    double scale = (w ? (double)w[c] : 1.0) * (double)invstd;
    mean_o[c] = center;
    var_o[c] = (T)var;
    invstd_o[c] = invstd;
    /* the rounding of the mean to T, for backward: (x - mean) = (x - center) - delta */
    if (delta_o) delta_o[c] = (T)(mean - (double)center);
    ctr[c] = center;
    sc[c] = (T)scale;
    /* (mean - center) is the rounding of the mean to T: folded into the shift, so y stays exact
     * to T precision when |mean| >> std. */
    sh[c] = (T)((b ? (double)b[c] : 0.0) - (mean - (double)center) * (double)(T)scale);
    /* The activation's threshold: (x - ctr) sc + sh > 0 <=> sign(sc) (x - piv - thr) > 0. It is
     * all backward needs to recompute the mask. It is stored relative to the pivot: near a
     * large common offset an absolute threshold rounded to T would be as coarse as x itself
     * and misclassify every value equal to it. */
    if (thr_o) {
        if (sc[c] != 0)
            thr_o[c] = (T)((double)center - (double)piv - (double)sh[c] / (double)sc[c]);
        else
            thr_o[c] = sh[c] > 0 ? -(T)INFINITY : (T)INFINITY;
    }
}

/* ------------------------------------------------------------------ passes over the tensor
 * Work is split into `nk` ranges of rows in memory order: NHWC rows of C values, or NCHW
 * planes of S values (plane p belongs to channel p % C). Each range accumulates into its own
 * per-channel doubles, summed afterwards in a fixed order (deterministic for a thread count). */
static int64_t SFX(rows_of)(int64_t N, int64_t C, int nhwc) { return nhwc ? N : N * C; }

/* s[c] = sum(x - piv[c]), s[Cc + c] = sum((x - piv[c])^2) over the Cc = cm.nc channels;
 * `part` is scratch for PART_DOUBLES(Cc, nt) doubles. NHWC columns go to their channels by
 * cm (colmap_id(C) but for the views of short planes and few channels, see below). */
static void SFX(stats_pass)(const T *x, int64_t N, int64_t C, int64_t S, int nhwc, const T *piv,
                            double *s, double *part, colmap cm, T *run, int nt) {
    int64_t rows = SFX(rows_of)(N, C, nhwc), nk = row_tasks(rows, C, nhwc, nt), Cc = cm.nc;
    memset(part, 0, (size_t)(2 * Cc * nk) * sizeof(double));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < nk; t++) {
        int64_t r0 = rows * t / nk, r1 = rows * (t + 1) / nk;
        double *o = part + 2 * Cc * t;
        if (nhwc) {
            SFX(sums_nhwc)(x, C, r0, r1, piv, o, o + Cc, cm);
        } else if (run) {
            int th = omp_get_thread_num();
            SFX(sums_run)(x, r0, r1, C, S, piv, o, o + C, SFX(run_acc)(run, C, th),
                          SFX(run_cnt)(run, C, nt, th));
        } else {
            for (int64_t p = r0, c = r0 % C; p < r1; p++, c = c + 1 == C ? 0 : c + 1)
                SFX(sums_plane)(x + p * S, S, piv[c], &o[c], &o[C + c]);
        }
    }
    for (int64_t k = 0; k < 2 * Cc; k++) s[k] = 0.0;
    for (int64_t t = 0; t < nk; t++)
        for (int64_t k = 0; k < 2 * Cc; k++) s[k] += part[2 * Cc * t + k];
}

/* Streaming stores for a large output, except NCHW planes that do not fill whole cache lines:
 * there the stores of neighbouring planes would share lines, and partly written
 * write-combining lines cost more than the read-for-ownership they save (measured: eval of
 * (256, 256, 14, 14), 784-byte planes, 4.3 ms streamed against 2.8 ms plain). */
static int SFX(stream_ok)(int64_t N, int64_t C, int64_t S, int nhwc) {
    if (!nhwc && (S * (int64_t)sizeof(T)) % 64 != 0) return 0;
    return streamed(N * C * S * (int64_t)sizeof(T));
}

static void SFX(apply_pass)(const T *x, T *y, int64_t N, int64_t C, int64_t S, int nhwc,
                            const T *ctr, const T *sc, const T *sh, int act, T slope, int nt) {
    int64_t rows = SFX(rows_of)(N, C, nhwc), nk = row_tasks(rows, C, nhwc, nt);
    int stream = SFX(stream_ok)(N, C, S, nhwc);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < nk; t++) {
        int64_t r0 = rows * t / nk, r1 = rows * (t + 1) / nk;
        if (nhwc) {
            SFX(apply_nhwc)(x, y, C, r0, r1, ctr, sc, sh, act, slope, stream);
        } else {
            /* c = p % C, stepped (a division per short plane is measurable) */
            for (int64_t p = r0, c = r0 % C; p < r1; p++, c = c + 1 == C ? 0 : c + 1) {
                SFX(apply_plane)(x + p * S, y + p * S, S, ctr[c], sc[c], sh[c], act, slope,
                                 stream);
            }
        }
        stream_fence();
    }
}

/* s holds 2 * C doubles, sum(g) and sum(g (x - ctr)), and with st also sum(x - ctr) and
 * sum((x - ctr)^2) (4 * C). */
static void SFX(bred_pass)(const T *dy, const T *x, int64_t N, int64_t C, int64_t S, int nhwc,
                           const T *ctr, const T *msc, const T *msh, int act, T slope, double *s,
                           double *part, int st, colmap cm, T *run, int nt) {
    int64_t rows = SFX(rows_of)(N, C, nhwc), nk = row_tasks(rows, C, nhwc, nt), Cc = cm.nc;
    int64_t ns = (st ? 4 : 2) * Cc;
    memset(part, 0, (size_t)(4 * Cc * nk) * sizeof(double));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < nk; t++) {
        int64_t r0 = rows * t / nk, r1 = rows * (t + 1) / nk;
        double *o = part + 4 * Cc * t;
        if (nhwc) {
            SFX(bred_nhwc)(dy, x, C, r0, r1, ctr, msc, msh, act, slope, o, st, cm);
        } else if (run) {
            int th = omp_get_thread_num();
            SFX(bred_run)(dy, x, r0, r1, C, S, ctr, msc, msh, act, slope, o, SFX(run_acc)(run, C, th),
                          SFX(run_cnt)(run, C, nt, th), st);
        } else {
            /* c = p % C, stepped (a division per short plane is measurable) */
            for (int64_t p = r0, c = r0 % C; p < r1; p++, c = c + 1 == C ? 0 : c + 1) {
                SFX(bred_plane)(dy + p * S, x + p * S, S, ctr[c], msc[c], msh[c], act, slope,
                                o + c, C, st);
            }
        }
    }
    for (int64_t k = 0; k < ns; k++) s[k] = 0.0;
    for (int64_t t = 0; t < nk; t++)
        for (int64_t k = 0; k < ns; k++) s[k] += part[4 * Cc * t + k];
}

static void SFX(bdx_pass)(const T *dy, const T *x, T *dx, int64_t N, int64_t C, int64_t S,
                          int nhwc, const T *ctr, const T *msc, const T *msh, int act, T slope,
                          const T *A, const T *G, const T *B, const T *D, int nt) {
    int64_t rows = SFX(rows_of)(N, C, nhwc), nk = row_tasks(rows, C, nhwc, nt);
    int stream = SFX(stream_ok)(N, C, S, nhwc);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < nk; t++) {
        int64_t r0 = rows * t / nk, r1 = rows * (t + 1) / nk;
        if (nhwc) {
            SFX(bdx_nhwc)(dy, x, dx, C, r0, r1, ctr, msc, msh, act, slope, A, G, B, D, stream);
        } else {
            /* c = p % C, stepped (a division per short plane is measurable) */
            for (int64_t p = r0, c = r0 % C; p < r1; p++, c = c + 1 == C ? 0 : c + 1) {
                SFX(bdx_plane)(dy + p * S, x + p * S, dx + p * S, S, ctr[c], msc[c], msh[c], act,
                               slope, A[c], G[c], B[c], D[c], stream);
            }
        }
        stream_fence();
    }
}

/* ------------------------------------------------------------------ channel by channel
 * The passes above go over the whole tensor in memory order: the second pass of a kernel
 * (forward: normalise after the sums; backward: dx after the sums) reads the tensor again from
 * memory once it is larger than the caches. An NCHW channel is N planes, and the sums of one
 * channel are all its second pass needs: channel by channel, a thread makes both passes over
 * one channel while it is still in its cache, and the tensor is read from memory once.
 * Each channel's sums run in one fixed order (plane 0 to N-1), whatever the thread count. */
static int SFX(cmajor)(int64_t N, int64_t C, int64_t S, int nhwc, int nt) {
    int64_t plane = S * (int64_t)sizeof(T);
    return !nhwc && plane >= CMAJOR_PLANE_BYTES && N * plane <= cmajor_bytes &&
           C >= (int64_t)CMAJOR_CHANNELS_PER_THREAD * nt;
}

/* training forward of channels [0, C): sums, finalize, normalise */
static void SFX(fwd_cmajor)(const T *x, T *y, int64_t N, int64_t C, int64_t S, const T *piv,
                            const T *w, const T *b, double eps, T *mean_o, T *var_o,
                            T *invstd_o, T *delta_o, T *thr_o, T *ctr, T *sc, T *sh, int act,
                            T slope, int nt) {
    int stream = SFX(stream_ok)(N, C, S, 0);
    double n = (double)N * (double)S;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t c = 0; c < C; c++) {
        double s1 = 0.0, s2 = 0.0;
        for (int64_t i = 0; i < N; i++) SFX(sums_plane)(x + (i * C + c) * S, S, piv[c], &s1, &s2);
        SFX(finalize)(c, s1, s2, n, piv[c], w, b, eps, mean_o, var_o, invstd_o, delta_o, thr_o,
                      ctr, sc, sh);
        for (int64_t i = 0; i < N; i++)
            SFX(apply_plane)(x + (i * C + c) * S, y + (i * C + c) * S, S, ctr[c], sc[c], sh[c],
                             act, slope, stream);
        stream_fence();
    }
}

/* ------------------------------------------------------------------ short NCHW planes
 * A plane of a few values (2x2, 3x3 maps) costs a call, a horizontal sum and a flush into
 * double per handful of values. Such a tensor also reads as N rows of C * S columns, column i
 * belonging to channel i / S: the NHWC passes then run over it with every per-channel
 * coefficient repeated S times, and add each column's sums into its channel's. Each value goes
 * through the same arithmetic as on the plane path. */
static int SFX(wide_planes)(int64_t C, int64_t S, int nhwc) {
    return !nhwc && S > 1 && S * (int64_t)sizeof(T) < WIDE_PLANE_BYTES && C * S <= wide_columns;
}

/* ------------------------------------------------------------------ channels-last rows of few channels
 * NHWC rows whose C is not a whole number of vectors (an RGB input, odd feature counts) end in
 * a scalar loop, and below one vector are nothing else. VL consecutive rows also read as one
 * row of VL C columns, a whole number of vectors: the NHWC passes run over it with the
 * per-channel coefficients tiled VL times (column i belongs to channel i % C), and the last
 * M % VL rows take the plain path. */
static int64_t SFX(tile_rows)(int64_t M, int64_t C, int nhwc) {
    int64_t vl = SFX(vlen)();
    return nhwc && C % vl != 0 && M >= vl && C * vl <= tile_columns ? vl : 0;
}

/* The view a tensor runs as: none (W = 0), short NCHW planes as N rows of C * S columns, or
 * groups of k channels-last rows as rows of k C columns (R rows, then `tail` plain rows). */
typedef struct {
    int64_t W, R, S, k, tail;
} SFX(view);

static SFX(view) SFX(view_of)(int64_t N, int64_t C, int64_t S, int nhwc) {
    SFX(view) v = {0, 0, S, 0, 0};
    if (SFX(wide_planes)(C, S, nhwc)) {
        v.W = C * S;
        v.R = N;
    } else if ((v.k = SFX(tile_rows)(N, C, nhwc))) {
        v.W = v.k * C;
        v.R = N / v.k;
        v.tail = N - v.R * v.k;
    }
    return v;
}

static colmap SFX(view_map)(SFX(view) v, int64_t C) {
    return v.k ? colmap_of(1, C) : colmap_of(v.S, C);
}

/* per-column copy of a per-channel vector: dst[c S + j] = src[c] (planes) or
 * dst[j C + c] = src[c] (tiled rows) */
static void SFX(expand)(SFX(view) v, const T *src, T *dst, int64_t C) {
    if (v.k) {
        for (int64_t j = 0; j < v.k; j++) memcpy(dst + j * C, src, (size_t)C * sizeof(T));
    } else {
        for (int64_t c = 0; c < C; c++)
            for (int64_t j = 0; j < v.S; j++) dst[c * v.S + j] = src[c];
    }
}

/* ------------------------------------------------------------------ kernels */
/* Training forward. With running buffers rm/rv (else NULL) it also moves them towards the
 * batch statistics, rm += factor (mean - rm), rv += factor (var * unbias - rv), unless a
 * statistic is NaN/Inf. Returns 1 when every statistic is finite, else 0 (nothing updated),
 * -1 when its scratch memory could not be allocated (nothing written). */
static int SFX(train_fwd)(const T *x, T *y, int64_t N, int64_t C, int64_t S, int nhwc,
                          const T *w, const T *b, T *mean_o, T *var_o, T *invstd_o, T *delta_o,
                          T *thr_o, double eps, int act, T slope, T *rm, T *rv, double factor,
                          double unbias, int nt) {
    nt = threads_for(N * C * S, nt);
    SFX(view) v = SFX(view_of)(N, C, S, nhwc);
    int64_t W = v.W; /* columns of the view (0: none) */
    int64_t nrun = W || nhwc ? 0 : SFX(run_scratch)(C, S, nt);
    T *piv = malloc((size_t)(4 * C + 4 * W + nrun) * sizeof(T));
    double *s = malloc((size_t)(4 * C + PART_DOUBLES(C, nt)) * sizeof(double));
    if (!piv || !s) {
        free(piv);
        free(s);
        return -1;
    }
    T *run = nrun ? piv + 4 * C + 4 * W : NULL;
    T *ctr = piv + C, *sc = piv + 2 * C, *sh = piv + 3 * C;
    double *part = s + 4 * C, n = (double)N * (double)S;
    SFX(pivots)(x, N, C, S, nhwc, piv);
    if (W) {
        T *pw = piv + 4 * C, *cw = pw + W, *scw = cw + W, *shw = scw + W;
        const T *xt = x + v.R * W; /* tail rows */
        SFX(expand)(v, piv, pw, C);
        SFX(stats_pass)(x, v.R, W, 1, 1, pw, s, part, SFX(view_map)(v, C), NULL, nt);
        if (v.tail) {
            SFX(stats_pass)(xt, v.tail, C, 1, 1, piv, s + 2 * C, part, colmap_id(C), NULL, 1);
            for (int64_t c = 0; c < 2 * C; c++) s[c] += s[2 * C + c];
        }
        for (int64_t c = 0; c < C; c++)
            SFX(finalize)(c, s[c], s[C + c], n, piv[c], w, b, eps, mean_o, var_o, invstd_o,
                          delta_o, thr_o, ctr, sc, sh);
        SFX(expand)(v, ctr, cw, C);
        SFX(expand)(v, sc, scw, C);
        SFX(expand)(v, sh, shw, C);
        SFX(apply_pass)(x, y, v.R, W, 1, 1, cw, scw, shw, act, slope, nt);
        if (v.tail) SFX(apply_pass)(xt, y + v.R * W, v.tail, C, 1, 1, ctr, sc, sh, act, slope, 1);
    } else if (SFX(cmajor)(N, C, S, nhwc, nt)) {
        SFX(fwd_cmajor)(x, y, N, C, S, piv, w, b, eps, mean_o, var_o, invstd_o, delta_o, thr_o,
                        ctr, sc, sh, act, slope, nt);
    } else {
        SFX(stats_pass)(x, N, C, S, nhwc, piv, s, part, colmap_id(C), run, nt);
        for (int64_t c = 0; c < C; c++)
            SFX(finalize)(c, s[c], s[C + c], n, piv[c], w, b, eps, mean_o, var_o, invstd_o,
                          delta_o, thr_o, ctr, sc, sh);
        SFX(apply_pass)(x, y, N, C, S, nhwc, ctr, sc, sh, act, slope, nt);
    }
    int finite = 1;
    for (int64_t c = 0; c < C; c++)
        if (!isfinite(mean_o[c]) || !isfinite(var_o[c])) finite = 0;
    if (finite && rm && rv)
        for (int64_t c = 0; c < C; c++) {
            rm[c] = (T)((double)rm[c] + factor * ((double)mean_o[c] - (double)rm[c]));
            rv[c] = (T)((double)rv[c] + factor * ((double)var_o[c] * unbias - (double)rv[c]));
        }
    free(s);
    free(piv);
    return finite;
}

/* y = act((x - mean) * w * invstd + b) with given statistics (evaluation mode); with eps >= 0
 * `invstd` holds the variance instead, and invstd = 1 / sqrt(var + eps) in double. Returns 0,
 * or -1 when its scratch memory could not be allocated. */
static int SFX(eval_fwd)(const T *x, T *y, int64_t N, int64_t C, int64_t S, int nhwc,
                         const T *mean, const T *invstd, const T *w, const T *b, int act,
                         T slope, double eps, int nt) {
    SFX(view) v = SFX(view_of)(N, C, S, nhwc);
    int64_t W = v.W;
    T *sc = malloc((size_t)(2 * C + 3 * W) * sizeof(T));
    if (!sc) return -1;
    T *sh = sc + C;
    for (int64_t c = 0; c < C; c++) {
        /* eps < 0: invstd given; a NaN eps takes the variance path and gives NaN, as torch */
        double r = !(eps < 0) ? 1.0 / sqrt((double)invstd[c] + eps) : (double)invstd[c];
        sc[c] = (T)((w ? (double)w[c] : 1.0) * r);
        sh[c] = b ? b[c] : (T)0;
    }
    nt = threads_for(N * C * S, nt);
    if (W) {
        T *cw = sh + C, *scw = cw + W, *shw = scw + W;
        SFX(expand)(v, mean, cw, C);
        SFX(expand)(v, sc, scw, C);
        SFX(expand)(v, sh, shw, C);
        SFX(apply_pass)(x, y, v.R, W, 1, 1, cw, scw, shw, act, slope, nt);
        if (v.tail)
            SFX(apply_pass)(x + v.R * W, y + v.R * W, v.tail, C, 1, 1, mean, sc, sh, act, slope,
                            1);
    } else {
        SFX(apply_pass)(x, y, N, C, S, nhwc, mean, sc, sh, act, slope, nt);
    }
    free(sc);
    return 0;
}

/* Per-channel dx = A (G g + B (x - ctr) + D) and the parameter gradients, from the sums
 * sum(g) and sum(g (x - ctr)). In training the statistics depend on x (the centring and
 * scaling terms, plus the gradients arriving at the mean and variance outputs); `delta` is the
 * true mean minus the stored (rounded) one. */
static void SFX(bcoef)(int64_t c, double sg, double sgx, double n, const T *invstd, const T *w,
                       double delta, const T *gmean, const T *gvar, int train, T *dw, T *db, T *A,
                       T *G, T *B, T *D) {
    double r = invstd[c];
    double scale = (double)(T)((w ? (double)w[c] : 1.0) * r);
    double s1 = sgx - delta * sg; /* sum(g (x - mean)) */
    if (dw) dw[c] = (T)(r * s1);
    if (db) db[c] = (T)sg;
    /* dx = scale (g + b (x - ctr) + d) + b2 (x - ctr) + d2, the last two from gmean/gvar */
    double bb = 0.0, d = 0.0, b2 = 0.0, d2 = 0.0;
    if (train) {
        bb = -r * r * s1 / n;
        d = -sg / n - bb * delta;
        if (gmean) d2 += (double)gmean[c] / n;
        if (gvar) {
            double k = 2.0 * (double)gvar[c] / n;
            b2 += k;
            d2 -= k * delta;
        }
    }
    if (scale != 0.0) {
        A[c] = (T)scale;
        G[c] = (T)1;
        B[c] = (T)(bb + b2 / scale);
        D[c] = (T)(d + d2 / scale);
    } else { /* w == 0: only the gradients arriving at the statistics reach x */
        A[c] = (T)1;
        G[c] = (T)0;
        B[c] = (T)b2;
        D[c] = (T)d2;
    }
}

/* Channel c's backward coefficients from its sums: sum(g), sum(g (x - ctr)) and, when the
 * statistics are recomputed from x, sum(x - ctr) and sum((x - ctr)^2). */
static void SFX(bfinal)(int64_t c, double sg, double sgx, double sx, double sxx, double n,
                        int recompute, int train, T *rstd, const T *delta, const T *w,
                        const T *gmean, const T *gvar, T *dw, T *db, T *A, T *G, T *B, T *D,
                        double eps) {
    double dl = 0.0; /* true mean minus ctr */
    if (recompute) {
        double m1 = sx / n, var = sxx / n - m1 * m1;
        rstd[c] = (T)(1.0 / sqrt((var < 0 ? 0.0 : var) + eps));
        dl = m1;
    } else if (train && delta) {
        dl = (double)delta[c];
    }
    SFX(bcoef)(c, sg, sgx, n, rstd, w, dl, gmean, gvar, train, dw, db, A, G, B, D);
}

/* backward of channels [0, C) (see cmajor): each channel's sums, its coefficients, its dx */
static void SFX(bwd_cmajor)(const T *dy, const T *x, T *dx, int64_t N, int64_t C, int64_t S,
                            const T *ctr, const T *msc, const T *msh, int act, T slope,
                            int recompute, int train, T *rstd, const T *delta, const T *w,
                            const T *gmean, const T *gvar, T *dw, T *db, T *A, T *G, T *B, T *D,
                            double eps, int nt) {
    int stream = SFX(stream_ok)(N, C, S, 0);
    double n = (double)N * (double)S;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t c = 0; c < C; c++) {
        double o[4] = {0.0, 0.0, 0.0, 0.0};
        for (int64_t i = 0; i < N; i++)
            SFX(bred_plane)(dy + (i * C + c) * S, x + (i * C + c) * S, S, ctr[c], msc[c], msh[c],
                            act, slope, o, 1, recompute);
        SFX(bfinal)(c, o[0], o[1], o[2], o[3], n, recompute, train, rstd, delta, w, gmean, gvar,
                    dw, db, A, G, B, D, eps);
        if (dx) {
            for (int64_t i = 0; i < N; i++)
                SFX(bdx_plane)(dy + (i * C + c) * S, x + (i * C + c) * S, dx + (i * C + c) * S, S,
                               ctr[c], msc[c], msh[c], act, slope, A[c], G[c], B[c], D[c], stream);
        }
        stream_fence();
    }
}

/* Backward. Training (train=1) differentiates through the batch statistics; evaluation
 * (train=0) treats `mean` and `invstd` as constants. In training the statistics are either the
 * ones the forward returned (`mean` rounded to T, `invstd`, `delta` the rounding of the mean)
 * or, when `mean` is NULL, recomputed from x around the forward's pivots (the fused BN +
 * activation saves only x and the activation thresholds `thr`, NULL for the identity).
 * Returns 0, or -1 when its scratch memory could not be allocated (nothing written). */
static int SFX(backward)(const T *dy, const T *x, T *dx, int64_t N, int64_t C, int64_t S,
                          int nhwc, const T *mean, const T *invstd, const T *delta, const T *thr,
                          const T *w, const T *b, const T *gmean, const T *gvar, T *dw, T *db,
                          double eps, int act, T slope, int train, int nt) {
    nt = threads_for(N * C * S, nt);
    SFX(view) v = SFX(view_of)(N, C, S, nhwc);
    int64_t W = v.W;
    int64_t nrun = W || nhwc ? 0 : SFX(run_scratch)(C, S, nt);
    T *ctr = malloc((size_t)(8 * C + 7 * W + nrun) * sizeof(T));
    double *s = malloc((size_t)(8 * C + PART_DOUBLES(C, nt)) * sizeof(double));
    if (!ctr || !s) {
        free(ctr);
        free(s);
        return -1;
    }
    T *msc = ctr + C, *msh = ctr + 2 * C, *A = ctr + 3 * C, *B = ctr + 4 * C, *D = ctr + 5 * C;
    T *rstd = ctr + 6 * C, *G = ctr + 7 * C;
    double n = (double)N * (double)S;
    int recompute = train && !mean;
    /* the pivots (msc's slot, overwritten below) centre the recomputed sums and locate thr */
    if (recompute || (train && thr)) SFX(pivots)(x, N, C, S, nhwc, msc);
    for (int64_t c = 0; c < C; c++) {
        T piv = recompute || (train && thr) ? msc[c] : (T)0;
        ctr[c] = recompute ? piv : mean[c];
        if (!recompute) rstd[c] = invstd[c];
        if (train) {
            /* the mask: (x - ctr) sgn + (ctr - piv - thr) sgn = sgn (x - piv - thr) */
            double sgn = w ? (w[c] > 0 ? 1.0 : (w[c] < 0 ? -1.0 : 0.0)) : 1.0;
            if (sgn == 0.0) sgn = 1.0; /* w == 0: thr is +-inf, the mask a constant */
            msc[c] = (T)sgn;
            msh[c] = thr ? (T)(((double)ctr[c] - (double)piv - (double)thr[c]) * sgn) : (T)0;
        } else {
            msc[c] = (T)((w ? (double)w[c] : 1.0) * (double)invstd[c]);
            msh[c] = b ? b[c] : (T)0;
        }
    }
    /* the view's per-column coefficients (see view_of) */
    T *cw = ctr + 8 * C, *mscw = cw + W, *mshw = mscw + W, *Aw = mshw + W, *Gw = Aw + W;
    T *Bw = Gw + W, *Dw = Bw + W;
    double *part = s + 8 * C;
    int64_t to = v.R * W; /* offset of the tail rows */
    if (W) {
        SFX(expand)(v, ctr, cw, C);
        SFX(expand)(v, msc, mscw, C);
        SFX(expand)(v, msh, mshw, C);
        SFX(bred_pass)(dy, x, v.R, W, 1, 1, cw, mscw, mshw, act, slope, s, part, recompute,
                       SFX(view_map)(v, C), NULL, nt);
        if (v.tail) {
            SFX(bred_pass)(dy + to, x + to, v.tail, C, 1, 1, ctr, msc, msh, act, slope, s + 4 * C,
                           part, recompute, colmap_id(C), NULL, 1);
            for (int64_t c = 0; c < (recompute ? 4 : 2) * C; c++) s[c] += s[4 * C + c];
        }
    } else if (SFX(cmajor)(N, C, S, nhwc, nt)) {
        SFX(bwd_cmajor)(dy, x, dx, N, C, S, ctr, msc, msh, act, slope, recompute, train, rstd,
                        delta, w, gmean, gvar, dw, db, A, G, B, D, eps, nt);
        free(s);
        free(ctr);
        return 0;
    } else {
        T *run = nrun ? Dw + W : NULL;
        SFX(bred_pass)(dy, x, N, C, S, nhwc, ctr, msc, msh, act, slope, s, part, recompute,
                       colmap_id(C), run, nt);
    }
    for (int64_t c = 0; c < C; c++)
        SFX(bfinal)(c, s[c], s[C + c], recompute ? s[2 * C + c] : 0.0,
                    recompute ? s[3 * C + c] : 0.0, n, recompute, train, rstd, delta, w, gmean,
                    gvar, dw, db, A, G, B, D, eps);
    if (dx && W) {
        SFX(expand)(v, A, Aw, C);
        SFX(expand)(v, G, Gw, C);
        SFX(expand)(v, B, Bw, C);
        SFX(expand)(v, D, Dw, C);
        SFX(bdx_pass)(dy, x, dx, v.R, W, 1, 1, cw, mscw, mshw, act, slope, Aw, Gw, Bw, Dw, nt);
        if (v.tail)
            SFX(bdx_pass)(dy + to, x + to, dx + to, v.tail, C, 1, 1, ctr, msc, msh, act, slope, A,
                          G, B, D, 1);
    } else if (dx) {
        SFX(bdx_pass)(dy, x, dx, N, C, S, nhwc, ctr, msc, msh, act, slope, A, G, B, D, nt);
    }
    free(s);
    free(ctr);
    return 0;
}
