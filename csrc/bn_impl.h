/* Batch-norm kernels for one element type. Included twice by bnlab_kernels.c, with
 * T = float / SFX(name) = name##_f32 and T = double / SFX(name) = name##_f64.
 *
 * Layouts: NCHW is x[n][c][s] (channel c owns N contiguous segments of S values);
 * NHWC is x[m][c] (channels innermost, M rows). Sums are taken of (x - pivot) in T lanes over
 * short blocks and flushed into double, so long channels and large common offsets keep
 * their precision (a float lane never holds more than BLOCK / LANES terms).
 */

/* ------------------------------------------------------------------ activation */
static inline T SFX(act_fwd)(T v, int act, T slope) {
    if (act == ACT_RELU) return v > (T)0 ? v : (T)0;
    if (act == ACT_LEAKY) return v > (T)0 ? v : v * slope;
    return v;
}

/* derivative factor of the activation at pre-activation v */
static inline T SFX(act_grad)(T v, int act, T slope) {
    if (act == ACT_RELU) return v > (T)0 ? (T)1 : (T)0;
    if (act == ACT_LEAKY) return v > (T)0 ? (T)1 : slope;
    return (T)1;
}

/* ------------------------------------------------------------------ sums */
/* Add sum(x - piv) and sum((x - piv)^2) over segments [n0, n1) of channel c (NCHW). */
static void SFX(sums_nchw)(const T *restrict x, int64_t C, int64_t S, int64_t c, int64_t n0,
                           int64_t n1, T piv, double *o1, double *o2) {
    T a1[LANES] = {0}, a2[LANES] = {0};
    double d1 = 0.0, d2 = 0.0;
    int64_t cnt = 0;
    for (int64_t n = n0; n < n1; n++) {
        const T *restrict p = x + (n * C + c) * S;
        int64_t i = 0;
        while (S - i >= LANES) {
            int64_t len = S - i < BLOCK - cnt ? S - i : BLOCK - cnt;
            len = len / LANES * LANES;
            for (int64_t k = 0; k < len; k += LANES) {
                for (int j = 0; j < LANES; j++) {
                    T d = p[i + k + j] - piv;
                    a1[j] += d;
                    a2[j] += d * d;
                }
            }
            i += len;
            cnt += len;
            if (cnt > BLOCK - LANES) {
                for (int j = 0; j < LANES; j++) {
                    d1 += a1[j];
                    d2 += a2[j];
                    a1[j] = 0;
                    a2[j] = 0;
                }
                cnt = 0;
            }
        }
        for (; i < S; i++) {
            double d = (double)(p[i] - piv);
            d1 += d;
            d2 += d * d;
        }
    }
    for (int j = 0; j < LANES; j++) {
        d1 += a1[j];
        d2 += a2[j];
    }
    *o1 += d1;
    *o2 += d2;
}

/* Add per-channel sum(x - piv[c]) and sum((x - piv[c])^2) over rows [m0, m1) (NHWC). */
static void SFX(sums_nhwc)(const T *restrict x, int64_t C, int64_t m0, int64_t m1,
                           const T *restrict piv, double *restrict o1, double *restrict o2,
                           T *restrict a1, T *restrict a2) {
    for (int64_t m = m0; m < m1;) {
        int64_t end = m + ROWBLOCK < m1 ? m + ROWBLOCK : m1;
        for (int64_t c = 0; c < C; c++) {
            a1[c] = 0;
            a2[c] = 0;
        }
        for (; m < end; m++) {
            const T *restrict p = x + m * C;
            for (int64_t c = 0; c < C; c++) {
                T d = p[c] - piv[c];
                a1[c] += d;
                a2[c] += d * d;
            }
        }
        for (int64_t c = 0; c < C; c++) {
            o1[c] += a1[c];
            o2[c] += a2[c];
        }
    }
}

/* ------------------------------------------------------------------ y = act((x - ctr) * scale + shift) */
static inline __attribute__((always_inline)) void SFX(apply_seg)(
    const T *restrict p, T *restrict q, int64_t S, T ctr, T sc, T sh, int act, T slope) {
    for (int64_t i = 0; i < S; i++) q[i] = SFX(act_fwd)((p[i] - ctr) * sc + sh, act, slope);
}

static void SFX(apply_nchw)(const T *x, T *y, int64_t C, int64_t S, int64_t c, int64_t n0,
                            int64_t n1, T ctr, T sc, T sh, int act, T slope) {
    for (int64_t n = n0; n < n1; n++) {
        int64_t o = (n * C + c) * S;
        switch (act) {
        case ACT_RELU: SFX(apply_seg)(x + o, y + o, S, ctr, sc, sh, ACT_RELU, slope); break;
        case ACT_LEAKY: SFX(apply_seg)(x + o, y + o, S, ctr, sc, sh, ACT_LEAKY, slope); break;
        default: SFX(apply_seg)(x + o, y + o, S, ctr, sc, sh, ACT_ID, slope);
        }
    }
}

static inline __attribute__((always_inline)) void SFX(apply_rows)(
    const T *restrict x, T *restrict y, int64_t C, int64_t m0, int64_t m1, const T *restrict ctr,
    const T *restrict sc, const T *restrict sh, int act, T slope) {
    for (int64_t m = m0; m < m1; m++) {
        const T *restrict p = x + m * C;
        T *restrict q = y + m * C;
        for (int64_t c = 0; c < C; c++)
            q[c] = SFX(act_fwd)((p[c] - ctr[c]) * sc[c] + sh[c], act, slope);
    }
}

static void SFX(apply_nhwc)(const T *x, T *y, int64_t C, int64_t m0, int64_t m1, const T *ctr,
                            const T *sc, const T *sh, int act, T slope) {
    switch (act) {
    case ACT_RELU: SFX(apply_rows)(x, y, C, m0, m1, ctr, sc, sh, ACT_RELU, slope); break;
    case ACT_LEAKY: SFX(apply_rows)(x, y, C, m0, m1, ctr, sc, sh, ACT_LEAKY, slope); break;
    default: SFX(apply_rows)(x, y, C, m0, m1, ctr, sc, sh, ACT_ID, slope);
    }
}

/* ------------------------------------------------------------------ backward reductions */
/* g = dy * act'((x - ctr) * msc + msh). Adds sum(g), sum(g * (x - ctr)), sum(x - ctr). */
static inline __attribute__((always_inline)) void SFX(bred_seg)(
    const T *restrict g0, const T *restrict p, int64_t len, T ctr, T msc, T msh, int act,
    T slope, T *restrict a1, T *restrict a2, T *restrict a3) {
    for (int64_t k = 0; k < len; k += LANES) {
        for (int j = 0; j < LANES; j++) {
            T d = p[k + j] - ctr;
            T g = g0[k + j] * SFX(act_grad)(d * msc + msh, act, slope);
            a1[j] += g;
            a2[j] += g * d;
            a3[j] += d;
        }
    }
}

static void SFX(bred_nchw)(const T *dy, const T *x, int64_t C, int64_t S, int64_t c, int64_t n0,
                           int64_t n1, T ctr, T msc, T msh, int act, T slope, double *o) {
    T a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
    double d1 = 0.0, d2 = 0.0, d3 = 0.0;
    int64_t cnt = 0;
    for (int64_t n = n0; n < n1; n++) {
        const T *p = x + (n * C + c) * S;
        const T *g0 = dy + (n * C + c) * S;
        int64_t i = 0;
        while (S - i >= LANES) {
            int64_t len = S - i < BLOCK - cnt ? S - i : BLOCK - cnt;
            len = len / LANES * LANES;
            switch (act) {
            case ACT_RELU:
                SFX(bred_seg)(g0 + i, p + i, len, ctr, msc, msh, ACT_RELU, slope, a1, a2, a3);
                break;
            case ACT_LEAKY:
                SFX(bred_seg)(g0 + i, p + i, len, ctr, msc, msh, ACT_LEAKY, slope, a1, a2, a3);
                break;
            default: SFX(bred_seg)(g0 + i, p + i, len, ctr, msc, msh, ACT_ID, slope, a1, a2, a3);
            }
            i += len;
            cnt += len;
            if (cnt > BLOCK - LANES) {
                for (int j = 0; j < LANES; j++) {
                    d1 += a1[j];
                    d2 += a2[j];
                    d3 += a3[j];
                    a1[j] = a2[j] = a3[j] = 0;
                }
                cnt = 0;
            }
        }
        for (; i < S; i++) {
            T d = p[i] - ctr;
            T g = g0[i] * SFX(act_grad)(d * msc + msh, act, slope);
            d1 += g;
            d2 += (double)g * d;
            d3 += d;
        }
    }
    for (int j = 0; j < LANES; j++) {
        d1 += a1[j];
        d2 += a2[j];
        d3 += a3[j];
    }
    o[0] += d1;
    o[1] += d2;
    o[2] += d3;
}

static inline __attribute__((always_inline)) void SFX(bred_rows)(
    const T *restrict dy, const T *restrict x, int64_t C, int64_t m0, int64_t m1,
    const T *restrict ctr, const T *restrict msc, const T *restrict msh, int act, T slope,
    T *restrict a1, T *restrict a2, T *restrict a3) {
    for (int64_t m = m0; m < m1; m++) {
        const T *restrict p = x + m * C;
        const T *restrict g0 = dy + m * C;
        for (int64_t c = 0; c < C; c++) {
            T d = p[c] - ctr[c];
            T g = g0[c] * SFX(act_grad)(d * msc[c] + msh[c], act, slope);
            a1[c] += g;
            a2[c] += g * d;
            a3[c] += d;
        }
    }
}

/* o holds 3 * C doubles: sum(g), sum(g * (x - ctr)), sum(x - ctr) per channel. */
static void SFX(bred_nhwc)(const T *dy, const T *x, int64_t C, int64_t m0, int64_t m1,
                           const T *ctr, const T *msc, const T *msh, int act, T slope, double *o,
                           T *a1, T *a2, T *a3) {
    for (int64_t m = m0; m < m1;) {
        int64_t end = m + ROWBLOCK < m1 ? m + ROWBLOCK : m1;
        for (int64_t c = 0; c < C; c++) a1[c] = a2[c] = a3[c] = 0;
        switch (act) {
        case ACT_RELU:
            SFX(bred_rows)(dy, x, C, m, end, ctr, msc, msh, ACT_RELU, slope, a1, a2, a3);
            break;
        case ACT_LEAKY:
            SFX(bred_rows)(dy, x, C, m, end, ctr, msc, msh, ACT_LEAKY, slope, a1, a2, a3);
            break;
        default: SFX(bred_rows)(dy, x, C, m, end, ctr, msc, msh, ACT_ID, slope, a1, a2, a3);
        }
        m = end;
        for (int64_t c = 0; c < C; c++) {
            o[c] += a1[c];
            o[C + c] += a2[c];
            o[2 * C + c] += a3[c];
        }
    }
}

/* ------------------------------------------------------------------ dx = A * g + B * (x - ctr) + D */
static inline __attribute__((always_inline)) void SFX(bdx_seg)(
    const T *restrict g0, const T *restrict p, T *restrict q, int64_t S, T ctr, T msc, T msh,
    int act, T slope, T A, T B, T D) {
    for (int64_t i = 0; i < S; i++) {
        T d = p[i] - ctr;
        T g = g0[i] * SFX(act_grad)(d * msc + msh, act, slope);
        q[i] = A * g + B * d + D;
    }
}

static void SFX(bdx_nchw)(const T *dy, const T *x, T *dx, int64_t C, int64_t S, int64_t c,
                          int64_t n0, int64_t n1, T ctr, T msc, T msh, int act, T slope, T A, T B,
                          T D) {
    for (int64_t n = n0; n < n1; n++) {
        int64_t o = (n * C + c) * S;
        switch (act) {
        case ACT_RELU:
            SFX(bdx_seg)(dy + o, x + o, dx + o, S, ctr, msc, msh, ACT_RELU, slope, A, B, D);
            break;
        case ACT_LEAKY:
            SFX(bdx_seg)(dy + o, x + o, dx + o, S, ctr, msc, msh, ACT_LEAKY, slope, A, B, D);
            break;
        default: SFX(bdx_seg)(dy + o, x + o, dx + o, S, ctr, msc, msh, ACT_ID, slope, A, B, D);
        }
    }
}

static inline __attribute__((always_inline)) void SFX(bdx_rows)(
    const T *restrict dy, const T *restrict x, T *restrict dx, int64_t C, int64_t m0, int64_t m1,
    const T *restrict ctr, const T *restrict msc, const T *restrict msh, int act, T slope,
    const T *restrict A, const T *restrict B, const T *restrict D) {
    for (int64_t m = m0; m < m1; m++) {
        const T *restrict p = x + m * C;
        const T *restrict g0 = dy + m * C;
        T *restrict q = dx + m * C;
        for (int64_t c = 0; c < C; c++) {
            T d = p[c] - ctr[c];
            T g = g0[c] * SFX(act_grad)(d * msc[c] + msh[c], act, slope);
            q[c] = A[c] * g + B[c] * d + D[c];
        }
    }
}

static void SFX(bdx_nhwc)(const T *dy, const T *x, T *dx, int64_t C, int64_t m0, int64_t m1,
                          const T *ctr, const T *msc, const T *msh, int act, T slope, const T *A,
                          const T *B, const T *D) {
    switch (act) {
    case ACT_RELU:
        SFX(bdx_rows)(dy, x, dx, C, m0, m1, ctr, msc, msh, ACT_RELU, slope, A, B, D);
        break;
    case ACT_LEAKY:
        SFX(bdx_rows)(dy, x, dx, C, m0, m1, ctr, msc, msh, ACT_LEAKY, slope, A, B, D);
        break;
    default: SFX(bdx_rows)(dy, x, dx, C, m0, m1, ctr, msc, msh, ACT_ID, slope, A, B, D);
    }
}
