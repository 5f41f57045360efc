/* Masked batch norm (bnlab.MaskedBatchNorm1d, padded sequences) for one element type and
 * instruction set; included by bn_instance.h after bn_impl.h (its vectors, VL, BLOCK).
 *
 * x is (N, C, L) in one of two layouts: NCL (x[n][c][l], torch's) or rows (x[n][l][c], the
 * (N, L, C) layout of transformers, seen as (N, C, L) through a transpose). The mask m[n][l]
 * is one byte per position, nonzero where the position is valid. A padded value never enters
 * a sum or an output: NCL lanes are selected with bit masks (`& lane mask`, not a multiply,
 * so NaN/Inf padding cannot leak), padded rows are skipped. Outputs at padded positions are
 * exactly 0.
 *
 * Sums are of (x - pivot), the pivot being the channel's value at the first valid position,
 * taken in T lanes over blocks of at most BLOCK values (NCL) or ROWBLOCK rows (rows) and
 * flushed into double, as the unmasked kernels do: one pass gives the mean and the variance,
 * and a large common offset does not cancel. Row sums run in a number of tasks fixed by the
 * size (not by the thread count) and are added in task order: the same result on any number of
 * threads. */

static inline SFX(ivec) SFX(iload)(const ivec_t *p) {
    SFX(ivec) v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void SFX(vstore)(T *p, SFX(vec) v) { memcpy(p, &v, sizeof v); }

/* The NCL lane masks: lm[n L + l] = -1 (all bits) where valid, else 0; the number of valid
 * positions of each sample, vn[n]; and vn[N + n] = vn[n] when they are a prefix of the sample
 * (a mask made from lengths), else -1. A prefix sample runs without masks: its first vn[n]
 * values unmasked, the rest of its output zero-filled, its padding never read; only other
 * samples' lane masks are written. Returns the number of valid positions. */
static int64_t SFX(mask_lanes)(const uint8_t *restrict m, int64_t N, int64_t L,
                               ivec_t *restrict lm, int64_t *restrict vn) {
    int64_t total = 0;
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *restrict r = m + n * L;
        int64_t k = 0, head = 0;
        for (int64_t l = 0; l < L; l++) k += r[l] != 0;
        for (int64_t l = 0; l < k; l++) head += r[l] != 0; /* a prefix: the first k all valid */
        vn[n] = k;
        vn[N + n] = head == k ? k : -1;
        total += k;
        if (head != k) /* only these rows read their lane masks */
            for (int64_t l = 0; l < L; l++) lm[n * L + l] = -(ivec_t)(r[l] != 0);
    }
    return total;
}

/* index of the first valid position (n L + l), -1 if none */
static int64_t SFX(first_valid)(const uint8_t *restrict m, int64_t NL) {
    for (int64_t i = 0; i < NL; i++)
        if (m[i]) return i;
    return -1;
}

/* rows tasks: a count fixed by the size, so that sums do not depend on the thread count */
static inline int64_t SFX(mrow_tasks)(int64_t R) {
    int64_t k = R / (4 * ROWBLOCK);
    return k < 1 ? 1 : k > 64 ? 64 : k;
}

/* sum(e) and sum(e^2), e = (p[i] - piv) & q[i], over one plane of L values (NCL) */
static void SFX(msums_plane)(const T *restrict p, const ivec_t *restrict q, int64_t L, T piv,
                             double *o1, double *o2) {
    SFX(vec) zero = {0}, pv = zero + piv;
    double d1 = 0.0, d2 = 0.0;
    int64_t i = 0;
    while (L - i >= VL) {
        int64_t end = i + (L - i < BLOCK ? L - i : BLOCK) / VL * VL, k = i;
        SFX(vec) a0 = zero, a1 = zero, s0 = zero, s1 = zero;
        for (; k + 2 * VL <= end; k += 2 * VL) {
            SFX(vec) e0 = (SFX(vec))((SFX(ivec))(SFX(vload)(p + k) - pv) & SFX(iload)(q + k));
            SFX(vec) e1 = (SFX(vec))((SFX(ivec))(SFX(vload)(p + k + VL) - pv) &
                                     SFX(iload)(q + k + VL));
            a0 += e0;
            a1 += e1;
            s0 += e0 * e0;
            s1 += e1 * e1;
        }
        for (; k < end; k += VL) {
            SFX(vec) e = (SFX(vec))((SFX(ivec))(SFX(vload)(p + k) - pv) & SFX(iload)(q + k));
            a0 += e;
            s0 += e * e;
        }
        d1 += SFX(vsum)(a0 + a1);
        d2 += SFX(vsum)(s0 + s1);
        i = end;
    }
    for (; i < L; i++) {
        if (!q[i]) continue;
        double d = (double)(p[i] - piv);
        d1 += d;
        d2 += d * d;
    }
    *o1 += d1;
    *o2 += d2;
}

/* sum(g) and sum(g (x - ctr)) over the valid values of one NCL plane (g = dy) */
static void SFX(mgrad_plane)(const T *restrict g, const T *restrict p, const ivec_t *restrict q,
                             int64_t L, T ctr, double *o1, double *o2) {
    SFX(vec) zero = {0}, cv = zero + ctr;
    double d1 = 0.0, d2 = 0.0;
    int64_t i = 0;
    while (L - i >= VL) {
        int64_t end = i + (L - i < BLOCK ? L - i : BLOCK) / VL * VL, k = i;
        SFX(vec) a0 = zero, a1 = zero, s0 = zero, s1 = zero;
        for (; k + 2 * VL <= end; k += 2 * VL) {
            SFX(ivec) m0 = SFX(iload)(q + k), m1 = SFX(iload)(q + k + VL);
            SFX(vec) g0 = (SFX(vec))((SFX(ivec))SFX(vload)(g + k) & m0);
            SFX(vec) g1 = (SFX(vec))((SFX(ivec))SFX(vload)(g + k + VL) & m1);
            SFX(vec) e0 = (SFX(vec))((SFX(ivec))(SFX(vload)(p + k) - cv) & m0);
            SFX(vec) e1 = (SFX(vec))((SFX(ivec))(SFX(vload)(p + k + VL) - cv) & m1);
            a0 += g0;
            a1 += g1;
            s0 += g0 * e0;
            s1 += g1 * e1;
        }
        for (; k < end; k += VL) {
            SFX(ivec) m0 = SFX(iload)(q + k);
            SFX(vec) g0 = (SFX(vec))((SFX(ivec))SFX(vload)(g + k) & m0);
            SFX(vec) e0 = (SFX(vec))((SFX(ivec))(SFX(vload)(p + k) - cv) & m0);
            a0 += g0;
            s0 += g0 * e0;
        }
        d1 += SFX(vsum)(a0 + a1);
        d2 += SFX(vsum)(s0 + s1);
        i = end;
    }
    for (; i < L; i++) {
        if (!q[i]) continue;
        d1 += (double)g[i];
        d2 += (double)g[i] * (double)(p[i] - ctr);
    }
    *o1 += d1;
    *o2 += d2;
}

/* Per-channel coefficients of out = A (p - P) + B (q - Q) + D at valid positions (q may be
 * absent): centring before scaling keeps float32 outputs precise under a large common offset
 * (A x alone would be ~1e6 for x ~ 1e4 and std 1e-2, whose float32 ulp is 0.06). */
typedef struct {
    T A, P, B, Q, D;
} SFX(mcoef);

/* o = (A (p - P) + B (q - Q) + D) & lane mask over one NCL plane: the normalised output
 * (q = NULL) or the input gradient (p = dy, q = x). With pre >= 0 (the valid positions are the
 * plane's first pre): unmasked there and zero after. */
static void SFX(maffine_plane)(const T *restrict p, const T *restrict q, const ivec_t *restrict lm,
                               T *restrict o, int64_t L, int64_t pre, SFX(mcoef) k) {
    SFX(vec) zero = {0}, av = zero + k.A, pv = zero + k.P, bv = zero + k.B, qv = zero + k.Q;
    SFX(vec) dv = zero + k.D;
    int64_t i = 0;
    if (pre >= 0) {
        for (; i + VL <= pre; i += VL) {
            SFX(vec) v = (SFX(vload)(p + i) - pv) * av + dv;
            if (q) v += (SFX(vload)(q + i) - qv) * bv;
            SFX(vstore)(o + i, v);
        }
        for (; i < pre; i++) {
            T v = (p[i] - k.P) * k.A + k.D;
            o[i] = q ? v + (q[i] - k.Q) * k.B : v;
        }
        memset(o + pre, 0, (size_t)(L - pre) * sizeof(T));
        return;
    }
    for (; i + VL <= L; i += VL) {
        SFX(vec) v = (SFX(vload)(p + i) - pv) * av + dv;
        if (q) v += (SFX(vload)(q + i) - qv) * bv;
        SFX(vstore)(o + i, (SFX(vec))((SFX(ivec))v & SFX(iload)(lm + i)));
    }
    for (; i < L; i++) {
        T v = (p[i] - k.P) * k.A + k.D;
        if (q) v += (q[i] - k.Q) * k.B;
        o[i] = lm[i] ? v : (T)0;
    }
}

/* One NCL plane of sample n: unmasked over its first `pre` values when its valid positions
 * are that prefix (pre >= 0; bn_impl.h's sums_plane for the moments), else through the lane
 * masks. */
static inline void SFX(msums_row)(const T *p, const ivec_t *q, int64_t L, int64_t pre, T piv,
                                  double *o1, double *o2) {
    if (pre >= 0)
        SFX(sums_plane)(p, pre, piv, o1, o2);
    else
        SFX(msums_plane)(p, q, L, piv, o1, o2);
}

static void SFX(mgrad_prefix)(const T *restrict g, const T *restrict p, int64_t L, T ctr,
                              double *o1, double *o2) {
    SFX(vec) zero = {0}, cv = zero + ctr;
    double d1 = 0.0, d2 = 0.0;
    int64_t i = 0;
    while (L - i >= VL) {
        int64_t end = i + (L - i < BLOCK ? L - i : BLOCK) / VL * VL, k = i;
        SFX(vec) a0 = zero, a1 = zero, s0 = zero, s1 = zero;
        for (; k + 2 * VL <= end; k += 2 * VL) {
            SFX(vec) g0 = SFX(vload)(g + k), g1 = SFX(vload)(g + k + VL);
            a0 += g0;
            a1 += g1;
            s0 += g0 * (SFX(vload)(p + k) - cv);
            s1 += g1 * (SFX(vload)(p + k + VL) - cv);
        }
        for (; k < end; k += VL) {
            SFX(vec) g0 = SFX(vload)(g + k);
            a0 += g0;
            s0 += g0 * (SFX(vload)(p + k) - cv);
        }
        d1 += SFX(vsum)(a0 + a1);
        d2 += SFX(vsum)(s0 + s1);
        i = end;
    }
    for (; i < L; i++) {
        d1 += (double)g[i];
        d2 += (double)g[i] * (double)(p[i] - ctr);
    }
    *o1 += d1;
    *o2 += d2;
}

static inline void SFX(mgrad_row)(const T *g, const T *p, const ivec_t *q, int64_t L,
                                  int64_t pre, T ctr, double *o1, double *o2) {
    if (pre >= 0)
        SFX(mgrad_prefix)(g, p, pre, ctr, o1, o2);
    else
        SFX(mgrad_plane)(g, p, q, L, ctr, o1, o2);
}

/* Row sums over tasks: for every valid row r, s1[c] += u_c and s2[c] += u_c v_c with
 * u = g[r] (or x[r] - piv when g is NULL) and v = x[r] - piv (piv a row of C values), in T
 * arrays flushed into double every ROWBLOCK rows. `part` holds 2 C doubles per task,
 * `acc` 2 C values of T per task. */
static void SFX(mrow_sums)(const T *restrict g, const T *restrict x, const uint8_t *restrict m,
                           int64_t R, int64_t C, const T *restrict piv, double *restrict part,
                           T *restrict acc, int64_t K, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t k = 0; k < K; k++) {
        int64_t r0 = R * k / K, r1 = R * (k + 1) / K, since = 0;
        double *p1 = part + 2 * C * k, *p2 = p1 + C;
        T *a1 = acc + 2 * C * k, *a2 = a1 + C;
        memset(p1, 0, (size_t)(2 * C) * sizeof(double));
        memset(a1, 0, (size_t)(2 * C) * sizeof(T));
        for (int64_t r = r0; r < r1; r++) {
            if (!m[r]) continue;
            const T *restrict xr = x + r * C;
            if (g) {
                const T *restrict gr = g + r * C;
                for (int64_t c = 0; c < C; c++) {
                    a1[c] += gr[c];
                    a2[c] += gr[c] * (xr[c] - piv[c]);
                }
            } else {
                for (int64_t c = 0; c < C; c++) {
                    T e = xr[c] - piv[c];
                    a1[c] += e;
                    a2[c] += e * e;
                }
            }
            if (++since == ROWBLOCK) {
                for (int64_t c = 0; c < C; c++) {
                    p1[c] += a1[c];
                    p2[c] += a2[c];
                    a1[c] = a2[c] = 0;
                }
                since = 0;
            }
        }
        if (since)
            for (int64_t c = 0; c < C; c++) {
                p1[c] += a1[c];
                p2[c] += a2[c];
            }
    }
    for (int64_t k = 1; k < K; k++)
        for (int64_t c = 0; c < 2 * C; c++) part[c] += part[2 * C * k + c];
}

/* The coefficients of the normalised output, y = (x - mean) / sqrt(var + eps) w + b, centred
 * at the stored mean mt; `mean` is the exact one (double), whose rounding to T the shift
 * carries (given statistics: mean = mt). */
static inline SFX(mcoef) SFX(mcoef_norm)(T mt, double mean, double var, double w, double b,
                                          double eps) {
    double a = w / sqrt(var + eps);
    SFX(mcoef) k = {(T)a, mt, (T)0, (T)0, (T)(b + ((double)mt - mean) * a)};
    return k;
}

/* The coefficients of the input gradient, dx = w invstd (dy - mdy - (x - mean) invstd^2 mdx),
 * mdy and mdx the means of dy and dy (x - mean) over the valid positions, centred at the
 * stored mean mt, the exact one being mt + delta */
static inline SFX(mcoef) SFX(mcoef_grad)(T mt, double delta, double invstd, double w,
                                          double mdy, double mdx) {
    double a = w * invstd, bb = -a * invstd * invstd * mdx;
    SFX(mcoef) k = {(T)a, (T)0, (T)bb, mt, (T)(-a * mdy - bb * delta)};
    return k;
}

/* the affine map over channel c's N planes (NCL; vn: see mask_lanes) */
static void SFX(mchannel_affine)(const T *p, const T *q, const ivec_t *lm, const int64_t *vn,
                                 T *out, int64_t N, int64_t C, int64_t L, int64_t c,
                                 SFX(mcoef) k) {
    for (int64_t n = 0; n < N; n++) {
        const int64_t off = (n * C + c) * L;
        SFX(maffine_plane)(p + off, q ? q + off : NULL, lm + n * L, out + off, L, vn[N + n], k);
    }
}

/* the affine map over rows of C channels (coefficients k[c]), 0 in padded rows */
static void SFX(mrows_affine)(const T *p, const T *q, const uint8_t *m, T *out, int64_t R,
                              int64_t C, const SFX(mcoef) *k, T *scratch, int nt) {
    T *A = scratch, *P = A + C, *B = P + C, *Q = B + C, *D = Q + C;
    for (int64_t c = 0; c < C; c++) {
        A[c] = k[c].A;
        P[c] = k[c].P;
        B[c] = k[c].B;
        Q[c] = k[c].Q;
        D[c] = k[c].D;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        T *restrict o = out + r * C;
        if (!m[r]) {
            memset(o, 0, (size_t)C * sizeof(T));
            continue;
        }
        const T *restrict pr = p + r * C;
        if (q) {
            const T *restrict qr = q + r * C;
            for (int64_t c = 0; c < C; c++)
                o[c] = (pr[c] - P[c]) * A[c] + (qr[c] - Q[c]) * B[c] + D[c];
        } else {
            for (int64_t c = 0; c < C; c++) o[c] = (pr[c] - P[c]) * A[c] + D[c];
        }
    }
}

/* NCL scratch: lane masks (N L), valid counts and prefix lengths per sample (2 N, see
 * mask_lanes); NULL when memory is short */
static ivec_t *SFX(mlanes_new)(const uint8_t *m, int64_t N, int64_t L, int64_t **vn) {
    ivec_t *lm = malloc((size_t)(N * L) * sizeof(ivec_t));
    *vn = malloc((size_t)(2 * N) * sizeof(int64_t));
    if (!lm || !*vn) {
        free(lm);
        free(*vn);
        return NULL;
    }
    SFX(mask_lanes)(m, N, L, lm, *vn);
    return lm;
}

/* Row layout: the per-channel sums of the valid rows into o1/o2 (C doubles each): of
 * (x - piv) and (x - piv)^2 (g NULL) or of g and g (x - piv). -1 when memory is short. */
static int SFX(mrows_reduce)(const T *g, const T *x, const uint8_t *m, int64_t R, int64_t C,
                             const T *piv, double *o1, double *o2, int nt) {
    const int64_t K = SFX(mrow_tasks)(R);
    double *part = malloc((size_t)(2 * C * K) * sizeof(double));
    T *acc = malloc((size_t)(2 * C * K) * sizeof(T));
    if (!part || !acc) {
        free(part);
        free(acc);
        return -1;
    }
    SFX(mrow_sums)(g, x, m, R, C, piv, part, acc, K, nt);
    memcpy(o1, part, (size_t)C * sizeof(double));
    memcpy(o2, part + C, (size_t)C * sizeof(double));
    free(part);
    free(acc);
    return 0;
}

/* Training forward: per-channel mean and biased variance of the valid positions (0 and 0
 * without any), delta = the exact mean - its value rounded to T, and, when y is not NULL,
 * y = (x - mean) / sqrt(var + eps) w + b there (0 at padded positions). NCL runs channel by
 * channel: a channel's planes are read once from memory for the sums and again, from cache
 * when they fit, for the output. */
static int SFX(masked_forward)(const T *x, const uint8_t *m, T *y, int64_t N, int64_t C,
                               int64_t L, int rows, const T *w, const T *b, double eps, T *mean,
                               T *var, T *delta, int nt) {
    nt = threads_for(N * C * L, nt);
    const int64_t first = SFX(first_valid)(m, N * L);
    int64_t count = 0;
    for (int64_t i = 0; i < N * L; i++) count += m[i] != 0;
    if (rows) {
        SFX(mcoef) *k = malloc((size_t)C * sizeof(SFX(mcoef)));
        T *scratch = malloc((size_t)(5 * C) * sizeof(T));
        double *o = malloc((size_t)(2 * C) * sizeof(double));
        int rc = k && scratch && o ? 0 : -1;
        if (rc == 0 && first >= 0)
            rc = SFX(mrows_reduce)(NULL, x, m, N * L, C, x + first * C, o, o + C, nt);
        if (rc == 0) {
            for (int64_t c = 0; c < C; c++) {
                double piv = first >= 0 ? (double)x[first * C + c] : 0.0;
                double d = count ? o[c] / (double)count : 0.0;
                double v = count ? o[C + c] / (double)count - d * d : 0.0;
                v = v > 0 ? v : 0;
                mean[c] = (T)(piv + d);
                var[c] = (T)v;
                delta[c] = (T)(piv + d - (double)mean[c]);
                k[c] = SFX(mcoef_norm)(mean[c], piv + d, v, w ? (double)w[c] : 1.0,
                                       b ? (double)b[c] : 0.0, eps);
            }
            if (y) SFX(mrows_affine)(x, NULL, m, y, N * L, C, k, scratch, nt);
        }
        free(k);
        free(scratch);
        free(o);
        return rc;
    }
    int64_t *vn;
    ivec_t *lm = SFX(mlanes_new)(m, N, L, &vn);
    if (!lm) return -1;
    const int64_t n0 = first < 0 ? 0 : first / L, l0 = first < 0 ? 0 : first % L;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t c = 0; c < C; c++) {
        double s1 = 0.0, s2 = 0.0, piv = 0.0;
        if (first >= 0) {
            T pv = x[(n0 * C + c) * L + l0];
            piv = (double)pv;
            for (int64_t n = 0; n < N; n++)
                if (vn[n])
                    SFX(msums_row)(x + (n * C + c) * L, lm + n * L, L, vn[N + n], pv, &s1, &s2);
        }
        double d = count ? s1 / (double)count : 0.0;
        double v = count ? s2 / (double)count - d * d : 0.0;
        v = v > 0 ? v : 0;
        mean[c] = (T)(piv + d);
        var[c] = (T)v;
        delta[c] = (T)(piv + d - (double)mean[c]);
        if (y) {
            SFX(mcoef) k = SFX(mcoef_norm)(mean[c], piv + d, v, w ? (double)w[c] : 1.0,
                                           b ? (double)b[c] : 0.0, eps);
            SFX(mchannel_affine)(x, NULL, lm, vn, y, N, C, L, c, k);
        }
    }
    free(lm);
    free(vn);
    return 0;
}

/* Training backward: per-channel sdy = sum(g) and sdx = sum(g (x - mean)) over the valid
 * positions (mean + delta the exact mean, delta NULL: 0) and, when dx is not NULL, the input
 * gradient from this batch's statistics (the
 * local layer; synchronised statistics all-reduce the sums first and call masked_affine).
 * NCL runs channel by channel, as the forward. */
static int SFX(masked_backward)(const T *g, const T *x, const uint8_t *m, T *dx, int64_t N,
                                int64_t C, int64_t L, int rows, const T *mean, const T *delta,
                                const T *invstd, const T *w, T *sdy, T *sdx, int nt) {
    nt = threads_for(N * C * L, nt);
    int64_t count = 0;
    for (int64_t i = 0; i < N * L; i++) count += m[i] != 0;
    const double cn = count ? (double)count : 1.0;
    if (rows) {
        SFX(mcoef) *k = malloc((size_t)C * sizeof(SFX(mcoef)));
        T *scratch = malloc((size_t)(5 * C) * sizeof(T));
        double *o = malloc((size_t)(2 * C) * sizeof(double));
        int rc = k && scratch && o ? SFX(mrows_reduce)(g, x, m, N * L, C, mean, o, o + C, nt) : -1;
        if (rc == 0) {
            for (int64_t c = 0; c < C; c++) {
                double dl = delta ? (double)delta[c] : 0.0, s2 = o[C + c] - dl * o[c];
                sdy[c] = (T)o[c];
                sdx[c] = (T)s2;
                k[c] = SFX(mcoef_grad)(mean[c], dl, invstd[c], w ? (double)w[c] : 1.0,
                                       o[c] / cn, s2 / cn);
            }
            if (dx) SFX(mrows_affine)(g, x, m, dx, N * L, C, k, scratch, nt);
        }
        free(k);
        free(scratch);
        free(o);
        return rc;
    }
    int64_t *vn;
    ivec_t *lm = SFX(mlanes_new)(m, N, L, &vn);
    if (!lm) return -1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t c = 0; c < C; c++) {
        double s1 = 0.0, s2 = 0.0;
        for (int64_t n = 0; n < N; n++) {
            const int64_t off = (n * C + c) * L;
            if (vn[n])
                SFX(mgrad_row)(g + off, x + off, lm + n * L, L, vn[N + n], mean[c], &s1, &s2);
        }
        const double dl = delta ? (double)delta[c] : 0.0;
        s2 -= dl * s1; /* the sums were centred at the stored mean, not the exact one */
        sdy[c] = (T)s1;
        sdx[c] = (T)s2;
        if (dx) {
            SFX(mcoef) k = SFX(mcoef_grad)(mean[c], dl, invstd[c], w ? (double)w[c] : 1.0,
                                           s1 / cn, s2 / cn);
            SFX(mchannel_affine)(g, x, lm, vn, dx, N, C, L, c, k);
        }
    }
    free(lm);
    free(vn);
    return 0;
}

/* The affine map with given statistics: y = (x - mean) / sqrt(var + eps) w + b (g NULL; the
 * evaluation forward and the synchronised one), or, with g (= dy), dx = w invstd (g - mdy -
 * (x - mean) invstd^2 mdx) (var holding invstd; the synchronised backward). 0 at padded
 * positions. The exact mean is mean + delta (delta NULL: 0), as in masked_forward's output. */
static int SFX(masked_affine)(const T *g, const T *x, const uint8_t *m, T *out, int64_t N,
                              int64_t C, int64_t L, int rows, const T *mean, const T *delta,
                              const T *var, const T *w, const T *b, const T *mdy, const T *mdx,
                              double eps, int nt) {
    nt = threads_for(N * C * L, nt);
    SFX(mcoef) *k = malloc((size_t)C * sizeof(SFX(mcoef)));
    T *scratch = malloc((size_t)(5 * C) * sizeof(T));
    int rc = k && scratch ? 0 : -1;
    for (int64_t c = 0; c < C && rc == 0; c++) {
        double wc = w ? (double)w[c] : 1.0, dl = delta ? (double)delta[c] : 0.0;
        if (g)
            k[c] = SFX(mcoef_grad)(mean[c], dl, var[c], wc, mdy[c], mdx[c]);
        else
            k[c] = SFX(mcoef_norm)(mean[c], (double)mean[c] + dl, var[c], wc,
                                   b ? (double)b[c] : 0.0, eps);
    }
    const T *p = g ? g : x, *q = g ? x : NULL;
    if (rc == 0 && rows) {
        SFX(mrows_affine)(p, q, m, out, N * L, C, k, scratch, nt);
    } else if (rc == 0) {
        int64_t *vn;
        ivec_t *lm = SFX(mlanes_new)(m, N, L, &vn);
        if (!lm) {
            rc = -1;
        } else {
#pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t i = 0; i < N * C; i++) {
                int64_t n = i / C, c = i % C;
                SFX(maffine_plane)(p + i * L, q ? q + i * L : NULL, lm + n * L, out + i * L, L,
                                   vn[N + n], k[c]);
            }
            free(lm);
            free(vn);
        }
    }
    free(k);
    free(scratch);
    return rc;
}
