/* bnlab's CPU batch-norm kernels on contiguous buffers (float32 and float64), in C.
 *
 * Tensors never reach this file: the torch operators of bnlab_ops.cpp (torch.ops.bnlab.*,
 * built against torch's stable ABI) check them and call the bnlab_* entry points below with
 * their data pointers, sizes and the thread count (torch's intra-op threads); the kernels run
 * on an OpenMP team of exactly that size. The same shared object is also the small Python
 * module bnlab.kernels._native (limited C API of CPython 3.11, so one abi3 wheel serves 3.11
 * and later), which only holds knobs, facts and the buffer cache's statistics. The inner loops
 * are written for the compiler's auto-vectoriser (independent T lanes, no -march flags).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; } /* built without OpenMP: one thread */
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

/* ACT_INV_LEAKY is backward-only: its "x" is the output y = leaky_relu(z) of in-place activated
 * BN, inverted in the kernel (bn_impl_bwd.h) */
enum { ACT_ID = 0, ACT_RELU = 1, ACT_LEAKY = 2, ACT_INV_LEAKY = 3 };

#define BLOCK 512     /* values per lane block before the lanes are flushed into double */
#define ROWBLOCK 64   /* NHWC rows accumulated in T registers before the flush into double */
#define MIN_PER_THREAD 16384
#define NHWC_WINDOW 1024 /* channels per NHWC accumulation window (4 x 4 KiB of floats) */
/* NCHW planes shorter than WIDE_PLANE_BYTES (a cache line: less than two vectors) run as rows
 * of C * S columns (see bn_drivers.h) when C * S is at most wide_columns (WIDE_COLUMNS).
 * Measured on 2 threads: 2x2 and 3x3 planes 1.2-3.5x faster that way; 4x4 to 7x7 planes,
 * whose vectors the plane path fills, up to 3x slower. */
#define WIDE_PLANE_BYTES 64
#define WIDE_COLUMNS 32768
/* channels-last rows of C channels, C not a multiple of the vector width, run VL rows at a time
 * as rows of VL C columns (see bn_drivers.h) up to TILE_COLUMNS columns */
#define TILE_COLUMNS 4096
static int64_t tile_columns = TILE_COLUMNS;
static int64_t wide_columns = WIDE_COLUMNS;
static int plane_runs = 1; /* runs of short planes (bn_impl.h); 0: plane by plane */
/* NCHW tensors run channel by channel (see bn_drivers.h) when one channel of one tensor,
 * N S values, takes at most cmajor_bytes (CMAJOR_BYTES; 0: never), its planes at least
 * CMAJOR_PLANE_BYTES, and there are at least CMAJOR_CHANNELS_PER_THREAD channels a thread. */
#define CMAJOR_BYTES ((int64_t)4 << 20)
#define CMAJOR_PLANE_BYTES 1024
#define CMAJOR_CHANNELS_PER_THREAD 4
static int64_t cmajor_bytes = CMAJOR_BYTES;

/* Threads worth starting for `work` values: small tensors run on the calling thread. */
static int threads_for(int64_t work, int nt) {
    int64_t useful = work / MIN_PER_THREAD;
    if (nt < 1) nt = 1;
    if (useful < nt) nt = useful < 1 ? 1 : (int)useful;
    return nt;
}

/* Outputs of at least STREAM_BYTES (about the last-level cache of a server core complex) are
 * written with non-temporal stores; BNLAB_STREAM_BYTES overrides the threshold (0: always,
 * -1: never), read once. */
#define STREAM_BYTES ((int64_t)24 << 20)
static int64_t stream_bytes = -2;

static int streamed(int64_t bytes) {
    if (stream_bytes == -2) {
        const char *e = getenv("BNLAB_STREAM_BYTES");
        stream_bytes = e && *e ? atoll(e) : STREAM_BYTES;
    }
    return stream_bytes >= 0 && bytes >= stream_bytes;
}

/* Make a thread's streaming stores visible before the team's barrier. */
static inline void stream_fence(void) {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

/* Ranges of rows (NHWC rows or NCHW planes) the work is cut into: a few per thread. The
 * per-range partial sums (up to 4 per channel) need PART_DOUBLES(C, nt) doubles of scratch. */
#define TASKS_PER_THREAD 4
#define PART_DOUBLES(C, nt) (4 * (C) * (int64_t)TASKS_PER_THREAD * (nt))
static int64_t row_tasks(int64_t rows, int64_t C, int nhwc, int nt) {
    int64_t nk = (int64_t)nt * TASKS_PER_THREAD;
    int64_t most = rows;
    if (nhwc) { /* whole blocks of rows, or fewer rows when they are wide */
        int64_t by_work = rows * C / MIN_PER_THREAD;
        most = rows / ROWBLOCK;
        if (by_work > most) most = by_work < rows ? by_work : rows;
    }
    if (nk > most) nk = most;
    return nk < 1 ? 1 : nk;
}

/* Which channel an NHWC column's sums go to: the column itself (id), or (col / f) % nc (the
 * views of bn_drivers.h: short NCHW planes as rows of C * S columns, f = S; channels-last
 * rows of a few channels tiled into rows of VL C columns, f = 1). */
typedef struct {
    int64_t f, nc;
    int id;
} colmap;
static inline colmap colmap_id(int64_t C) {
    colmap m = {1, C, 1};
    return m;
}
static inline colmap colmap_of(int64_t f, int64_t nc) {
    colmap m = {f, nc, 0};
    return m;
}

/* Each element type is compiled twice: for the baseline instruction set of the target (SSE2
 * on x86-64) and, on x86-64 with GCC, for AVX2 + FMA. The AVX2 build runs when the CPU
 * has both (checked once at import; BNLAB_SIMD=baseline forces the baseline). No -march flag:
 * the same binary runs on every x86-64 machine. */
#define T float
#define ivec_t int32_t
#define SFX(name) name##_f32
#include "bn_instance.h"

#define T double
#define ivec_t int64_t
#define SFX(name) name##_f64
#include "bn_instance.h"

#define B16(name) name##_b16
#define B16_VL 8
#define B16_CVT 0
#include "bn_bf16.h"
#undef B16
#undef B16_VL
#undef B16_CVT

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) /* clang: no target pragma */
#define BNLAB_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define T float
#define ivec_t int32_t
#define SFX(name) name##_f32_avx2
#include "bn_instance.h"

#define T double
#define ivec_t int64_t
#define SFX(name) name##_f64_avx2
#include "bn_instance.h"

#define B16(name) name##_b16_avx2
#define B16_VL 8
#define B16_CVT 0
#include "bn_bf16.h"
#undef B16
#undef B16_VL
#undef B16_CVT
#pragma GCC pop_options

/* bf16 on AVX-512 with the BF16 conversion (Cooper Lake, Sapphire Rapids, Zen 4 and later) */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
#define B16(name) name##_b16_avx512
#define B16_VL 16
#define B16_CVT 1
#include "bn_bf16.h"
#undef B16
#undef B16_VL
#undef B16_CVT
#pragma GCC pop_options
#else
#define BNLAB_AVX2 0
#endif

/* 1 when the AVX2 build runs (decided once, at import); use_avx512bf16 likewise for the
 * bf16 kernels */
static int use_avx2 = 0;
static int use_avx512bf16 = 0;

static void choose_simd(void) {
#if BNLAB_AVX2
    const char *e = getenv("BNLAB_SIMD");
    int forced_baseline = e && strcmp(e, "baseline") == 0;
    __builtin_cpu_init();
    use_avx2 = !forced_baseline && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    use_avx512bf16 = use_avx2 && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#endif
}

#if BNLAB_AVX2
#define DISPATCH(fn, sfx, ...) (use_avx2 ? fn##_##sfx##_avx2(__VA_ARGS__) : fn##_##sfx(__VA_ARGS__))
#define DISPATCH_B16(fn, ...)                                                                  \
    (use_avx512bf16 ? fn##_b16_avx512(__VA_ARGS__)                                             \
                    : use_avx2 ? fn##_b16_avx2(__VA_ARGS__) : fn##_b16(__VA_ARGS__))
#else
#define DISPATCH_B16(fn, ...) fn##_b16(__VA_ARGS__)
#define DISPATCH(fn, sfx, ...) fn##_##sfx(__VA_ARGS__)
#endif

/* ------------------------------------------------------------------ Python bindings */
#include "bn_buffers.h"

/* ------------------------------------------------------------------ C entry points */
/* Called by the torch operators of bnlab_ops.cpp, which check every tensor (dtype, device,
 * shape, strides) before passing its data pointer here; these check only the codes. Each
 * returns what its kernel returns (-1: out of scratch memory) or -2 for a bad code. */
static int codes_ok(int dtype, int64_t N, int64_t C, int64_t S, int act, int act_max) {
    return (dtype == 0 || dtype == 1 || dtype == 2) && N >= 1 && C >= 1 && S >= 1 && act >= ACT_ID &&
           act <= act_max;
}

int bnlab_train_fwd(int dtype, int nhwc, const void *x, void *y, int64_t N, int64_t C, int64_t S,
                    const void *w, const void *b, void *mean, void *var, void *invstd,
                    void *delta, void *thr, double eps, int act, double slope, void *rm,
                    void *rv, double factor, double unbias, int nt) {
    if (!codes_ok(dtype, N, C, S, act, ACT_LEAKY)) return -2;
    if (dtype == 2) /* bf16 x and y, float32 (C,) tensors: the identity only */
        return act != ACT_ID || thr
                   ? -2
                   : DISPATCH_B16(train_fwd, (const uint16_t *)x, (uint16_t *)y, N, C, S, nhwc,
                              (const float *)w, (const float *)b, (float *)mean, (float *)var,
                              (float *)invstd, (float *)delta, eps, (float *)rm, (float *)rv,
                              factor, unbias, nt);
    if (dtype == 0)
        return DISPATCH(train_fwd, f32, (const float *)x, (float *)y, N, C, S, nhwc,
                        (const float *)w, (const float *)b, (float *)mean, (float *)var,
                        (float *)invstd, (float *)delta, (float *)thr, eps, act, (float)slope,
                        (float *)rm, (float *)rv, factor, unbias, nt);
    return DISPATCH(train_fwd, f64, (const double *)x, (double *)y, N, C, S, nhwc,
                    (const double *)w, (const double *)b, (double *)mean, (double *)var,
                    (double *)invstd, (double *)delta, (double *)thr, eps, act, slope,
                    (double *)rm, (double *)rv, factor, unbias, nt);
}

int bnlab_eval_fwd(int dtype, int nhwc, const void *x, void *y, int64_t N, int64_t C, int64_t S,
                   const void *mean, const void *invstd, const void *w, const void *b, int act,
                   double slope, double eps, int nt) {
    if (!codes_ok(dtype, N, C, S, act, ACT_LEAKY)) return -2;
    if (dtype == 2)
        return DISPATCH_B16(eval_fwd, (const uint16_t *)x, (uint16_t *)y, N, C, S, nhwc,
                        (const float *)mean, (const float *)invstd, (const float *)w,
                        (const float *)b, act, (float)slope, eps, nt);
    if (dtype == 0)
        return DISPATCH(eval_fwd, f32, (const float *)x, (float *)y, N, C, S, nhwc,
                        (const float *)mean, (const float *)invstd, (const float *)w,
                        (const float *)b, act, (float)slope, eps, nt);
    return DISPATCH(eval_fwd, f64, (const double *)x, (double *)y, N, C, S, nhwc,
                    (const double *)mean, (const double *)invstd, (const double *)w,
                    (const double *)b, act, slope, eps, nt);
}

int bnlab_backward(int dtype, int nhwc, const void *dy, const void *x, void *dx, int64_t N,
                   int64_t C, int64_t S, const void *mean, const void *invstd, const void *delta,
                   const void *thr, const void *w, const void *b, const void *gmean,
                   const void *gvar, void *dw, void *db, double eps, int act, double slope,
                   int train, int nt) {
    if (!codes_ok(dtype, N, C, S, act, ACT_INV_LEAKY)) return -2;
    if ((!train || mean) && (!mean || !invstd)) return -2;
    if (dtype == 2) /* the identity, saved statistics, no gradient into them */
        return act != ACT_ID || thr || !mean || gmean || gvar
                   ? -2
                   : DISPATCH_B16(backward, (const uint16_t *)dy, (const uint16_t *)x,
                              (uint16_t *)dx, N, C, S, nhwc, (const float *)mean,
                              (const float *)invstd, (const float *)delta, (const float *)w,
                              (float *)dw, (float *)db, train, nt);
    if (dtype == 0)
        return DISPATCH(backward, f32, (const float *)dy, (const float *)x, (float *)dx, N, C, S,
                        nhwc, (const float *)mean, (const float *)invstd, (const float *)delta,
                        (const float *)thr, (const float *)w, (const float *)b,
                        (const float *)gmean, (const float *)gvar, (float *)dw, (float *)db, eps,
                        act, (float)slope, train, nt);
    return DISPATCH(backward, f64, (const double *)dy, (const double *)x, (double *)dx, N, C, S,
                    nhwc, (const double *)mean, (const double *)invstd, (const double *)delta,
                    (const double *)thr, (const double *)w, (const double *)b,
                    (const double *)gmean, (const double *)gvar, (double *)dw, (double *)db, eps,
                    act, slope, train, nt);
}

/* Masked BN (bn_masked.h): x (N, C, L) in NCL order (rows = 0) or as rows of C channels
 * (rows = 1, the (N, L, C) layout), m one byte per (n, l), nonzero where valid. */
static int masked_codes_ok(int dtype, int64_t N, int64_t C, int64_t L) {
    return (dtype == 0 || dtype == 1) && N >= 1 && C >= 1 && L >= 1;
}

/* Training forward: the statistics of the valid positions, and y when y is not NULL. */
int bnlab_masked_forward(int dtype, int rows, const void *x, const uint8_t *m, void *y, int64_t N,
                         int64_t C, int64_t L, const void *w, const void *b, double eps,
                         void *mean, void *var, void *delta, int nt) {
    if (!masked_codes_ok(dtype, N, C, L)) return -2;
    if (dtype == 0)
        return DISPATCH(masked_forward, f32, (const float *)x, m, (float *)y, N, C, L, rows,
                        (const float *)w, (const float *)b, eps, (float *)mean, (float *)var,
                        (float *)delta, nt);
    return DISPATCH(masked_forward, f64, (const double *)x, m, (double *)y, N, C, L, rows,
                    (const double *)w, (const double *)b, eps, (double *)mean, (double *)var,
                    (double *)delta, nt);
}

/* Training backward: sum(dy) and sum(dy (x - mean)) over the valid positions, and dx from
 * this batch's statistics when dx is not NULL. */
int bnlab_masked_backward(int dtype, int rows, const void *dy, const void *x, const uint8_t *m,
                          void *dx, int64_t N, int64_t C, int64_t L, const void *mean,
                          const void *delta, const void *invstd, const void *w, void *sdy,
                          void *sdx, int nt) {
    if (!masked_codes_ok(dtype, N, C, L) || !dy || !mean || !invstd) return -2;
    if (dtype == 0)
        return DISPATCH(masked_backward, f32, (const float *)dy, (const float *)x, m, (float *)dx,
                        N, C, L, rows, (const float *)mean, (const float *)delta,
                        (const float *)invstd, (const float *)w, (float *)sdy, (float *)sdx, nt);
    return DISPATCH(masked_backward, f64, (const double *)dy, (const double *)x, m, (double *)dx,
                    N, C, L, rows, (const double *)mean, (const double *)delta,
                    (const double *)invstd, (const double *)w, (double *)sdy, (double *)sdx, nt);
}

/* The normalised output (dy NULL: var is the variance, eps added) or the input gradient (var
 * is invstd; mdy, mdx the means of dy and dy (x - mean) over the valid positions). */
int bnlab_masked_affine(int dtype, int rows, const void *dy, const void *x, const uint8_t *m,
                        void *out, int64_t N, int64_t C, int64_t L, const void *mean,
                        const void *delta, const void *var, const void *w, const void *b,
                        const void *mdy, const void *mdx, double eps, int nt) {
    if (!masked_codes_ok(dtype, N, C, L) || !mean || !var || (dy && (!mdy || !mdx))) return -2;
    if (dtype == 0)
        return DISPATCH(masked_affine, f32, (const float *)dy, (const float *)x, m, (float *)out,
                        N, C, L, rows, (const float *)mean, (const float *)delta,
                        (const float *)var, (const float *)w, (const float *)b,
                        (const float *)mdy, (const float *)mdx, eps, nt);
    return DISPATCH(masked_affine, f64, (const double *)dy, (const double *)x, m, (double *)out,
                    N, C, L, rows, (const double *)mean, (const double *)delta,
                    (const double *)var, (const double *)w, (const double *)b,
                    (const double *)mdy, (const double *)mdx, eps, nt);
}

/* Output buffers for the operators (bn_buffers.h): a mapping of at least n bytes (NULL without
 * buffer support or on failure; *cap is what to give back), and its return when the tensor
 * that owned it is freed. */
void *bnlab_buffer_take(size_t n, size_t *cap) {
#if BNLAB_HAVE_BUFFERS
    pthread_mutex_lock(&cache_lock);
    mapping_t m = take_mapping(n);
    pthread_mutex_unlock(&cache_lock);
    *cap = m.cap;
    return m.ptr;
#else
    (void)n;
    *cap = 0;
    return NULL;
#endif
}

void bnlab_buffer_give(void *ptr, size_t cap) {
#if BNLAB_HAVE_BUFFERS
    mapping_t m = {ptr, cap};
    pthread_mutex_lock(&cache_lock);
    give_mapping(m);
    pthread_mutex_unlock(&cache_lock);
#else
    (void)ptr;
    (void)cap;
#endif
}

/* ------------------------------------------------------------------ Python module: knobs */
static PyObject *py_build_info(PyObject *self, PyObject *noargs) {
#ifdef _OPENMP
    int omp = _OPENMP;
#else
    int omp = 0;
#endif
    return Py_BuildValue("{s:i,s:i,s:s}", "openmp", omp, "block", BLOCK, "simd",
                         use_avx2 ? "avx2" : "baseline");
}

static PyObject *py_set_stream_bytes(PyObject *self, PyObject *args) {
    long long v;
    if (!PyArg_ParseTuple(args, "L", &v)) return NULL;
    streamed(0); /* reads the environment first, so the returned value is the one in force */
    long long previous = stream_bytes;
    stream_bytes = v < -1 ? -1 : v;
    return PyLong_FromLongLong(previous);
}

/* set a column limit of the layouts (negative: 0), returning the previous one */
static PyObject *set_columns(PyObject *args, int64_t *slot) {
    long long v;
    if (!PyArg_ParseTuple(args, "L", &v)) return NULL;
    long long previous = *slot;
    *slot = v < 0 ? 0 : v;
    return PyLong_FromLongLong(previous);
}

static PyObject *py_set_wide_columns(PyObject *self, PyObject *args) {
    return set_columns(args, &wide_columns);
}

static PyObject *py_set_plane_runs(PyObject *self, PyObject *args) {
    int v;
    if (!PyArg_ParseTuple(args, "p", &v)) return NULL;
    int previous = plane_runs;
    plane_runs = v;
    return PyBool_FromLong(previous);
}

static PyObject *py_set_tile_columns(PyObject *self, PyObject *args) {
    return set_columns(args, &tile_columns);
}

static PyObject *py_set_channel_major(PyObject *self, PyObject *args) {
    return set_columns(args, &cmajor_bytes);
}

static PyMethodDef methods[] = {
    {"set_tile_columns", py_set_tile_columns, METH_VARARGS,
     "set_tile_columns(n) -> previous: channels-last rows of C channels (C not a multiple of "
     "the vector width) run as rows of VL C columns when VL C <= n (0: never)"},
    {"set_channel_major", py_set_channel_major, METH_VARARGS,
     "set_channel_major(n) -> previous: NCHW tensors whose channels hold at most n bytes each "
     "run channel by channel, each channel's second pass reading it from cache (0: never)"},
    {"set_plane_runs", py_set_plane_runs, METH_VARARGS,
     "set_plane_runs(on) -> previous: NCHW sums over runs of short planes (False: plane by "
     "plane)"},
    {"set_wide_columns", py_set_wide_columns, METH_VARARGS,
     "set_wide_columns(n) -> previous: NCHW tensors with short planes and C * S <= n run as "
     "rows of C * S columns (0: never)"},
    {"set_stream_bytes", py_set_stream_bytes, METH_VARARGS,
     "set_stream_bytes(n) -> previous: outputs of >= n bytes use streaming stores (-1: never)"},
    {"build_info", py_build_info, METH_NOARGS, "build facts: OpenMP version, block, SIMD in use"},
#if BNLAB_HAVE_BUFFERS
    {"empty_cache", py_empty_cache, METH_NOARGS, "unmap every cached output buffer"},
    {"buffer_stats", py_buffer_stats, METH_NOARGS, "cache size, limit, hits and misses"},
    {"set_cache_limit", py_set_cache_limit, METH_VARARGS,
     "set_cache_limit(n) -> previous: keep at most n bytes of freed buffers (0: none)"},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_native", "knobs and facts of bnlab's compiled batch-norm kernels (the kernels are torch.ops.bnlab).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    choose_simd();
#if BNLAB_HAVE_BUFFERS
#endif
    return PyModule_Create(&moduledef);
}
