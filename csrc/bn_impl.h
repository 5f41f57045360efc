/* Batch-norm kernels for one element type and instruction set. Included by bnlab_kernels.c once
 * per combination: T = float / SFX(name) = name##_f32, T = double / name##_f64, and the same
 * with an _avx2 suffix inside a target("avx2,fma") region.
 *
 * Layouts: NCHW is x[n][c][s] (channel c owns N contiguous segments of S values);
 * NHWC is x[m][c] (channels innermost, M rows). Sums are taken of (x - pivot) in T lanes over
 * short blocks and flushed into double, so long channels and large common offsets keep
 * their precision (a float lane never holds more than BLOCK / VL terms of a plane, or ROWBLOCK
 * rows of a channel).
 */

/* ------------------------------------------------------------------ activation
 * Scalar versions (tails of vector loops, rows of a few channels) select with bit masks: as
 * `?:` the compiler kept a branch, mispredicted for every other value of real data. */
static inline T SFX(sel)(int cond, T a, T b) {
    ivec_t m = -(ivec_t)(cond != 0), ia, ib;
    memcpy(&ia, &a, sizeof a);
    memcpy(&ib, &b, sizeof b);
    ia = (ia & m) | (ib & ~m);
    memcpy(&a, &ia, sizeof a);
    return a;
}

static inline T SFX(act_fwd)(T v, int act, T slope) {
    if (act == ACT_RELU) return SFX(sel)(v > (T)0, v, (T)0);
    if (act == ACT_LEAKY) return SFX(sel)(v > (T)0, v, v * slope);
    return v;
}

/* derivative factor of the activation at pre-activation v */
static inline T SFX(act_grad)(T v, int act, T slope) {
    if (act == ACT_RELU) return SFX(sel)(v > (T)0, (T)1, (T)0);
    if (act == ACT_LEAKY) return SFX(sel)(v > (T)0, (T)1, slope);
    return (T)1;
}

/* ------------------------------------------------------------------ sums */
/* Explicit SIMD vectors (GCC/Clang vector extensions) of 32 bytes: one AVX register in the
 * AVX2 build of these kernels, two SSE registers in the baseline build. */
typedef T SFX(vec) __attribute__((vector_size(32)));
typedef ivec_t SFX(ivec) __attribute__((vector_size(32)));
#define VL ((int64_t)(32 / sizeof(T)))
#define STEP (4 * VL)

static inline SFX(vec) SFX(vload)(const T *p) {
    SFX(vec) v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* the lanes' sum in double, as a tree (a short dependency chain: it runs once per plane) */
static inline double SFX(vsum)(SFX(vec) v) {
    double t[VL];
    for (int64_t l = 0; l < VL; l++) t[l] = (double)v[l];
    for (int64_t w = VL / 2; w >= 1; w /= 2)
        for (int64_t l = 0; l < w; l++) t[l] += t[l + w];
    return t[0];
}

/* o[l] += v[l] for the VL lanes (into double) */
static inline void SFX(vflush)(double *restrict o, SFX(vec) v) {
    for (int64_t l = 0; l < VL; l++) o[l] += v[l];
}

/* NHWC sums of columns col.. into their channels' sums (see colmap). */
static inline void SFX(vflush_to)(double *restrict o, int64_t col, SFX(vec) v, colmap cm) {
    if (cm.id) {
        SFX(vflush)(o + col, v);
        return;
    }
    for (int64_t l = 0; l < VL; l++) o[((col + l) / cm.f) % cm.nc] += v[l];
}

/* o[channel of column c0 + c] += a[c] for c < W (a stepped channel index: no division per
 * column) */
static inline void SFX(flush_cols)(double *restrict o, const T *restrict a, int64_t c0,
                                   int64_t W, colmap cm) {
    if (cm.id) {
        for (int64_t c = 0; c < W; c++) o[c0 + c] += a[c];
        return;
    }
    int64_t ch = (c0 / cm.f) % cm.nc, j = c0 % cm.f;
    for (int64_t c = 0; c < W; c++) {
        o[ch] += a[c];
        if (++j == cm.f) {
            j = 0;
            if (++ch == cm.nc) ch = 0;
        }
    }
}

/* activation derivative as a vector: 1 where pre > 0, else 0 (relu) or slope (leaky) */
static inline SFX(vec) SFX(vgrad)(SFX(vec) pre, int act, SFX(vec) slope) {
    SFX(vec) zero = {0}, one = zero + (T)1;
    SFX(ivec) m = pre > zero;
    if (act == ACT_RELU) return (SFX(vec))((SFX(ivec))one & m);
    if (act == ACT_LEAKY) /* a select: exactly 1 or slope, as act_grad */
        return (SFX(vec))(((SFX(ivec))one & m) | ((SFX(ivec))slope & ~m));
    return one;
}

/* Add sum(x - piv) and sum((x - piv)^2) over one contiguous plane of S values (NCHW). Each
 * block of at most BLOCK values is summed in T vectors (four-way, then one vector at a time)
 * and flushed into double once: short planes pay one horizontal sum per quantity. */
static void SFX(sums_plane)(const T *restrict p, int64_t S, T piv, double *o1, double *o2) {
    SFX(vec) zero = {0}, pv = zero + piv;
    double d1 = 0.0, d2 = 0.0;
    int64_t i = 0;
    while (S - i >= VL) {
        int64_t end = i + (S - i < BLOCK ? S - i : BLOCK) / VL * VL, k = i;
        SFX(vec) a0 = zero, a1 = zero, a2 = zero, a3 = zero;
        SFX(vec) q0 = zero, q1 = zero, q2 = zero, q3 = zero;
        for (; k + STEP <= end; k += STEP) {
            SFX(vec) e0 = SFX(vload)(p + k) - pv, e1 = SFX(vload)(p + k + VL) - pv;
            SFX(vec) e2 = SFX(vload)(p + k + 2 * VL) - pv, e3 = SFX(vload)(p + k + 3 * VL) - pv;
            a0 += e0; a1 += e1; a2 += e2; a3 += e3;
            q0 += e0 * e0; q1 += e1 * e1; q2 += e2 * e2; q3 += e3 * e3;
        }
        for (; k < end; k += VL) {
            SFX(vec) e = SFX(vload)(p + k) - pv;
            a0 += e;
            q0 += e * e;
        }
        /* the four partial vectors hold at most BLOCK / VL terms per lane together */
        d1 += SFX(vsum)((a0 + a1) + (a2 + a3));
        d2 += SFX(vsum)((q0 + q1) + (q2 + q3));
        i = end;
    }
    for (; i < S; i++) {
        double d = (double)(p[i] - piv);
        d1 += d;
        d2 += d * d;
    }
    *o1 += d1;
    *o2 += d2;
}

/* ------------------------------------------------------------------ runs of short planes
 * A plane of tens of values (4x4 to 16x16 maps) is a few vectors; two horizontal sums into
 * double per plane cost as much as the plane's arithmetic. Over a run of planes (plane p of
 * channel p % C) each plane's vector sums go instead into per-channel T vectors `acc`, which
 * are flushed into double (one horizontal sum) before any lane holds more than BLOCK / VL
 * terms, the same bound as within a plane. A plane's last S % VL values go into lane 0. */

/* Terms one plane adds to a lane, at most, and planes per flush. */
static inline int64_t SFX(run_cap)(int64_t S) {
    int64_t per = S / VL + S % VL;
    int64_t cap = (BLOCK / VL) / (per ? per : 1);
    return cap < 1 ? 1 : cap;
}

/* T values of scratch for runs of planes of S values over C channels on `nt` threads: per
 * thread 4 C vectors and C counters (an int32 fits in a T); 0 when runs do not apply (long
 * planes, or more channels than keep the vectors near the core). */
#define RUN_BYTES ((int64_t)256 << 10)
static inline int64_t SFX(run_scratch)(int64_t C, int64_t S, int nt) {
    if (!plane_runs || S >= BLOCK / 2 || 4 * C * VL * (int64_t)sizeof(T) > RUN_BYTES) return 0;
    return nt * (4 * C * VL + C);
}

/* the vector width, for the drivers (bn_drivers.h comes after VL is undefined) */
static inline int64_t SFX(vlen)(void) { return VL; }

/* thread th's vectors and counters in that scratch */
static inline T *SFX(run_acc)(T *run, int64_t C, int th) { return run + th * 4 * C * VL; }
static inline int32_t *SFX(run_cnt)(T *run, int64_t C, int nt, int th) {
    return (int32_t *)(run + nt * 4 * C * VL) + th * C;
}

/* acc[c] += v (a T vector in an array of T) */
static inline void SFX(vacc)(T *restrict acc, SFX(vec) v) {
    SFX(vec) t = SFX(vload)(acc) + v;
    memcpy(acc, &t, sizeof t);
}

/* o[c] += the lanes of acc (VL values), then acc = 0 */
static inline void SFX(vdrain)(double *restrict o, T *restrict acc) {
    *o += SFX(vsum)(SFX(vload)(acc));
    memset(acc, 0, VL * sizeof(T));
}

/* sums of (x - piv) and (x - piv)^2 over planes [p0, p1) of S values, p0 of channel c0, into
 * o1/o2; `acc` holds 2 C VL values and `cnt` C counters of scratch. */
static void SFX(sums_run)(const T *restrict x, int64_t p0, int64_t p1, int64_t C, int64_t S,
                          const T *restrict piv, double *restrict o1, double *restrict o2,
                          T *restrict acc, int32_t *restrict cnt) {
    const int64_t sv = S / VL * VL, cap = SFX(run_cap)(S);
    SFX(vec) zero = {0};
    memset(acc, 0, (size_t)(2 * C * VL) * sizeof(T));
    memset(cnt, 0, (size_t)C * sizeof(int32_t));
    for (int64_t p = p0, c = p0 % C; p < p1; p++, c = c + 1 == C ? 0 : c + 1) {
        const T *restrict q = x + p * S;
        SFX(vec) pv = zero + piv[c], a0 = zero, a1 = zero, s0 = zero, s1 = zero;
        int64_t k = 0;
        for (; k + 2 * VL <= sv; k += 2 * VL) {
            SFX(vec) e0 = SFX(vload)(q + k) - pv, e1 = SFX(vload)(q + k + VL) - pv;
            a0 += e0;
            a1 += e1;
            s0 += e0 * e0;
            s1 += e1 * e1;
        }
        for (; k < sv; k += VL) {
            SFX(vec) e = SFX(vload)(q + k) - pv;
            a0 += e;
            s0 += e * e;
        }
        for (; k < S; k++) {
            T d = q[k] - piv[c];
            a1[0] += d;
            s1[0] += d * d;
        }
        SFX(vacc)(acc + c * VL, a0 + a1);
        SFX(vacc)(acc + (C + c) * VL, s0 + s1);
        if (++cnt[c] == cap) {
            SFX(vdrain)(o1 + c, acc + c * VL);
            SFX(vdrain)(o2 + c, acc + (C + c) * VL);
            cnt[c] = 0;
        }
    }
    for (int64_t c = 0; c < C; c++)
        if (cnt[c]) {
            SFX(vdrain)(o1 + c, acc + c * VL);
            SFX(vdrain)(o2 + c, acc + (C + c) * VL);
        }
}

/* NHWC rows of at most four vectors (C = K VL): the whole row's sums stay in registers over
 * a block of rows, then go into double. Faster than the L1 array for such short rows. */
static inline __attribute__((always_inline)) void SFX(sums_cols)(
    const T *restrict x, int64_t C, int64_t m, int64_t end, int64_t c, const T *restrict piv,
    double *restrict o1, double *restrict o2, colmap cm, const int K) {
    SFX(vec) zero = {0}, pv[4], a[4], q[4];
    for (int k = 0; k < K; k++) {
        pv[k] = SFX(vload)(piv + c + k * VL);
        a[k] = zero;
        q[k] = zero;
    }
    for (int64_t r = m; r < end; r++) {
        const T *restrict p = x + r * C + c;
        for (int k = 0; k < K; k++) {
            SFX(vec) e = SFX(vload)(p + k * VL) - pv[k];
            a[k] += e;
            q[k] += e * e;
        }
    }
    for (int k = 0; k < K; k++) {
        SFX(vflush_to)(o1, c + k * VL, a[k], cm);
        SFX(vflush_to)(o2, c + k * VL, q[k], cm);
    }
}

/* Add per-channel sum(x - piv[c]) and sum((x - piv[c])^2) over rows [m0, m1) (NHWC): rows in
 * memory order, a block's sums in an L1-resident T array (see bred_rows in bn_impl_bwd.h).
 * Column c's sums go to its channel (see colmap). */
static void SFX(sums_nhwc)(const T *restrict x, int64_t C, int64_t m0, int64_t m1,
                           const T *restrict piv, double *restrict o1, double *restrict o2,
                           colmap cm) {
    if (C % VL == 0 && C <= 4 * VL) { /* short rows: in registers */
        for (int64_t m = m0; m < m1; m += ROWBLOCK) {
            int64_t end = m + ROWBLOCK < m1 ? m + ROWBLOCK : m1;
            switch (C / VL) {
            case 1: SFX(sums_cols)(x, C, m, end, 0, piv, o1, o2, cm, 1); break;
            case 2: SFX(sums_cols)(x, C, m, end, 0, piv, o1, o2, cm, 2); break;
            case 3: SFX(sums_cols)(x, C, m, end, 0, piv, o1, o2, cm, 3); break;
            default: SFX(sums_cols)(x, C, m, end, 0, piv, o1, o2, cm, 4);
            }
        }
        return;
    }
    T acc[2 * NHWC_WINDOW];
    for (int64_t m = m0; m < m1;) {
        int64_t end = m + ROWBLOCK < m1 ? m + ROWBLOCK : m1;
        for (int64_t c0 = 0; c0 < C; c0 += NHWC_WINDOW) {
            int64_t W = C - c0 < NHWC_WINDOW ? C - c0 : NHWC_WINDOW, wv = W / VL * VL;
            T *restrict a1 = acc, *restrict a2 = acc + W;
            const T *restrict pp = piv + c0;
            memset(acc, 0, (size_t)(2 * W) * sizeof(T));
            for (int64_t r = m; r < end; r++) {
                const T *restrict p = x + r * C + c0;
                for (int64_t c = 0; c < wv; c += VL) {
                    SFX(vec) e = SFX(vload)(p + c) - SFX(vload)(pp + c);
                    SFX(vec) s1 = SFX(vload)(a1 + c) + e, s2 = SFX(vload)(a2 + c) + e * e;
                    memcpy(a1 + c, &s1, sizeof s1);
                    memcpy(a2 + c, &s2, sizeof s2);
                }
                for (int64_t c = wv; c < W; c++) {
                    T d = p[c] - pp[c];
                    a1[c] += d;
                    a2[c] += d * d;
                }
            }
            SFX(flush_cols)(o1, a1, c0, W, cm);
            SFX(flush_cols)(o2, a2, c0, W, cm);
        }
        m = end;
    }
}

/* ------------------------------------------------------------------ streaming stores
 * Outputs much larger than the last-level cache are written with non-temporal stores (SSE2,
 * part of the x86-64 baseline; elsewhere plain stores): they skip the read-for-ownership of
 * every output line, a third of the memory traffic of a copy. */
static inline void SFX(vstream)(T *q, SFX(vec) v) {
#if defined(__AVX__)
    if (sizeof(T) == 4)
        _mm256_stream_ps((float *)q, (__m256)v);
    else
        _mm256_stream_pd((double *)q, (__m256d)v);
#elif defined(__SSE2__)
    __m128 lo, hi;
    memcpy(&lo, &v, 16);
    memcpy(&hi, (char *)&v + 16, 16);
    _mm_stream_ps((float *)q, lo);
    _mm_stream_ps((float *)q + 4, hi);
#else
    memcpy(q, &v, sizeof v);
#endif
}

/* the activation on a vector: relu -> v or 0, leaky -> v or v * slope */
static inline SFX(vec) SFX(vact)(SFX(vec) v, int act, SFX(vec) slope) {
    SFX(vec) zero = {0};
    SFX(ivec) m = v > zero;
    if (act == ACT_RELU) return (SFX(vec))((SFX(ivec))v & m);
    if (act == ACT_LEAKY) return (SFX(vec))(((SFX(ivec))v & m) | ((SFX(ivec))(v * slope) & ~m));
    return v;
}

/* Elements before q + i reaches a 32-byte boundary (the alignment streaming stores need). */
static inline int64_t SFX(head)(const T *q, int64_t S) {
    int64_t h = (int64_t)(((32 - ((uintptr_t)q & 31)) & 31) / sizeof(T));
    if (((uintptr_t)q % sizeof(T)) != 0) return S; /* misaligned element: no streaming */
    return h < S ? h : S;
}

/* ------------------------------------------------------------------ y = act((x - ctr) * scale + shift) */
/* The identity is left to the compiler's vectoriser; with an activation the loop is written in
 * vectors, since the compiler kept a branch per value for the activation there (measured:
 * leaky ReLU 3.4 ms against 0.12 ms for (128, 64, 11, 11), one mispredicted branch in two). */
static inline __attribute__((always_inline)) void SFX(apply_seg)(
    const T *restrict p, T *restrict q, int64_t S, T ctr, T sc, T sh, int act, T slope) {
    int64_t i = 0;
    if (act != ACT_ID) {
        SFX(vec) zero = {0}, cv = zero + ctr, sv = zero + sc, hv = zero + sh, lv = zero + slope;
        for (; i + VL <= S; i += VL) {
            SFX(vec) v = SFX(vact)((SFX(vload)(p + i) - cv) * sv + hv, act, lv);
            memcpy(q + i, &v, sizeof v);
        }
    }
    for (; i < S; i++) q[i] = SFX(act_fwd)((p[i] - ctr) * sc + sh, act, slope);
}

static inline __attribute__((always_inline)) void SFX(apply_stream)(
    const T *restrict p, T *restrict q, int64_t S, T ctr, T sc, T sh, int act, T slope) {
    SFX(vec) zero = {0}, cv = zero + ctr, sv = zero + sc, hv = zero + sh, lv = zero + slope;
    int64_t i = SFX(head)(q, S);
    SFX(apply_seg)(p, q, i, ctr, sc, sh, act, slope);
    for (; S - i >= VL; i += VL)
        SFX(vstream)(q + i, SFX(vact)((SFX(vload)(p + i) - cv) * sv + hv, act, lv));
    SFX(apply_seg)(p + i, q + i, S - i, ctr, sc, sh, act, slope);
}

static void SFX(apply_plane)(const T *x, T *y, int64_t S, T ctr, T sc, T sh, int act,
                             T slope, int stream) {
    if (stream) {
        switch (act) {
        case ACT_RELU: SFX(apply_stream)(x, y, S, ctr, sc, sh, ACT_RELU, slope); break;
        case ACT_LEAKY: SFX(apply_stream)(x, y, S, ctr, sc, sh, ACT_LEAKY, slope); break;
        default: SFX(apply_stream)(x, y, S, ctr, sc, sh, ACT_ID, slope);
        }
        return;
    }
    switch (act) {
    case ACT_RELU: SFX(apply_seg)(x, y, S, ctr, sc, sh, ACT_RELU, slope); break;
    case ACT_LEAKY: SFX(apply_seg)(x, y, S, ctr, sc, sh, ACT_LEAKY, slope); break;
    default: SFX(apply_seg)(x, y, S, ctr, sc, sh, ACT_ID, slope);
    }
}

/* act((x - ctr) sc + sh) for the vector of channels c.. of a row p (NHWC) */
static inline __attribute__((always_inline)) SFX(vec) SFX(apply_at)(
    const T *restrict p, const T *restrict ctr, const T *restrict sc, const T *restrict sh,
    int64_t c, int act, SFX(vec) lv) {
    SFX(vec) v = (SFX(vload)(p + c) - SFX(vload)(ctr + c)) * SFX(vload)(sc + c);
    return SFX(vact)(v + SFX(vload)(sh + c), act, lv);
}

/* Rows [m0, m1) of a window of Wd channels (row stride C). */
static inline __attribute__((always_inline)) void SFX(apply_rows)(
    const T *restrict x, T *restrict y, int64_t C, int64_t Wd, int64_t m0, int64_t m1,
    const T *restrict ctr, const T *restrict sc, const T *restrict sh, int act, T slope) {
    SFX(vec) zero = {0}, lv = zero + slope;
    for (int64_t m = m0; m < m1; m++) {
        const T *restrict p = x + m * C;
        T *restrict q = y + m * C;
        int64_t c = 0;
        if (act != ACT_ID) /* in vectors, as in apply_seg */
            for (; c + VL <= Wd; c += VL) {
                SFX(vec) v = SFX(apply_at)(p, ctr, sc, sh, c, act, lv);
                memcpy(q + c, &v, sizeof v);
            }
        for (; c < Wd; c++) q[c] = SFX(act_fwd)((p[c] - ctr[c]) * sc[c] + sh[c], act, slope);
    }
}

/* Streaming NHWC rows: needs C a multiple of the vector width and a 32-byte aligned output. */
static inline int SFX(rows_streamable)(const T *y, int64_t C) {
    return C % VL == 0 && ((uintptr_t)y & 31) == 0;
}

static inline __attribute__((always_inline)) void SFX(apply_rows_stream)(
    const T *restrict x, T *restrict y, int64_t C, int64_t Wd, int64_t m0, int64_t m1,
    const T *restrict ctr, const T *restrict sc, const T *restrict sh, int act, T slope) {
    SFX(vec) zero = {0}, lv = zero + slope;
    for (int64_t m = m0; m < m1; m++) {
        const T *restrict p = x + m * C;
        T *restrict q = y + m * C;
        for (int64_t c = 0; c < Wd; c += VL)
            SFX(vstream)(q + c, SFX(apply_at)(p, ctr, sc, sh, c, act, lv));
    }
}

/* Rows of more than NHWC_WINDOW channels go a block of rows and a window of channels at a
 * time, so the window's three coefficient vectors stay in L1 (measured on (256, 4096): the
 * whole rows ran at half the speed of rows of 256 channels). */
static void SFX(apply_nhwc)(const T *x, T *y, int64_t C, int64_t m0, int64_t m1, const T *ctr,
                            const T *sc, const T *sh, int act, T slope, int stream) {
    int st = stream && SFX(rows_streamable)(y, C);
    for (int64_t m = m0; m < m1; m += ROWBLOCK) {
        int64_t end = C <= NHWC_WINDOW ? m1 : (m + ROWBLOCK < m1 ? m + ROWBLOCK : m1);
        for (int64_t c0 = 0; c0 < C; c0 += NHWC_WINDOW) {
            int64_t Wd = C - c0 < NHWC_WINDOW ? C - c0 : NHWC_WINDOW;
            const T *xw = x + c0, *cw = ctr + c0, *sw = sc + c0, *hw = sh + c0;
            T *yw = y + c0;
#define APPLY(F, A) SFX(F)(xw, yw, C, Wd, m, end, cw, sw, hw, A, slope)
            if (st) {
                switch (act) {
                case ACT_RELU: APPLY(apply_rows_stream, ACT_RELU); break;
                case ACT_LEAKY: APPLY(apply_rows_stream, ACT_LEAKY); break;
                default: APPLY(apply_rows_stream, ACT_ID);
                }
            } else {
                switch (act) {
                case ACT_RELU: APPLY(apply_rows, ACT_RELU); break;
                case ACT_LEAKY: APPLY(apply_rows, ACT_LEAKY); break;
                default: APPLY(apply_rows, ACT_ID);
                }
            }
#undef APPLY
        }
        if (end == m1) break;
    }
}

/* the backward kernels follow in bn_impl_bwd.h (VL and STEP stay defined until its end) */
