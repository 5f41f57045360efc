/* Drivers for one element type (see bn_impl.h): split the work into tasks, run them on an
 * OpenMP team of `nt` threads, turn the sums into per-channel coefficients.
 * Every driver runs without the GIL; it only touches the buffers it is given. */

/* Pivot per channel: the mean of the first few values, so (x - pivot) is small even under a
 * large common offset and the sum of squares keeps its digits. */
static void SFX(pivots)(const T *x, int64_t N, int64_t C, int64_t S, int nhwc, T *piv) {
    for (int64_t c = 0; c < C; c++) {
        double s = 0.0;
        int64_t k = 0;
        if (nhwc) {
            for (; k < N && k < 64; k++) s += x[k * C + c];
        } else {
            for (; k < S && k < 64; k++) s += x[c * S + k];
        }
        piv[c] = (T)(s / (double)(k ? k : 1));
    }
}

/* Mean, variance, invstd and the normalising coefficients of channel c from its sums. */
static void SFX(finalize)(int64_t c, double s1, double s2, double n, T piv, const T *w,
                          const T *b, double eps, T *mean_o, T *var_o, T *invstd_o, T *thr_o,
                          T *ctr, T *sc, T *sh) {
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
    ctr[c] = center;
    sc[c] = (T)scale;
    /* (mean - center) is the rounding of the mean to T: folded into the shift, so y stays exact
     * to T precision when |mean| >> std. */
    sh[c] = (T)((b ? (double)b[c] : 0.0) - (mean - (double)center) * (double)(T)scale);
    /* The activation's threshold: (x - ctr) sc + sh > 0 <=> sign(sc) (x - thr) > 0. It is all
     * backward needs to recompute the mask (the statistics are recomputed from x). */
    if (thr_o) {
        if (sc[c] != 0)
            thr_o[c] = (T)((double)center - (double)sh[c] / (double)sc[c]);
        else
            thr_o[c] = sh[c] > 0 ? -(T)INFINITY : (T)INFINITY;
    }
}

/* ------------------------------------------------------------------ passes over the tensor
 * Work is split into `nk` ranges of rows in memory order: NHWC rows of C values, or NCHW
 * planes of S values (plane p belongs to channel p % C). Each range accumulates into its own
 * per-channel doubles, summed afterwards in a fixed order (deterministic for a thread count). */
static int64_t SFX(rows_of)(int64_t N, int64_t C, int nhwc) { return nhwc ? N : N * C; }

/* s[c] = sum(x - piv[c]), s[C + c] = sum((x - piv[c])^2). */
static void SFX(stats_pass)(const T *x, int64_t N, int64_t C, int64_t S, int nhwc, const T *piv,
                            double *s, int nt) {
    int64_t rows = SFX(rows_of)(N, C, nhwc), nk = row_tasks(rows, nhwc, nt);
    double *part = calloc(2 * C * nk, sizeof(double));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < nk; t++) {
        int64_t r0 = rows * t / nk, r1 = rows * (t + 1) / nk;
        double *o = part + 2 * C * t;
        if (nhwc) {
            T *acc = malloc(2 * C * sizeof(T));
            SFX(sums_nhwc)(x, C, r0, r1, piv, o, o + C, acc, acc + C);
            free(acc);
        } else {
            for (int64_t p = r0; p < r1; p++)
                SFX(sums_plane)(x + p * S, S, piv[p % C], &o[p % C], &o[C + p % C]);
        }
    }
    for (int64_t k = 0; k < 2 * C; k++) s[k] = 0.0;
    for (int64_t t = 0; t < nk; t++)
        for (int64_t k = 0; k < 2 * C; k++) s[k] += part[2 * C * t + k];
    free(part);
}

static void SFX(apply_pass)(const T *x, T *y, int64_t N, int64_t C, int64_t S, int nhwc,
                            const T *ctr, const T *sc, const T *sh, int act, T slope, int nt) {
    int64_t rows = SFX(rows_of)(N, C, nhwc), nk = row_tasks(rows, nhwc, nt);
    int stream = streamed(N * C * S * (int64_t)sizeof(T));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < nk; t++) {
        int64_t r0 = rows * t / nk, r1 = rows * (t + 1) / nk;
        if (nhwc) {
            SFX(apply_nhwc)(x, y, C, r0, r1, ctr, sc, sh, act, slope, stream);
        } else {
            for (int64_t p = r0; p < r1; p++) {
                int64_t c = p % C;
                SFX(apply_plane)(x + p * S, y + p * S, S, ctr[c], sc[c], sh[c], act, slope,
                                 stream);
            }
        }
        stream_fence();
    }
}

/* s holds 4 * C doubles: sum(g), sum(g (x - ctr)), sum(x - ctr), sum((x - ctr)^2). */
static void SFX(bred_pass)(const T *dy, const T *x, int64_t N, int64_t C, int64_t S, int nhwc,
                           const T *ctr, const T *msc, const T *msh, int act, T slope, double *s,
                           int nt) {
    int64_t rows = SFX(rows_of)(N, C, nhwc), nk = row_tasks(rows, nhwc, nt);
    double *part = calloc(4 * C * nk, sizeof(double));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < nk; t++) {
        int64_t r0 = rows * t / nk, r1 = rows * (t + 1) / nk;
        double *o = part + 4 * C * t;
        if (nhwc) {
            T *acc = malloc(4 * C * sizeof(T));
            SFX(bred_nhwc)(dy, x, C, r0, r1, ctr, msc, msh, act, slope, o, acc, acc + C,
                           acc + 2 * C, acc + 3 * C);
            free(acc);
        } else {
            for (int64_t p = r0; p < r1; p++) {
                int64_t c = p % C;
                double o4[4] = {0.0, 0.0, 0.0, 0.0};
                SFX(bred_plane)(dy + p * S, x + p * S, S, ctr[c], msc[c], msh[c], act, slope, o4);
                for (int k = 0; k < 4; k++) o[k * C + c] += o4[k];
            }
        }
    }
    for (int64_t k = 0; k < 4 * C; k++) s[k] = 0.0;
    for (int64_t t = 0; t < nk; t++)
        for (int64_t k = 0; k < 4 * C; k++) s[k] += part[4 * C * t + k];
    free(part);
}

static void SFX(bdx_pass)(const T *dy, const T *x, T *dx, int64_t N, int64_t C, int64_t S,
                          int nhwc, const T *ctr, const T *msc, const T *msh, int act, T slope,
                          const T *A, const T *B, const T *D, int nt) {
    int64_t rows = SFX(rows_of)(N, C, nhwc), nk = row_tasks(rows, nhwc, nt);
    int stream = streamed(N * C * S * (int64_t)sizeof(T));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < nk; t++) {
        int64_t r0 = rows * t / nk, r1 = rows * (t + 1) / nk;
        if (nhwc) {
            SFX(bdx_nhwc)(dy, x, dx, C, r0, r1, ctr, msc, msh, act, slope, A, B, D, stream);
        } else {
            for (int64_t p = r0; p < r1; p++) {
                int64_t c = p % C;
                SFX(bdx_plane)(dy + p * S, x + p * S, dx + p * S, S, ctr[c], msc[c], msh[c], act,
                               slope, A[c], B[c], D[c], stream);
            }
        }
        stream_fence();
    }
}

/* ------------------------------------------------------------------ kernels */
static void SFX(train_fwd)(const T *x, T *y, int64_t N, int64_t C, int64_t S, int nhwc,
                           const T *w, const T *b, T *mean_o, T *var_o, T *invstd_o, T *thr_o,
                           double eps, int act, T slope, int nt) {
    T *piv = malloc(4 * C * sizeof(T));
    T *ctr = piv + C, *sc = piv + 2 * C, *sh = piv + 3 * C;
    double *s = malloc(2 * C * sizeof(double));
    double n = (double)N * (double)S;
    nt = threads_for(N * C * S, nt);
    SFX(pivots)(x, N, C, S, nhwc, piv);
    SFX(stats_pass)(x, N, C, S, nhwc, piv, s, nt);
    for (int64_t c = 0; c < C; c++)
        SFX(finalize)(c, s[c], s[C + c], n, piv[c], w, b, eps, mean_o, var_o, invstd_o, thr_o, ctr,
                      sc, sh);
    SFX(apply_pass)(x, y, N, C, S, nhwc, ctr, sc, sh, act, slope, nt);
    free(s);
    free(piv);
}

/* y = act((x - mean) * w * invstd + b) with given statistics (evaluation mode). */
static void SFX(eval_fwd)(const T *x, T *y, int64_t N, int64_t C, int64_t S, int nhwc,
                          const T *mean, const T *invstd, const T *w, const T *b, int act,
                          T slope, int nt) {
    T *sc = malloc(2 * C * sizeof(T));
    T *sh = sc + C;
    for (int64_t c = 0; c < C; c++) {
        sc[c] = (T)((w ? (double)w[c] : 1.0) * (double)invstd[c]);
        sh[c] = b ? b[c] : (T)0;
    }
    nt = threads_for(N * C * S, nt);
    SFX(apply_pass)(x, y, N, C, S, nhwc, mean, sc, sh, act, slope, nt);
    free(sc);
}

/* Per-channel dx = A g + B (x - ctr) + D and the parameter gradients, from the three sums
 * sum(g), sum(g (x - ctr)), sum(x - ctr). In training the statistics depend on x (the
 * centring and scaling terms, plus the gradients arriving at the mean and variance outputs). */
static void SFX(bcoef)(int64_t c, const double *o3, double n, const T *invstd, const T *w,
                       const T *gmean, const T *gvar, int train, T *dw, T *db, T *A, T *B,
                       T *D) {
    double sg = o3[0], sgx = o3[1], sx = o3[2];
    double r = invstd[c];
    double scale = (double)(T)((w ? (double)w[c] : 1.0) * r);
    double delta = train ? sx / n : 0.0; /* true mean minus the stored (rounded) mean */
    double s1 = sgx - delta * sg;        /* sum(g (x - mean)) */
    if (dw) dw[c] = (T)(r * s1);
    if (db) db[c] = (T)sg;
    double a = scale, bb = 0.0, d = 0.0;
    if (train) {
        bb = -scale * r * r * s1 / n;
        d = -scale * sg / n - bb * delta;
        if (gmean) d += (double)gmean[c] / n;
        if (gvar) {
            double k = 2.0 * (double)gvar[c] / n;
            bb += k;
            d -= k * delta;
        }
    }
    A[c] = (T)a;
    B[c] = (T)bb;
    D[c] = (T)d;
}

/* Training (train=1): the statistics are recomputed from x around the same pivots as the
 * forward (mean and invstd are not read), the activation mask comes from the thresholds `thr`
 * (NULL for the identity). Evaluation (train=0): `mean` and `invstd` are the fixed statistics. */
static void SFX(backward)(const T *dy, const T *x, T *dx, int64_t N, int64_t C, int64_t S,
                          int nhwc, const T *mean, const T *invstd, const T *thr, const T *w,
                          const T *b, const T *gmean, const T *gvar, T *dw, T *db, double eps,
                          int act, T slope, int train, int nt) {
    T *ctr = malloc(7 * C * sizeof(T));
    T *msc = ctr + C, *msh = ctr + 2 * C, *A = ctr + 3 * C, *B = ctr + 4 * C, *D = ctr + 5 * C;
    T *rstd = ctr + 6 * C;
    double *s = malloc(4 * C * sizeof(double));
    double n = (double)N * (double)S;
    if (train) SFX(pivots)(x, N, C, S, nhwc, ctr);
    for (int64_t c = 0; c < C; c++) {
        if (train) {
            double sgn = w ? (w[c] > 0 ? 1.0 : (w[c] < 0 ? -1.0 : 0.0)) : 1.0;
            if (sgn == 0.0) sgn = 1.0; /* w == 0: thr is +-inf, the mask a constant */
            msc[c] = (T)sgn;
            msh[c] = thr ? (T)(((double)ctr[c] - (double)thr[c]) * sgn) : (T)0;
        } else {
            ctr[c] = mean[c];
            rstd[c] = invstd[c];
            msc[c] = (T)((w ? (double)w[c] : 1.0) * (double)invstd[c]);
            msh[c] = b ? b[c] : (T)0;
        }
    }
    nt = threads_for(N * C * S, nt);
    SFX(bred_pass)(dy, x, N, C, S, nhwc, ctr, msc, msh, act, slope, s, nt);
    for (int64_t c = 0; c < C; c++) {
        if (train) {
            double m1 = s[2 * C + c] / n, var = s[3 * C + c] / n - m1 * m1;
            rstd[c] = (T)(1.0 / sqrt((var < 0 ? 0.0 : var) + eps));
        }
        double o3[3] = {s[c], s[C + c], s[2 * C + c]};
        SFX(bcoef)(c, o3, n, rstd, w, gmean, gvar, train, dw, db, A, B, D);
    }
    if (dx) SFX(bdx_pass)(dy, x, dx, N, C, S, nhwc, ctr, msc, msh, act, slope, A, B, D, nt);
    free(s);
    free(ctr);
}
