/* Batch-norm kernels for bfloat16 activations beside float32 parameters and statistics (the
 * autocast case: convolutions in bf16, BN layers in float32). Included by bnlab_kernels.c
 * once per instruction set: B16(name) = name##_b16 (baseline) and name##_b16_avx2 inside the
 * target("avx2,fma") region.
 *
 * x, y, dy and dx are bf16 (uint16_t bit patterns); every (C,) tensor is float32. Values are
 * widened to float on load (exact), all arithmetic is float, sums are taken of (x - pivot)
 * over blocks of rows/values and flushed into double (as the float kernels do), and results
 * are rounded to bf16 to nearest-even on store (NaN stays NaN). Two layouts: rows of C
 * channels (channels-last, or (N, C) inputs) and NCHW planes of S values.
 *
 * Training covers the identity activation only (the layer's own step: BN then a separate
 * activation); the operator entry refuses other codes for bf16. */

#if B16_CVT
#include <immintrin.h>
#endif

static inline float B16(ld)(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t B16(st)(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u; /* quiet NaN, sign kept */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

/* B16_VL lanes (set by the includer: 8 for the baseline and AVX2 builds, 16 for AVX-512):
 * bf16 values widened to float and back, with GCC/Clang vector extensions. B16_CVT 1: the
 * AVX512-BF16 instruction rounds to bf16 (to nearest-even, NaN kept quiet, as below). */
typedef float B16(fv) __attribute__((vector_size(4 * B16_VL)));
typedef uint32_t B16(uv) __attribute__((vector_size(4 * B16_VL)));
typedef int32_t B16(iv) __attribute__((vector_size(4 * B16_VL)));
typedef uint16_t B16(hv) __attribute__((vector_size(2 * B16_VL)));

static inline B16(fv) B16(vld)(const uint16_t *p) {
    B16(hv) h;
    memcpy(&h, p, sizeof h);
    return (B16(fv))(__builtin_convertvector(h, B16(uv)) << 16);
}

static inline B16(fv) B16(vf)(const float *p) {
    B16(fv) f;
    memcpy(&f, p, sizeof f);
    return f;
}

static inline void B16(vst)(uint16_t *p, B16(fv) f) {
#if B16_CVT
    __m256bh h = _mm512_cvtneps_pbh((__m512)f);
    memcpy(p, &h, sizeof h);
#else
    B16(uv) u = (B16(uv))f;
    B16(uv) r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    B16(uv) nan = (B16(uv))((u & 0x7fffffffu) > 0x7f800000u);
    r = (r & ~nan) | (((u >> 16) | 0x40u) & nan);
    B16(hv) h = __builtin_convertvector(r, B16(hv));
    memcpy(p, &h, sizeof h);
#endif
}

/* the activation on a vector (a select, as the scalar versions) */
static inline __attribute__((always_inline)) B16(fv) B16(vact)(B16(fv) v, int act, float slope) {
    B16(fv) zero = {0};
    B16(iv) m = v > zero;
    if (act == ACT_RELU) return (B16(fv))((B16(iv))v & m);
    if (act == ACT_LEAKY) return (B16(fv))(((B16(iv))v & m) | ((B16(iv))(v * slope) & ~m));
    return v;
}

#ifndef B16_ROWS
#define B16_ROWS 64   /* rows of C summed in float before the flush into double */
#define B16_BLOCK 512 /* values of a plane summed in float before the flush */
#endif

/* the pivot per channel: the first value (widened), so (x - pivot) is small under an offset */
static void B16(pivots)(const uint16_t *x, int64_t C, int64_t S, int nhwc, float *piv) {
    for (int64_t c = 0; c < C; c++) piv[c] = B16(ld)(nhwc ? x[c] : x[c * S]);
}

/* Per-channel sum(x - piv) and sum((x - piv)^2) of rows [m0, m1), added into o1/o2: a block
 * of rows at a time, in columns of up to 4 vectors (32 channels) whose sums stay in
 * registers over the block, then go into double; the last C % 8 channels one at a time. */
static void B16(sums_rows)(const uint16_t *restrict x, int64_t C, int64_t m0, int64_t m1,
                           const float *restrict piv, double *restrict o1,
                           double *restrict o2) {
    const int64_t cv = C / B16_VL * B16_VL;
    for (int64_t m = m0; m < m1; m += B16_ROWS) {
        int64_t end = m + B16_ROWS < m1 ? m + B16_ROWS : m1;
        for (int64_t c0 = 0; c0 < cv; c0 += 4 * B16_VL) {
            int K = (int)((cv - c0) / B16_VL < 4 ? (cv - c0) / B16_VL : 4);
            B16(fv) zero = {0}, pv[4], a[4], q[4];
            for (int k = 0; k < 4; k++) {
                pv[k] = k < K ? B16(vf)(piv + c0 + k * B16_VL) : zero;
                a[k] = zero;
                q[k] = zero;
            }
            if (K == 4) {
                for (int64_t r = m; r < end; r++) {
                    const uint16_t *restrict p = x + r * C + c0;
                    for (int k = 0; k < 4; k++) {
                        B16(fv) e = B16(vld)(p + k * B16_VL) - pv[k];
                        a[k] += e;
                        q[k] += e * e;
                    }
                }
            } else {
                for (int64_t r = m; r < end; r++) {
                    const uint16_t *restrict p = x + r * C + c0;
                    for (int k = 0; k < K; k++) {
                        B16(fv) e = B16(vld)(p + k * B16_VL) - pv[k];
                        a[k] += e;
                        q[k] += e * e;
                    }
                }
            }
            for (int k = 0; k < K; k++)
                for (int l = 0; l < B16_VL; l++) {
                    o1[c0 + k * B16_VL + l] += a[k][l];
                    o2[c0 + k * B16_VL + l] += q[k][l];
                }
        }
        for (int64_t c = cv; c < C; c++) {
            float s1 = 0.0f, s2 = 0.0f;
            for (int64_t r = m; r < end; r++) {
                float e = B16(ld)(x[r * C + c]) - piv[c];
                s1 += e;
                s2 += e * e;
            }
            o1[c] += s1;
            o2[c] += s2;
        }
    }
}

/* sum(v - piv) and sum((v - piv)^2) over one plane of S values */
static void B16(sums_plane)(const uint16_t *restrict p, int64_t S, float piv, double *o1,
                            double *o2) {
    for (int64_t i = 0; i < S; i += B16_BLOCK) {
        int64_t end = i + B16_BLOCK < S ? i + B16_BLOCK : S;
        B16(fv) zero = {0}, v1 = zero, v2 = zero, pv = zero + piv;
        int64_t k = i;
        for (; k + B16_VL <= end; k += B16_VL) {
            B16(fv) e = B16(vld)(p + k) - pv;
            v1 += e;
            v2 += e * e;
        }
        double s1 = 0.0, s2 = 0.0;
        for (int l = 0; l < B16_VL; l++) {
            s1 += v1[l];
            s2 += v2[l];
        }
        for (; k < end; k++) {
            float e = B16(ld)(p[k]) - piv;
            s1 += e;
            s2 += (double)e * e;
        }
        *o1 += s1;
        *o2 += s2;
    }
}

/* Per-channel sums over the whole tensor into s1/s2 (C doubles each), deterministic for a
 * thread count: rows are split into nt ranges with partial sums added in range order; NCHW
 * channels are split between threads (each channel's planes summed in order). */
static int B16(stats)(const uint16_t *x, int64_t N, int64_t C, int64_t S, int nhwc,
                      const float *piv, double *s1, double *s2, int nt) {
    if (nhwc) {
        int64_t M = N;
        if (nt > M / B16_ROWS) nt = M / B16_ROWS > 1 ? (int)(M / B16_ROWS) : 1;
        double *part = calloc((size_t)(2 * C * nt), sizeof(double));
        if (!part) return -1;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int t = 0; t < nt; t++) {
            int64_t m0 = M * t / nt, m1 = M * (t + 1) / nt;
            B16(sums_rows)(x, C, m0, m1, piv, part + 2 * C * t, part + 2 * C * t + C);
        }
        for (int t = 0; t < nt; t++)
            for (int64_t c = 0; c < C; c++) {
                s1[c] += part[2 * C * t + c];
                s2[c] += part[2 * C * t + C + c];
            }
        free(part);
        return 0;
    }
    if (nt > C) nt = (int)C;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t c = 0; c < C; c++)
        for (int64_t n = 0; n < N; n++)
            B16(sums_plane)(x + (n * C + c) * S, S, piv[c], s1 + c, s2 + c);
    return 0;
}

/* rows [m0, m1) of C channels: y = act((x - ctr) sc + sh), rounded to bf16 */
static inline __attribute__((always_inline)) void B16(apply_rows)(
    const uint16_t *restrict x, uint16_t *restrict y, int64_t C, int64_t m0, int64_t m1,
    const float *restrict ctr, const float *restrict sc, const float *restrict sh,
    const int act, float slope) {
    for (int64_t m = m0; m < m1; m++) {
        const uint16_t *restrict p = x + m * C;
        uint16_t *restrict q = y + m * C;
        int64_t c = 0;
        for (; c + B16_VL <= C; c += B16_VL) {
            B16(fv) v = (B16(vld)(p + c) - B16(vf)(ctr + c)) * B16(vf)(sc + c) + B16(vf)(sh + c);
            B16(vst)(q + c, B16(vact)(v, act, slope));
        }
        for (; c < C; c++) {
            float v = (B16(ld)(p[c]) - ctr[c]) * sc[c] + sh[c];
            if (act == ACT_RELU) v = v > 0.0f ? v : 0.0f;
            else if (act == ACT_LEAKY) v = v > 0.0f ? v : v * slope;
            q[c] = B16(st)(v);
        }
    }
}

/* one plane of S values of one channel */
static inline __attribute__((always_inline)) void B16(apply_plane)(
    const uint16_t *restrict p, uint16_t *restrict q, int64_t S, float o, float a, float b,
    const int act, float slope) {
    B16(fv) zero = {0}, ov = zero + o, av = zero + a, bv = zero + b;
    int64_t k = 0;
    for (; k + B16_VL <= S; k += B16_VL)
        B16(vst)(q + k, B16(vact)((B16(vld)(p + k) - ov) * av + bv, act, slope));
    for (; k < S; k++) {
        float v = (B16(ld)(p[k]) - o) * a + b;
        if (act == ACT_RELU) v = v > 0.0f ? v : 0.0f;
        else if (act == ACT_LEAKY) v = v > 0.0f ? v : v * slope;
        q[k] = B16(st)(v);
    }
}

static inline __attribute__((always_inline)) void B16(apply_part)(const uint16_t *x, uint16_t *y, int64_t N, int64_t C, int64_t S,
                            int nhwc, const float *ctr, const float *sc, const float *sh,
                            const int act, float slope, int t, int nt) {
    if (nhwc) {
        B16(apply_rows)(x, y, C, N * t / nt, N * (t + 1) / nt, ctr, sc, sh, act, slope);
        return;
    }
    for (int64_t pl = N * C * t / nt; pl < N * C * (t + 1) / nt; pl++)
        B16(apply_plane)(x + pl * S, y + pl * S, S, ctr[pl % C], sc[pl % C], sh[pl % C], act,
                         slope);
}

/* y = act((x - ctr) sc + sh) per channel, rounded to bf16: rows (nhwc) or planes split
 * into nt equal ranges */
static void B16(apply)(const uint16_t *x, uint16_t *y, int64_t N, int64_t C, int64_t S,
                       int nhwc, const float *ctr, const float *sc, const float *sh, int act,
                       float slope, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int t = 0; t < nt; t++) {
        switch (act) {
        case ACT_RELU: B16(apply_part)(x, y, N, C, S, nhwc, ctr, sc, sh, ACT_RELU, slope, t, nt); break;
        case ACT_LEAKY: B16(apply_part)(x, y, N, C, S, nhwc, ctr, sc, sh, ACT_LEAKY, slope, t, nt); break;
        default: B16(apply_part)(x, y, N, C, S, nhwc, ctr, sc, sh, ACT_ID, slope, t, nt);
        }
    }
}

/* Training forward (identity activation): batch mean, biased variance and invstd in float,
 * y in bf16, and with rm/rv the running update (skipped when a statistic is NaN/Inf). N is
 * the number of rows (nhwc) or of samples (NCHW). delta_o receives the rounding of the mean
 * to float, for backward. Returns 1 when every statistic is finite, 0 when not (nothing
 * updated), -1 when scratch memory could not be allocated (nothing written). */
static int B16(train_fwd)(const uint16_t *x, uint16_t *y, int64_t N, int64_t C, int64_t S,
                          int nhwc, const float *w, const float *b, float *mean_o,
                          float *var_o, float *invstd_o, float *delta_o, double eps, float *rm,
                          float *rv, double factor, double unbias, int nt) {
    nt = threads_for(N * C * S, nt);
    float *piv = malloc((size_t)(3 * C) * sizeof(float));
    double *s = calloc((size_t)(2 * C), sizeof(double));
    if (!piv || !s) {
        free(piv);
        free(s);
        return -1;
    }
    float *sc = piv + C, *sh = piv + 2 * C;
    B16(pivots)(x, C, S, nhwc, piv);
    if (B16(stats)(x, N, C, S, nhwc, piv, s, s + C, nt) < 0) {
        free(piv);
        free(s);
        return -1;
    }
    double n = (double)N * (double)S;
    int finite = 1;
    for (int64_t c = 0; c < C; c++) {
        double m1 = s[c] / n, var = s[C + c] / n - m1 * m1;
        if (var < 0) var = 0;
        double mean = (double)piv[c] + m1;
        float invstd = (float)(1.0 / sqrt(var + eps)), center = (float)mean;
        mean_o[c] = center;
        var_o[c] = (float)var;
        invstd_o[c] = invstd;
        if (delta_o) delta_o[c] = (float)(mean - (double)center);
        sc[c] = (float)((w ? (double)w[c] : 1.0) * (double)invstd);
        /* the rounding of the mean to float folded into the shift, as the float kernels do */
        sh[c] = (float)((b ? (double)b[c] : 0.0) - (mean - (double)center) * (double)sc[c]);
        if (!isfinite(mean_o[c]) || !isfinite(var_o[c])) finite = 0;
    }
    B16(apply)(x, y, N, C, S, nhwc, mean_o, sc, sh, ACT_ID, 0.0f, nt);
    if (finite && rm && rv)
        for (int64_t c = 0; c < C; c++) {
            rm[c] = (float)((double)rm[c] + factor * ((double)mean_o[c] - (double)rm[c]));
            rv[c] = (float)((double)rv[c] + factor * ((double)var_o[c] * unbias - (double)rv[c]));
        }
    free(piv);
    free(s);
    return finite;
}

/* Evaluation forward: y = act((x - mean) invstd w + b); with eps >= 0 `invstd` holds the
 * variance (invstd = 1 / sqrt(var + eps) in double). Returns 0, or -1 out of memory. */
static int B16(eval_fwd)(const uint16_t *x, uint16_t *y, int64_t N, int64_t C, int64_t S,
                         int nhwc, const float *mean, const float *invstd, const float *w,
                         const float *b, int act, float slope, double eps, int nt) {
    float *sc = malloc((size_t)(2 * C) * sizeof(float));
    if (!sc) return -1;
    float *sh = sc + C;
    for (int64_t c = 0; c < C; c++) {
        double r = !(eps < 0) ? 1.0 / sqrt((double)invstd[c] + eps) : (double)invstd[c];
        sc[c] = (float)((w ? (double)w[c] : 1.0) * r);
        sh[c] = b ? b[c] : 0.0f;
    }
    B16(apply)(x, y, N, C, S, nhwc, mean, sc, sh, act, slope, threads_for(N * C * S, nt));
    free(sc);
    return 0;
}

/* Per-channel sum(dy) and sum(dy (x - mean)) of rows [m0, m1), added into o1/o2: blocks of
 * rows in columns of up to 4 vectors held in registers, as B16(sums_rows) */
static void B16(bsums_rows)(const uint16_t *restrict dy, const uint16_t *restrict x, int64_t C,
                            int64_t m0, int64_t m1, const float *restrict mean,
                            double *restrict o1, double *restrict o2) {
    const int64_t cv = C / B16_VL * B16_VL;
    for (int64_t m = m0; m < m1; m += B16_ROWS) {
        int64_t end = m + B16_ROWS < m1 ? m + B16_ROWS : m1;
        for (int64_t c0 = 0; c0 < cv; c0 += 4 * B16_VL) {
            int K = (int)((cv - c0) / B16_VL < 4 ? (cv - c0) / B16_VL : 4);
            B16(fv) zero = {0}, mv[4], a[4], q[4];
            for (int k = 0; k < 4; k++) {
                mv[k] = k < K ? B16(vf)(mean + c0 + k * B16_VL) : zero;
                a[k] = zero;
                q[k] = zero;
            }
#define B16_BSUMS(KK)                                                                           \
    for (int64_t r = m; r < end; r++) {                                                       \
        const uint16_t *restrict g = dy + r * C + c0, *restrict p = x + r * C + c0;           \
        for (int k = 0; k < (KK); k++) {                                                      \
            B16(fv) d = B16(vld)(g + k * B16_VL);                                             \
            a[k] += d;                                                                        \
            q[k] += d * (B16(vld)(p + k * B16_VL) - mv[k]);                                   \
        }                                                                                     \
    }
            if (K == 4) {
                B16_BSUMS(4)
            } else {
                B16_BSUMS(K)
            }
#undef B16_BSUMS
            for (int k = 0; k < K; k++)
                for (int l = 0; l < B16_VL; l++) {
                    o1[c0 + k * B16_VL + l] += a[k][l];
                    o2[c0 + k * B16_VL + l] += q[k][l];
                }
        }
        for (int64_t c = cv; c < C; c++) {
            float s1 = 0.0f, s2 = 0.0f;
            for (int64_t r = m; r < end; r++) {
                float d = B16(ld)(dy[r * C + c]);
                s1 += d;
                s2 += d * (B16(ld)(x[r * C + c]) - mean[c]);
            }
            o1[c] += s1;
            o2[c] += s2;
        }
    }
}

static void B16(bsums_plane)(const uint16_t *restrict g, const uint16_t *restrict p, int64_t S,
                             float mean, double *o1, double *o2) {
    for (int64_t i = 0; i < S; i += B16_BLOCK) {
        int64_t end = i + B16_BLOCK < S ? i + B16_BLOCK : S;
        B16(fv) zero = {0}, v1 = zero, v2 = zero, mv = zero + mean;
        int64_t k = i;
        for (; k + B16_VL <= end; k += B16_VL) {
            B16(fv) d = B16(vld)(g + k);
            v1 += d;
            v2 += d * (B16(vld)(p + k) - mv);
        }
        double s1 = 0.0, s2 = 0.0;
        for (int l = 0; l < B16_VL; l++) {
            s1 += v1[l];
            s2 += v2[l];
        }
        for (; k < end; k++) {
            float d = B16(ld)(g[k]);
            s1 += d;
            s2 += (double)d * (B16(ld)(p[k]) - mean);
        }
        *o1 += s1;
        *o2 += s2;
    }
}

/* dx = k dy + A (x - mean) + B per channel, rounded to bf16 */
static void B16(bapply)(const uint16_t *dy, const uint16_t *x, uint16_t *dx, int64_t N,
                        int64_t C, int64_t S, int nhwc, const float *mean, const float *k,
                        const float *A, const float *B, int nt) {
    if (nhwc) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t m = 0; m < N; m++) {
            const uint16_t *restrict g = dy + m * C, *restrict p = x + m * C;
            uint16_t *restrict q = dx + m * C;
            int64_t c = 0;
            for (; c + B16_VL <= C; c += B16_VL)
                B16(vst)(q + c, B16(vld)(g + c) * B16(vf)(k + c) +
                                    (B16(vld)(p + c) - B16(vf)(mean + c)) * B16(vf)(A + c) +
                                    B16(vf)(B + c));
            for (; c < C; c++)
                q[c] = B16(st)(B16(ld)(g[c]) * k[c] + (B16(ld)(p[c]) - mean[c]) * A[c] + B[c]);
        }
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t pl = 0; pl < N * C; pl++) {
        const uint16_t *restrict g = dy + pl * S, *restrict p = x + pl * S;
        uint16_t *restrict q = dx + pl * S;
        float kk = k[pl % C], a = A[pl % C], b = B[pl % C], o = mean[pl % C];
        B16(fv) zero = {0}, kv = zero + kk, av = zero + a, bv = zero + b, ov = zero + o;
        int64_t i = 0;
        for (; i + B16_VL <= S; i += B16_VL)
            B16(vst)(q + i, B16(vld)(g + i) * kv + (B16(vld)(p + i) - ov) * av + bv);
        for (; i < S; i++)
            q[i] = B16(st)(B16(ld)(g[i]) * kk + (B16(ld)(p[i]) - o) * a + b);
    }
}

/* Backward of the identity activation, training (train = 1: through the batch statistics
 * mean, invstd, delta of the forward) or evaluation (fixed statistics). dw = sum(dy xhat),
 * db = sum(dy); dx (when not NULL) in bf16. Returns 0, or -1 out of memory. */
static int B16(backward)(const uint16_t *dy, const uint16_t *x, uint16_t *dx, int64_t N,
                         int64_t C, int64_t S, int nhwc, const float *mean, const float *invstd,
                         const float *delta, const float *w, float *dw, float *db, int train,
                         int nt) {
    nt = threads_for(N * C * S, nt);
    double *s = calloc((size_t)(2 * C), sizeof(double));
    float *co = malloc((size_t)(3 * C) * sizeof(float));
    if (!s || !co) {
        free(s);
        free(co);
        return -1;
    }
    if (nhwc) {
        int t_max = N / B16_ROWS > 1 ? (int)(N / B16_ROWS) : 1, ntr = nt < t_max ? nt : t_max;
        double *part = calloc((size_t)(2 * C * ntr), sizeof(double));
        if (!part) {
            free(s);
            free(co);
            return -1;
        }
#pragma omp parallel for num_threads(ntr) schedule(static)
        for (int t = 0; t < ntr; t++)
            B16(bsums_rows)(dy, x, C, N * t / ntr, N * (t + 1) / ntr, mean, part + 2 * C * t,
                            part + 2 * C * t + C);
        for (int t = 0; t < ntr; t++)
            for (int64_t c = 0; c < C; c++) {
                s[c] += part[2 * C * t + c];
                s[C + c] += part[2 * C * t + C + c];
            }
        free(part);
    } else {
        int ntc = nt < C ? nt : (int)C;
#pragma omp parallel for num_threads(ntc) schedule(static)
        for (int64_t c = 0; c < C; c++)
            for (int64_t n = 0; n < N; n++)
                B16(bsums_plane)(dy + (n * C + c) * S, x + (n * C + c) * S, S, mean[c], s + c,
                                 s + C + c);
    }
    double n = (double)N * (double)S;
    float *k = co, *A = co + C, *B = co + 2 * C;
    for (int64_t c = 0; c < C; c++) {
        double sg = s[c], dl = train && delta ? (double)delta[c] : 0.0;
        double sgx = s[C + c] - dl * sg; /* sum(dy (x - the exact mean)) */
        double r = (double)invstd[c], kk = (w ? (double)w[c] : 1.0) * r;
        if (dw) dw[c] = (float)(sgx * r);
        if (db) db[c] = (float)sg;
        k[c] = (float)kk;
        if (train) {
            double a = -kk * r * r * sgx / n;
            A[c] = (float)a;
            B[c] = (float)(-kk * sg / n - a * dl);
        } else {
            A[c] = 0.0f;
            B[c] = 0.0f;
        }
    }
    if (dx) B16(bapply)(dy, x, dx, N, C, S, nhwc, mean, k, A, B, nt);
    free(s);
    free(co);
    return 0;
}
