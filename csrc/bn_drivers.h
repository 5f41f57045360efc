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
                          const T *b, double eps, T *mean_o, T *var_o, T *invstd_o, T *ctr,
                          T *sc, T *sh) {
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
}

static void SFX(train_fwd)(const T *x, T *y, int64_t N, int64_t C, int64_t S, int nhwc,
                           const T *w, const T *b, T *mean_o, T *var_o, T *invstd_o, double eps,
                           int act, T slope, int nt) {
    T *piv = malloc(4 * C * sizeof(T));
    T *ctr = piv + C, *sc = piv + 2 * C, *sh = piv + 3 * C;
    SFX(pivots)(x, N, C, S, nhwc, piv);
    double n = (double)N * (double)S;
    nt = threads_for(N * C * S, nt);
    if (!nhwc) {
        int64_t ns = nchw_split(N, C, nt);
        if (ns == 1) {
            /* one task per channel: its values are still in cache when they are normalised */
#pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t c = 0; c < C; c++) {
                double s1 = 0.0, s2 = 0.0;
                SFX(sums_nchw)(x, C, S, c, 0, N, piv[c], &s1, &s2);
                SFX(finalize)(c, s1, s2, n, piv[c], w, b, eps, mean_o, var_o, invstd_o, ctr, sc,
                              sh);
                SFX(apply_nchw)(x, y, C, S, c, 0, N, ctr[c], sc[c], sh[c], act, slope);
            }
        } else {
            double *part = calloc(2 * C * ns, sizeof(double));
#pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t t = 0; t < C * ns; t++) {
                int64_t c = t / ns, j = t % ns;
                SFX(sums_nchw)(x, C, S, c, N * j / ns, N * (j + 1) / ns, piv[c], &part[2 * t],
                               &part[2 * t + 1]);
            }
            for (int64_t c = 0; c < C; c++) {
                double s1 = 0.0, s2 = 0.0;
                for (int64_t j = 0; j < ns; j++) {
                    s1 += part[2 * (c * ns + j)];
                    s2 += part[2 * (c * ns + j) + 1];
                }
                SFX(finalize)(c, s1, s2, n, piv[c], w, b, eps, mean_o, var_o, invstd_o, ctr, sc,
                              sh);
            }
            free(part);
#pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t t = 0; t < C * ns; t++) {
                int64_t c = t / ns, j = t % ns;
                SFX(apply_nchw)(x, y, C, S, c, N * j / ns, N * (j + 1) / ns, ctr[c], sc[c], sh[c],
                                act, slope);
            }
        }
    } else {
        int64_t M = N, nk = row_tasks(M, nt);
        double *part = calloc(2 * C * nk, sizeof(double));
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t t = 0; t < nk; t++) {
            T *acc = malloc(2 * C * sizeof(T));
            SFX(sums_nhwc)(x, C, M * t / nk, M * (t + 1) / nk, piv, part + 2 * C * t,
                           part + 2 * C * t + C, acc, acc + C);
            free(acc);
        }
        for (int64_t c = 0; c < C; c++) {
            double s1 = 0.0, s2 = 0.0;
            for (int64_t t = 0; t < nk; t++) {
                s1 += part[2 * C * t + c];
                s2 += part[2 * C * t + C + c];
            }
            SFX(finalize)(c, s1, s2, n, piv[c], w, b, eps, mean_o, var_o, invstd_o, ctr, sc, sh);
        }
        free(part);
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t t = 0; t < nk; t++)
            SFX(apply_nhwc)(x, y, C, M * t / nk, M * (t + 1) / nk, ctr, sc, sh, act, slope);
    }
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
    if (!nhwc) {
        int64_t ns = nchw_split(N, C, nt);
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t t = 0; t < C * ns; t++) {
            int64_t c = t / ns, j = t % ns;
            SFX(apply_nchw)(x, y, C, S, c, N * j / ns, N * (j + 1) / ns, mean[c], sc[c], sh[c],
                            act, slope);
        }
    } else {
        int64_t nk = row_tasks(N, nt);
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t t = 0; t < nk; t++)
            SFX(apply_nhwc)(x, y, C, N * t / nk, N * (t + 1) / nk, mean, sc, sh, act, slope);
    }
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

/* s[c] = sum(x - ctr[c]) and s[C + c] = sum((x - ctr[c])^2), over the whole tensor. */
static void SFX(sums_nhwc_or_nchw)(const T *x, int64_t N, int64_t C, int64_t S, int nhwc,
                                   const T *ctr, double *s, int nt) {
    if (!nhwc) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t c = 0; c < C; c++) SFX(sums_nchw)(x, C, S, c, 0, N, ctr[c], &s[c], &s[C + c]);
        return;
    }
    int64_t nk = row_tasks(N, nt);
    double *part = calloc(2 * C * nk, sizeof(double));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < nk; t++) {
        T *acc = malloc(2 * C * sizeof(T));
        SFX(sums_nhwc)(x, C, N * t / nk, N * (t + 1) / nk, ctr, part + 2 * C * t,
                       part + 2 * C * t + C, acc, acc + C);
        free(acc);
    }
    for (int64_t t = 0; t < nk; t++)
        for (int64_t k = 0; k < 2 * C; k++) s[k] += part[2 * C * t + k];
    free(part);
}

static void SFX(backward)(const T *dy, const T *x, T *dx, int64_t N, int64_t C, int64_t S,
                          int nhwc, const T *mean, const T *invstd, const T *w, const T *b,
                          const T *gmean, const T *gvar, T *dw, T *db, int act, T slope,
                          int train, int nt) {
    T *msc = malloc(5 * C * sizeof(T));
    T *msh = msc + C, *A = msc + 2 * C, *B = msc + 3 * C, *D = msc + 4 * C;
    double n = (double)N * (double)S;
    int prepass = 0;
    for (int64_t c = 0; c < C; c++) {
        msc[c] = (T)((w ? (double)w[c] : 1.0) * (double)invstd[c]);
        msh[c] = b ? b[c] : (T)0;
        /* The activation mask needs the forward's shift, which folded in the rounding of the
         * mean; recompute it only when that rounding is visible (|mean| >> std). */
        if (train && act != ACT_ID && fabs((double)mean[c]) * T_EPS * (double)invstd[c] > 1e-5)
            prepass = 1;
    }
    nt = threads_for(N * C * S, nt);
    if (prepass) {
        double *s = calloc(2 * C, sizeof(double));
        SFX(sums_nhwc_or_nchw)(x, N, C, S, nhwc, mean, s, nt);
        for (int64_t c = 0; c < C; c++)
            msh[c] = (T)((double)msh[c] - (s[c] / n) * (double)msc[c]);
        free(s);
    }
    if (!nhwc) {
        int64_t ns = nchw_split(N, C, nt);
        double *part = calloc(3 * C * ns, sizeof(double));
        if (ns == 1) {
#pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t c = 0; c < C; c++) {
                SFX(bred_nchw)(dy, x, C, S, c, 0, N, mean[c], msc[c], msh[c], act, slope,
                               part + 3 * c);
                SFX(bcoef)(c, part + 3 * c, n, invstd, w, gmean, gvar, train, dw, db, A, B, D);
                if (dx)
                    SFX(bdx_nchw)(dy, x, dx, C, S, c, 0, N, mean[c], msc[c], msh[c], act, slope,
                                  A[c], B[c], D[c]);
            }
        } else {
#pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t t = 0; t < C * ns; t++) {
                int64_t c = t / ns, j = t % ns;
                SFX(bred_nchw)(dy, x, C, S, c, N * j / ns, N * (j + 1) / ns, mean[c], msc[c],
                               msh[c], act, slope, part + 3 * t);
            }
            for (int64_t c = 0; c < C; c++) {
                double o3[3] = {0.0, 0.0, 0.0};
                for (int64_t j = 0; j < ns; j++)
                    for (int k = 0; k < 3; k++) o3[k] += part[3 * (c * ns + j) + k];
                SFX(bcoef)(c, o3, n, invstd, w, gmean, gvar, train, dw, db, A, B, D);
            }
            if (dx) {
#pragma omp parallel for num_threads(nt) schedule(static)
                for (int64_t t = 0; t < C * ns; t++) {
                    int64_t c = t / ns, j = t % ns;
                    SFX(bdx_nchw)(dy, x, dx, C, S, c, N * j / ns, N * (j + 1) / ns, mean[c],
                                  msc[c], msh[c], act, slope, A[c], B[c], D[c]);
                }
            }
        }
        free(part);
    } else {
        int64_t M = N, nk = row_tasks(M, nt);
        double *part = calloc(3 * C * nk, sizeof(double));
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t t = 0; t < nk; t++) {
            T *acc = malloc(3 * C * sizeof(T));
            SFX(bred_nhwc)(dy, x, C, M * t / nk, M * (t + 1) / nk, mean, msc, msh, act, slope,
                           part + 3 * C * t, acc, acc + C, acc + 2 * C);
            free(acc);
        }
        for (int64_t c = 0; c < C; c++) {
            double o3[3] = {0.0, 0.0, 0.0};
            for (int64_t t = 0; t < nk; t++)
                for (int k = 0; k < 3; k++) o3[k] += part[3 * C * t + k * C + c];
            SFX(bcoef)(c, o3, n, invstd, w, gmean, gvar, train, dw, db, A, B, D);
        }
        free(part);
        if (dx) {
#pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t t = 0; t < nk; t++)
                SFX(bdx_nhwc)(dy, x, dx, C, M * t / nk, M * (t + 1) / nk, mean, msc, msh, act,
                              slope, A, B, D);
        }
    }
    free(msc);
}
