/* Backward kernels for one element type: the second half of bn_impl.h (same T, SFX, VL,
 * STEP and helpers), included right after it by bnlab_kernels.c. */

/* ------------------------------------------------------------------ backward reductions */
static inline __attribute__((always_inline)) void SFX(bred_plane_act)(
    const T *restrict g0, const T *restrict p, int64_t S, T ctr, T msc, T msh, int act, T slope,
    double *o) {
    SFX(vec) zero = {0}, cv = zero + ctr, sv = zero + msc, hv = zero + msh, lv = zero + slope;
    double d1 = 0.0, d2 = 0.0, d3 = 0.0, d4 = 0.0;
    int64_t i = 0;
    while (S - i >= 2 * VL) {
        int64_t len = (S - i < BLOCK ? S - i : BLOCK) / (2 * VL) * (2 * VL);
        SFX(vec) a0 = zero, a1 = zero, b0 = zero, b1 = zero, c0 = zero, c1 = zero, q0 = zero,
                 q1 = zero;
        for (int64_t k = i; k < i + len; k += 2 * VL) {
            SFX(vec) e0 = SFX(vload)(p + k) - cv, e1 = SFX(vload)(p + k + VL) - cv;
            SFX(vec) g0v = SFX(vload)(g0 + k), g1v = SFX(vload)(g0 + k + VL);
            if (act != ACT_ID) {
                g0v *= SFX(vgrad)(e0 * sv + hv, act, lv);
                g1v *= SFX(vgrad)(e1 * sv + hv, act, lv);
            }
            a0 += g0v; a1 += g1v;
            b0 += g0v * e0; b1 += g1v * e1;
            c0 += e0; c1 += e1;
            q0 += e0 * e0; q1 += e1 * e1;
        }
        d1 += SFX(vsum)(a0 + a1);
        d2 += SFX(vsum)(b0 + b1);
        d3 += SFX(vsum)(c0 + c1);
        d4 += SFX(vsum)(q0 + q1);
        i += len;
    }
    if (S - i >= VL) { /* short planes: one more vector step before the scalar tail */
        SFX(vec) a = zero, bq = zero, c = zero, q = zero;
        for (; S - i >= VL; i += VL) {
            SFX(vec) e = SFX(vload)(p + i) - cv, g = SFX(vload)(g0 + i);
            if (act != ACT_ID) g *= SFX(vgrad)(e * sv + hv, act, lv);
            a += g;
            bq += g * e;
            c += e;
            q += e * e;
        }
        d1 += SFX(vsum)(a);
        d2 += SFX(vsum)(bq);
        d3 += SFX(vsum)(c);
        d4 += SFX(vsum)(q);
    }
    for (; i < S; i++) {
        T d = p[i] - ctr;
        T g = g0[i] * SFX(act_grad)(d * msc + msh, act, slope);
        d1 += g;
        d2 += (double)g * d;
        d3 += d;
        d4 += (double)d * d;
    }
    o[0] += d1;
    o[1] += d2;
    o[2] += d3;
    o[3] += d4;
}

/* o[0..3] += sum(g), sum(g (x - ctr)), sum(x - ctr), sum((x - ctr)^2) over one plane (NCHW). */
static void SFX(bred_plane)(const T *g0, const T *p, int64_t S, T ctr, T msc, T msh, int act,
                            T slope, double *o) {
    switch (act) {
    case ACT_RELU: SFX(bred_plane_act)(g0, p, S, ctr, msc, msh, ACT_RELU, slope, o); break;
    case ACT_LEAKY: SFX(bred_plane_act)(g0, p, S, ctr, msc, msh, ACT_LEAKY, slope, o); break;
    default: SFX(bred_plane_act)(g0, p, S, ctr, msc, msh, ACT_ID, slope, o);
    }
}

static inline __attribute__((always_inline)) void SFX(bred_rows)(
    const T *restrict dy, const T *restrict x, int64_t C, int64_t m0, int64_t m1,
    const T *restrict ctr, const T *restrict msc, const T *restrict msh, int act, T slope,
    T *restrict a1, T *restrict a2, T *restrict a3, T *restrict a4) {
    for (int64_t m = m0; m < m1; m++) {
        const T *restrict p = x + m * C;
        const T *restrict g0 = dy + m * C;
        for (int64_t c = 0; c < C; c++) {
            T d = p[c] - ctr[c];
            T g = g0[c] * SFX(act_grad)(d * msc[c] + msh[c], act, slope);
            a1[c] += g;
            a2[c] += g * d;
            a3[c] += d;
            a4[c] += d * d;
        }
    }
}

/* o holds 4 * C doubles: sum(g), sum(g (x - ctr)), sum(x - ctr), sum((x - ctr)^2). */
static void SFX(bred_nhwc)(const T *dy, const T *x, int64_t C, int64_t m0, int64_t m1,
                           const T *ctr, const T *msc, const T *msh, int act, T slope, double *o,
                           T *a1, T *a2, T *a3, T *a4) {
    for (int64_t m = m0; m < m1;) {
        int64_t end = m + ROWBLOCK < m1 ? m + ROWBLOCK : m1;
        for (int64_t c = 0; c < C; c++) a1[c] = a2[c] = a3[c] = a4[c] = 0;
        switch (act) {
        case ACT_RELU:
            SFX(bred_rows)(dy, x, C, m, end, ctr, msc, msh, ACT_RELU, slope, a1, a2, a3, a4);
            break;
        case ACT_LEAKY:
            SFX(bred_rows)(dy, x, C, m, end, ctr, msc, msh, ACT_LEAKY, slope, a1, a2, a3, a4);
            break;
        default: SFX(bred_rows)(dy, x, C, m, end, ctr, msc, msh, ACT_ID, slope, a1, a2, a3, a4);
        }
        m = end;
        for (int64_t c = 0; c < C; c++) {
            o[c] += a1[c];
            o[C + c] += a2[c];
            o[2 * C + c] += a3[c];
            o[3 * C + c] += a4[c];
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

static inline __attribute__((always_inline)) void SFX(bdx_stream)(
    const T *restrict g0, const T *restrict p, T *restrict q, int64_t S, T ctr, T msc, T msh,
    int act, T slope, T A, T B, T D) {
    SFX(vec) zero = {0}, cv = zero + ctr, sv = zero + msc, hv = zero + msh, lv = zero + slope;
    SFX(vec) av = zero + A, bv = zero + B, dv = zero + D;
    int64_t i = SFX(head)(q, S);
    SFX(bdx_seg)(g0, p, q, i, ctr, msc, msh, act, slope, A, B, D);
    for (; S - i >= VL; i += VL) {
        SFX(vec) e = SFX(vload)(p + i) - cv, g = SFX(vload)(g0 + i);
        if (act != ACT_ID) g *= SFX(vgrad)(e * sv + hv, act, lv);
        SFX(vstream)(q + i, av * g + bv * e + dv);
    }
    SFX(bdx_seg)(g0 + i, p + i, q + i, S - i, ctr, msc, msh, act, slope, A, B, D);
}

static void SFX(bdx_plane)(const T *dy, const T *x, T *dx, int64_t S, T ctr, T msc, T msh,
                           int act, T slope, T A, T B, T D, int stream) {
    if (stream) {
        switch (act) {
        case ACT_RELU:
            SFX(bdx_stream)(dy, x, dx, S, ctr, msc, msh, ACT_RELU, slope, A, B, D);
            break;
        case ACT_LEAKY:
            SFX(bdx_stream)(dy, x, dx, S, ctr, msc, msh, ACT_LEAKY, slope, A, B, D);
            break;
        default: SFX(bdx_stream)(dy, x, dx, S, ctr, msc, msh, ACT_ID, slope, A, B, D);
        }
        return;
    }
    switch (act) {
    case ACT_RELU: SFX(bdx_seg)(dy, x, dx, S, ctr, msc, msh, ACT_RELU, slope, A, B, D); break;
    case ACT_LEAKY: SFX(bdx_seg)(dy, x, dx, S, ctr, msc, msh, ACT_LEAKY, slope, A, B, D); break;
    default: SFX(bdx_seg)(dy, x, dx, S, ctr, msc, msh, ACT_ID, slope, A, B, D);
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

static inline __attribute__((always_inline)) void SFX(bdx_rows_stream)(
    const T *restrict dy, const T *restrict x, T *restrict dx, int64_t C, int64_t m0, int64_t m1,
    const T *restrict ctr, const T *restrict msc, const T *restrict msh, int act, T slope,
    const T *restrict A, const T *restrict B, const T *restrict D) {
    SFX(vec) zero = {0}, lv = zero + slope;
    for (int64_t m = m0; m < m1; m++) {
        const T *restrict p = x + m * C;
        const T *restrict g0 = dy + m * C;
        T *restrict q = dx + m * C;
        for (int64_t c = 0; c < C; c += VL) {
            SFX(vec) e = SFX(vload)(p + c) - SFX(vload)(ctr + c), g = SFX(vload)(g0 + c);
            if (act != ACT_ID)
                g *= SFX(vgrad)(e * SFX(vload)(msc + c) + SFX(vload)(msh + c), act, lv);
            SFX(vstream)(q + c, SFX(vload)(A + c) * g + SFX(vload)(B + c) * e + SFX(vload)(D + c));
        }
    }
}

static void SFX(bdx_nhwc)(const T *dy, const T *x, T *dx, int64_t C, int64_t m0, int64_t m1,
                          const T *ctr, const T *msc, const T *msh, int act, T slope, const T *A,
                          const T *B, const T *D, int stream) {
    if (stream && SFX(rows_streamable)(dx, C)) {
        switch (act) {
        case ACT_RELU:
            SFX(bdx_rows_stream)(dy, x, dx, C, m0, m1, ctr, msc, msh, ACT_RELU, slope, A, B, D);
            break;
        case ACT_LEAKY:
            SFX(bdx_rows_stream)(dy, x, dx, C, m0, m1, ctr, msc, msh, ACT_LEAKY, slope, A, B, D);
            break;
        default: SFX(bdx_rows_stream)(dy, x, dx, C, m0, m1, ctr, msc, msh, ACT_ID, slope, A, B, D);
        }
        return;
    }
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

#undef VL
#undef STEP
