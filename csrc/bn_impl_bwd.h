/* Backward kernels for one element type: the second half of bn_impl.h (same T, SFX, VL,
 * STEP and helpers), included right after it by bnlab_kernels.c. */

/* CALL(A, ST) with the activation and the statistics flag as compile-time constants, so each
 * combination gets its own specialised loop. */
#ifndef ACT_ST_SWITCH
#define ACT_ST_SWITCH(CALL, act, st)                                                             \
    do {                                                                                         \
        if (st) {                                                                                \
            switch (act) {                                                                       \
            case ACT_RELU: CALL(ACT_RELU, 1); break;                                             \
            case ACT_LEAKY: CALL(ACT_LEAKY, 1); break;                                           \
            case ACT_INV_LEAKY: CALL(ACT_INV_LEAKY, 1); break;                                   \
            default: CALL(ACT_ID, 1);                                                            \
            }                                                                                    \
        } else {                                                                                 \
            switch (act) {                                                                       \
            case ACT_RELU: CALL(ACT_RELU, 0); break;                                             \
            case ACT_LEAKY: CALL(ACT_LEAKY, 0); break;                                           \
            case ACT_INV_LEAKY: CALL(ACT_INV_LEAKY, 0); break;                                   \
            default: CALL(ACT_ID, 0);                                                            \
            }                                                                                    \
        }                                                                                        \
    } while (0)
#endif

/* ACT_INV_LEAKY: backward from the layer's OUTPUT (in-place activated BN, bnlab.fused). The
 * tensor read as x is y = leaky_relu(z); the value centred is z = act^-1(y) (y / slope where
 * y < 0) and the activation's mask comes from y's sign, the same as z's for slope > 0. For the
 * other codes x is the input and both are as before. */
static inline SFX(vec) SFX(vpre)(SFX(vec) v, int act, SFX(vec) lv) {
    if (act != ACT_INV_LEAKY) return v;
    SFX(vec) zero = {0}, neg = v / lv;
    SFX(ivec) m = v > zero;
    return (SFX(vec))(((SFX(ivec))v & m) | ((SFX(ivec))neg & ~m));
}

static inline T SFX(spre)(T v, int act, T slope) {
    return act == ACT_INV_LEAKY ? SFX(sel)(v > (T)0, v, v / slope) : v;
}

/* the activation's derivative factor: at y's sign (ACT_INV_LEAKY), else at e msc + msh */
static inline SFX(vec) SFX(vmask)(SFX(vec) v, SFX(vec) e, SFX(vec) sv, SFX(vec) hv, int act,
                                  SFX(vec) lv) {
    if (act == ACT_INV_LEAKY) return SFX(vgrad)(v, ACT_LEAKY, lv);
    return SFX(vgrad)(e * sv + hv, act, lv);
}

static inline T SFX(smask)(T v, T d, T msc, T msh, int act, T slope) {
    if (act == ACT_INV_LEAKY) return SFX(act_grad)(v, ACT_LEAKY, slope);
    return SFX(act_grad)(d * msc + msh, act, slope);
}

/* One vector of the backward sums: e = x - ctr, g = dy times the activation's derivative at
 * e msc + msh; a += g, b += g e and, with ST, c += e, q += e^2. */
static inline __attribute__((always_inline)) void SFX(bred_vec)(
    const T *restrict p, const T *restrict g0, SFX(vec) cv, SFX(vec) sv, SFX(vec) hv,
    SFX(vec) lv, int act, const int ST, SFX(vec) *a, SFX(vec) *b, SFX(vec) *c, SFX(vec) *q) {
    SFX(vec) v = SFX(vload)(p), e = SFX(vpre)(v, act, lv) - cv, g = SFX(vload)(g0);
    if (act != ACT_ID) g *= SFX(vmask)(v, e, sv, hv, act, lv);
    *a += g;
    *b += g * e;
    if (ST) {
        *c += e;
        *q += e * e;
    }
}

/* ------------------------------------------------------------------ backward reductions
 * The sums backward needs, per channel c, into o[c], o[C + c] (and o[2C + c], o[3C + c]):
 * sum(g) and sum(g (x - ctr)), where g is the upstream gradient times the activation's
 * derivative (recomputed from x: (x - ctr) msc + msh > 0). With ST = 1 they also take
 * sum(x - ctr) and sum((x - ctr)^2), from which backward recomputes the statistics when the
 * forward did not save them (the fused BN + activation keeps only x). */
static inline __attribute__((always_inline)) void SFX(bred_plane_act)(
    const T *restrict g0, const T *restrict p, int64_t S, T ctr, T msc, T msh, int act, T slope,
    double *o, int64_t C, const int ST) {
    SFX(vec) zero = {0}, cv = zero + ctr, sv = zero + msc, hv = zero + msh, lv = zero + slope;
    double d1 = 0.0, d2 = 0.0, d3 = 0.0, d4 = 0.0;
    int64_t i = 0;
    while (S - i >= VL) { /* blocks as in sums_plane: one horizontal sum per quantity */
        int64_t end = i + (S - i < BLOCK ? S - i : BLOCK) / VL * VL, k = i;
        SFX(vec) a[4] = {zero, zero, zero, zero}, b[4] = {zero, zero, zero, zero};
        SFX(vec) c[4] = {zero, zero, zero, zero}, q[4] = {zero, zero, zero, zero};
        for (; k + STEP <= end; k += STEP)
            for (int u = 0; u < 4; u++)
                SFX(bred_vec)(p + k + u * VL, g0 + k + u * VL, cv, sv, hv, lv, act, ST, &a[u],
                              &b[u], &c[u], &q[u]);
        for (; k < end; k += VL)
            SFX(bred_vec)(p + k, g0 + k, cv, sv, hv, lv, act, ST, &a[0], &b[0], &c[0], &q[0]);
        d1 += SFX(vsum)((a[0] + a[1]) + (a[2] + a[3]));
        d2 += SFX(vsum)((b[0] + b[1]) + (b[2] + b[3]));
        if (ST) {
            d3 += SFX(vsum)((c[0] + c[1]) + (c[2] + c[3]));
            d4 += SFX(vsum)((q[0] + q[1]) + (q[2] + q[3]));
        }
        i = end;
    }
    for (; i < S; i++) {
        T d = SFX(spre)(p[i], act, slope) - ctr;
        T g = g0[i] * SFX(smask)(p[i], d, msc, msh, act, slope);
        d1 += g;
        d2 += (double)g * d;
        d3 += d;
        d4 += (double)d * d;
    }
    o[0] += d1;
    o[C] += d2;
    if (ST) {
        o[2 * C] += d3;
        o[3 * C] += d4;
    }
}

/* The sums over one plane of channel c (NCHW), into o + c with stride C. */
static void SFX(bred_plane)(const T *g0, const T *p, int64_t S, T ctr, T msc, T msh, int act,
                            T slope, double *o, int64_t C, int st) {
#define BRED_PLANE(A, ST) SFX(bred_plane_act)(g0, p, S, ctr, msc, msh, A, slope, o, C, ST)
    ACT_ST_SWITCH(BRED_PLANE, act, st);
#undef BRED_PLANE
}

/* The sums above over planes [p0, p1) of S values (a run, see sums_run), into o (stride C);
 * `acc` holds 4 C VL values and `cnt` C counters of scratch. */
static inline __attribute__((always_inline)) void SFX(bred_run_act)(
    const T *restrict dy, const T *restrict x, int64_t p0, int64_t p1, int64_t C, int64_t S,
    const T *restrict ctr, const T *restrict msc, const T *restrict msh, int act, T slope,
    double *restrict o, T *restrict acc, int32_t *restrict cnt, const int ST) {
    const int64_t sv = S / VL * VL, cap = SFX(run_cap)(S), nq = ST ? 4 : 2;
    SFX(vec) zero = {0}, lv = zero + slope;
    memset(acc, 0, (size_t)(nq * C * VL) * sizeof(T));
    memset(cnt, 0, (size_t)C * sizeof(int32_t));
    for (int64_t p = p0, c = p0 % C; p < p1; p++, c = c + 1 == C ? 0 : c + 1) {
        const T *restrict q = x + p * S, *restrict g0 = dy + p * S;
        SFX(vec) cv = zero + ctr[c], sv_ = zero + msc[c], hv = zero + msh[c];
        SFX(vec) a[2] = {zero, zero}, b[2] = {zero, zero}, e1[2] = {zero, zero};
        SFX(vec) e2[2] = {zero, zero};
        int64_t k = 0;
        for (; k + 2 * VL <= sv; k += 2 * VL)
            for (int u = 0; u < 2; u++)
                SFX(bred_vec)(q + k + u * VL, g0 + k + u * VL, cv, sv_, hv, lv, act, ST, &a[u],
                              &b[u], &e1[u], &e2[u]);
        for (; k < sv; k += VL)
            SFX(bred_vec)(q + k, g0 + k, cv, sv_, hv, lv, act, ST, &a[0], &b[0], &e1[0], &e2[0]);
        for (; k < S; k++) {
            T d = SFX(spre)(q[k], act, slope) - ctr[c];
            T g = g0[k] * SFX(smask)(q[k], d, msc[c], msh[c], act, slope);
            a[1][0] += g;
            b[1][0] += g * d;
            if (ST) {
                e1[1][0] += d;
                e2[1][0] += d * d;
            }
        }
        SFX(vacc)(acc + c * VL, a[0] + a[1]);
        SFX(vacc)(acc + (C + c) * VL, b[0] + b[1]);
        if (ST) {
            SFX(vacc)(acc + (2 * C + c) * VL, e1[0] + e1[1]);
            SFX(vacc)(acc + (3 * C + c) * VL, e2[0] + e2[1]);
        }
        if (++cnt[c] == cap) {
            for (int64_t j = 0; j < nq; j++) SFX(vdrain)(o + j * C + c, acc + (j * C + c) * VL);
            cnt[c] = 0;
        }
    }
    for (int64_t c = 0; c < C; c++)
        if (cnt[c])
            for (int64_t j = 0; j < nq; j++) SFX(vdrain)(o + j * C + c, acc + (j * C + c) * VL);
}

static void SFX(bred_run)(const T *dy, const T *x, int64_t p0, int64_t p1, int64_t C, int64_t S,
                          const T *ctr, const T *msc, const T *msh, int act, T slope, double *o,
                          T *acc, int32_t *cnt, int st) {
#define BRED_RUN(A, ST)                                                                          \
    SFX(bred_run_act)(dy, x, p0, p1, C, S, ctr, msc, msh, A, slope, o, acc, cnt, ST)
    ACT_ST_SWITCH(BRED_RUN, act, st);
#undef BRED_RUN
}

/* NHWC rows of at most K vectors (C = K VL, K <= 4, or 2 with an activation or the
 * statistics): the whole row's sums in registers over a block of rows. */
static inline __attribute__((always_inline)) void SFX(bred_cols)(
    const T *restrict dy, const T *restrict x, int64_t C, int64_t m, int64_t end, int64_t c,
    const T *restrict ctr, const T *restrict msc, const T *restrict msh, int act, T slope,
    double *restrict o, colmap cm, const int K, const int ST) {
    SFX(vec) zero = {0}, lv = zero + slope, cv[4], a[4], b[4], cs[4], q[4];
    const int64_t Cc = cm.nc; /* channels: the stride of the quantities in o */
    for (int k = 0; k < K; k++) {
        cv[k] = SFX(vload)(ctr + c + k * VL);
        a[k] = b[k] = cs[k] = q[k] = zero;
    }
    for (int64_t r = m; r < end; r++) {
        const T *restrict p = x + r * C + c;
        const T *restrict g0 = dy + r * C + c;
        for (int k = 0; k < K; k++) {
            SFX(vec) v = SFX(vload)(p + k * VL), e = SFX(vpre)(v, act, lv) - cv[k];
            SFX(vec) g = SFX(vload)(g0 + k * VL);
            if (act != ACT_ID)
                g *= SFX(vmask)(v, e, SFX(vload)(msc + c + k * VL), SFX(vload)(msh + c + k * VL),
                                act, lv);
            a[k] += g;
            b[k] += g * e;
            if (ST) {
                cs[k] += e;
                q[k] += e * e;
            }
        }
    }
    for (int k = 0; k < K; k++) {
        SFX(vflush_to)(o, c + k * VL, a[k], cm);
        SFX(vflush_to)(o + Cc, c + k * VL, b[k], cm);
        if (ST) {
            SFX(vflush_to)(o + 2 * Cc, c + k * VL, cs[k], cm);
            SFX(vflush_to)(o + 3 * Cc, c + k * VL, q[k], cm);
        }
    }
}

/* NHWC: rows in memory order (sequential streams for the prefetchers), the per-channel sums
 * of a block of ROWBLOCK rows kept in a small T array that stays in L1, then flushed into
 * double. Channels go in windows of at most NHWC_WINDOW so the array has a fixed size.
 * (Holding a few channel vectors in registers over a block of rows instead read the rows
 * with a stride and ran at half the bandwidth: 4.5 against 3.0 ms on (64, 64, 56, 56).) */
static inline __attribute__((always_inline)) void SFX(bred_rows)(
    const T *restrict dy, const T *restrict x, int64_t C, int64_t m0, int64_t m1,
    const T *restrict ctr, const T *restrict msc, const T *restrict msh, int act, T slope,
    double *restrict o, colmap cm, const int ST) {
    const int kmax = act == ACT_ID && !ST ? 4 : 2; /* vectors whose sums fit in registers */
    if (C % VL == 0 && C <= kmax * VL) { /* short rows: in registers */
        for (int64_t m = m0; m < m1; m += ROWBLOCK) {
            int64_t end = m + ROWBLOCK < m1 ? m + ROWBLOCK : m1;
#define BRED_COLS(K) SFX(bred_cols)(dy, x, C, m, end, 0, ctr, msc, msh, act, slope, o, cm, K, ST)
            switch (C / VL) {
            case 1: BRED_COLS(1); break;
            case 2: BRED_COLS(2); break;
            case 3: BRED_COLS(3); break;
            default: BRED_COLS(4);
            }
#undef BRED_COLS
        }
        return;
    }
    T acc[4 * NHWC_WINDOW];
    SFX(vec) zero = {0}, lv = zero + slope;
    const int64_t nq = ST ? 4 : 2;
    for (int64_t m = m0; m < m1;) {
        int64_t end = m + ROWBLOCK < m1 ? m + ROWBLOCK : m1;
        for (int64_t c0 = 0; c0 < C; c0 += NHWC_WINDOW) {
            int64_t W = C - c0 < NHWC_WINDOW ? C - c0 : NHWC_WINDOW, wv = W / VL * VL;
            T *restrict a1 = acc, *restrict a2 = acc + W, *restrict a3 = acc + 2 * W;
            T *restrict a4 = acc + 3 * W;
            memset(acc, 0, (size_t)(nq * W) * sizeof(T));
            for (int64_t r = m; r < end; r++) {
                const T *restrict p = x + r * C + c0;
                const T *restrict g0 = dy + r * C + c0;
                const T *restrict cp = ctr + c0;
                for (int64_t c = 0; c < wv; c += VL) {
                    SFX(vec) v = SFX(vload)(p + c), g = SFX(vload)(g0 + c);
                    SFX(vec) e = SFX(vpre)(v, act, lv) - SFX(vload)(cp + c);
                    if (act != ACT_ID)
                        g *= SFX(vmask)(v, e, SFX(vload)(msc + c0 + c), SFX(vload)(msh + c0 + c),
                                        act, lv);
                    SFX(vec) s1 = SFX(vload)(a1 + c) + g, s2 = SFX(vload)(a2 + c) + g * e;
                    memcpy(a1 + c, &s1, sizeof s1);
                    memcpy(a2 + c, &s2, sizeof s2);
                    if (ST) {
                        SFX(vec) s3 = SFX(vload)(a3 + c) + e, s4 = SFX(vload)(a4 + c) + e * e;
                        memcpy(a3 + c, &s3, sizeof s3);
                        memcpy(a4 + c, &s4, sizeof s4);
                    }
                }
                for (int64_t c = wv; c < W; c++) { /* channels past the last full vector */
                    T d = SFX(spre)(p[c], act, slope) - cp[c];
                    T g = g0[c] * SFX(smask)(p[c], d, msc[c0 + c], msh[c0 + c], act, slope);
                    a1[c] += g;
                    a2[c] += g * d;
                    if (ST) {
                        a3[c] += d;
                        a4[c] += d * d;
                    }
                }
            }
            for (int64_t k = 0; k < nq; k++)
                SFX(flush_cols)(o + k * cm.nc, acc + k * W, c0, W, cm);
        }
        m = end;
    }
}

/* The sums over rows [m0, m1) (NHWC), each column into its channel (see colmap) of o, whose
 * quantities are cm.nc apart. */
static void SFX(bred_nhwc)(const T *dy, const T *x, int64_t C, int64_t m0, int64_t m1,
                           const T *ctr, const T *msc, const T *msh, int act, T slope, double *o,
                           int st, colmap cm) {
#define BRED_ROWS(A, ST) SFX(bred_rows)(dy, x, C, m0, m1, ctr, msc, msh, A, slope, o, cm, ST)
    ACT_ST_SWITCH(BRED_ROWS, act, st);
#undef BRED_ROWS
}

/* ------------------------------------------------------------------ dx = A (G g + B (x - ctr) + D)
 * The per-channel scale A is applied last: the three terms inside are of the size of g and
 * cancel there (for few values per channel they nearly cancel exactly), so rounding them at
 * the scaled size would cost several digits. G is 1, or 0 when the scale is 0 (w == 0). */
static inline __attribute__((always_inline)) void SFX(bdx_seg)(
    const T *restrict g0, const T *restrict p, T *restrict q, int64_t S, T ctr, T msc, T msh,
    int act, T slope, T A, T G, T B, T D) {
    int64_t i = 0;
    if (act != ACT_ID) { /* in vectors: see apply_seg */
        SFX(vec) zero = {0}, cv = zero + ctr, sv = zero + msc, hv = zero + msh, lv = zero + slope;
        SFX(vec) av = zero + A, gv = zero + G, bv = zero + B, dv = zero + D;
        for (; i + VL <= S; i += VL) {
            SFX(vec) xv = SFX(vload)(p + i), e = SFX(vpre)(xv, act, lv) - cv;
            SFX(vec) g = SFX(vload)(g0 + i) * SFX(vmask)(xv, e, sv, hv, act, lv);
            SFX(vec) v = av * (gv * g + bv * e + dv);
            memcpy(q + i, &v, sizeof v);
        }
    }
    for (; i < S; i++) {
        T d = SFX(spre)(p[i], act, slope) - ctr;
        T g = g0[i] * SFX(smask)(p[i], d, msc, msh, act, slope);
        q[i] = A * (G * g + B * d + D);
    }
}

static inline __attribute__((always_inline)) void SFX(bdx_stream)(
    const T *restrict g0, const T *restrict p, T *restrict q, int64_t S, T ctr, T msc, T msh,
    int act, T slope, T A, T G, T B, T D) {
    SFX(vec) zero = {0}, cv = zero + ctr, sv = zero + msc, hv = zero + msh, lv = zero + slope;
    SFX(vec) av = zero + A, gv = zero + G, bv = zero + B, dv = zero + D;
    int64_t i = SFX(head)(q, S);
    SFX(bdx_seg)(g0, p, q, i, ctr, msc, msh, act, slope, A, G, B, D);
    for (; S - i >= VL; i += VL) {
        SFX(vec) v = SFX(vload)(p + i), e = SFX(vpre)(v, act, lv) - cv, g = SFX(vload)(g0 + i);
        if (act != ACT_ID) g *= SFX(vmask)(v, e, sv, hv, act, lv);
        SFX(vstream)(q + i, av * (gv * g + bv * e + dv));
    }
    SFX(bdx_seg)(g0 + i, p + i, q + i, S - i, ctr, msc, msh, act, slope, A, G, B, D);
}

static void SFX(bdx_plane)(const T *dy, const T *x, T *dx, int64_t S, T ctr, T msc, T msh,
                           int act, T slope, T A, T G, T B, T D, int stream) {
    if (stream) {
        switch (act) {
        case ACT_RELU:
            SFX(bdx_stream)(dy, x, dx, S, ctr, msc, msh, ACT_RELU, slope, A, G, B, D);
            break;
        case ACT_LEAKY:
            SFX(bdx_stream)(dy, x, dx, S, ctr, msc, msh, ACT_LEAKY, slope, A, G, B, D);
            break;
        case ACT_INV_LEAKY:
            SFX(bdx_stream)(dy, x, dx, S, ctr, msc, msh, ACT_INV_LEAKY, slope, A, G, B, D);
            break;
        default: SFX(bdx_stream)(dy, x, dx, S, ctr, msc, msh, ACT_ID, slope, A, G, B, D);
        }
        return;
    }
    switch (act) {
    case ACT_RELU: SFX(bdx_seg)(dy, x, dx, S, ctr, msc, msh, ACT_RELU, slope, A, G, B, D); break;
    case ACT_LEAKY: SFX(bdx_seg)(dy, x, dx, S, ctr, msc, msh, ACT_LEAKY, slope, A, G, B, D); break;
    case ACT_INV_LEAKY:
        SFX(bdx_seg)(dy, x, dx, S, ctr, msc, msh, ACT_INV_LEAKY, slope, A, G, B, D);
        break;
    default: SFX(bdx_seg)(dy, x, dx, S, ctr, msc, msh, ACT_ID, slope, A, G, B, D);
    }
}

/* dx for the vector of channels c.. of a row (NHWC): A (G g + B e + D), e = x - ctr, g = dy
 * times the activation's derivative at e msc + msh */
static inline __attribute__((always_inline)) SFX(vec) SFX(bdx_at)(
    const T *restrict g0, const T *restrict p, const T *restrict ctr, const T *restrict msc,
    const T *restrict msh, const T *restrict A, const T *restrict G, const T *restrict B,
    const T *restrict D, int64_t c, int act, SFX(vec) lv) {
    SFX(vec) v = SFX(vload)(p + c), e = SFX(vpre)(v, act, lv) - SFX(vload)(ctr + c);
    SFX(vec) g = SFX(vload)(g0 + c);
    if (act != ACT_ID) g *= SFX(vmask)(v, e, SFX(vload)(msc + c), SFX(vload)(msh + c), act, lv);
    return SFX(vload)(A + c) *
           (SFX(vload)(G + c) * g + SFX(vload)(B + c) * e + SFX(vload)(D + c));
}

/* Rows [m0, m1) of a window of Wd channels (row stride C). */
static inline __attribute__((always_inline)) void SFX(bdx_rows)(
    const T *restrict dy, const T *restrict x, T *restrict dx, int64_t C, int64_t Wd, int64_t m0,
    int64_t m1, const T *restrict ctr, const T *restrict msc, const T *restrict msh, int act,
    T slope, const T *restrict A, const T *restrict G, const T *restrict B, const T *restrict D) {
    SFX(vec) zero = {0}, lv = zero + slope;
    for (int64_t m = m0; m < m1; m++) {
        const T *restrict p = x + m * C;
        const T *restrict g0 = dy + m * C;
        T *restrict q = dx + m * C;
        int64_t c = 0;
        if (act != ACT_ID) /* in vectors: see apply_seg */
            for (; c + VL <= Wd; c += VL) {
                SFX(vec) v = SFX(bdx_at)(g0, p, ctr, msc, msh, A, G, B, D, c, act, lv);
                memcpy(q + c, &v, sizeof v);
            }
        for (; c < Wd; c++) {
            T d = SFX(spre)(p[c], act, slope) - ctr[c];
            T g = g0[c] * SFX(smask)(p[c], d, msc[c], msh[c], act, slope);
            q[c] = A[c] * (G[c] * g + B[c] * d + D[c]);
        }
    }
}

static inline __attribute__((always_inline)) void SFX(bdx_rows_stream)(
    const T *restrict dy, const T *restrict x, T *restrict dx, int64_t C, int64_t Wd, int64_t m0,
    int64_t m1, const T *restrict ctr, const T *restrict msc, const T *restrict msh, int act,
    T slope, const T *restrict A, const T *restrict G, const T *restrict B, const T *restrict D) {
    SFX(vec) zero = {0}, lv = zero + slope;
    for (int64_t m = m0; m < m1; m++) {
        const T *restrict p = x + m * C;
        const T *restrict g0 = dy + m * C;
        T *restrict q = dx + m * C;
        for (int64_t c = 0; c < Wd; c += VL)
            SFX(vstream)(q + c, SFX(bdx_at)(g0, p, ctr, msc, msh, A, G, B, D, c, act, lv));
    }
}

/* Rows of more than BDX_WINDOW channels go a block of rows and a window of channels at a
 * time, so the window's seven coefficient vectors stay in L1 (see apply_nhwc). */
#define BDX_WINDOW (NHWC_WINDOW / 2)
static void SFX(bdx_nhwc)(const T *dy, const T *x, T *dx, int64_t C, int64_t m0, int64_t m1,
                          const T *ctr, const T *msc, const T *msh, int act, T slope, const T *A,
                          const T *G, const T *B, const T *D, int stream) {
    int st = stream && SFX(rows_streamable)(dx, C);
    for (int64_t m = m0; m < m1; m += ROWBLOCK) {
        int64_t end = C <= BDX_WINDOW ? m1 : (m + ROWBLOCK < m1 ? m + ROWBLOCK : m1);
        for (int64_t c0 = 0; c0 < C; c0 += BDX_WINDOW) {
            int64_t Wd = C - c0 < BDX_WINDOW ? C - c0 : BDX_WINDOW;
#define BDX(F, ACT)                                                                              \
    SFX(F)(dy + c0, x + c0, dx + c0, C, Wd, m, end, ctr + c0, msc + c0, msh + c0, ACT, slope,    \
           A + c0, G + c0, B + c0, D + c0)
            if (st) {
                switch (act) {
                case ACT_RELU: BDX(bdx_rows_stream, ACT_RELU); break;
                case ACT_LEAKY: BDX(bdx_rows_stream, ACT_LEAKY); break;
                case ACT_INV_LEAKY: BDX(bdx_rows_stream, ACT_INV_LEAKY); break;
                default: BDX(bdx_rows_stream, ACT_ID);
                }
            } else {
                switch (act) {
                case ACT_RELU: BDX(bdx_rows, ACT_RELU); break;
                case ACT_LEAKY: BDX(bdx_rows, ACT_LEAKY); break;
                case ACT_INV_LEAKY: BDX(bdx_rows, ACT_INV_LEAKY); break;
                default: BDX(bdx_rows, ACT_ID);
                }
            }
#undef BDX
        }
        if (end == m1) break;
    }
}
#undef BDX_WINDOW

#undef VL
#undef STEP
