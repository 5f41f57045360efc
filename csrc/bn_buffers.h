/* Output buffers for the kernels: anonymous mappings backed by transparent huge pages, with a
 * small bounded cache of freed ones.
 *
 * Every BN step writes outputs as large as its input (y forward, dx backward). From the
 * general-purpose allocator such a block is a fresh mmap whose 4 KiB pages all fault on first
 * write; on the virtual machines this was measured on that costs several times the kernel
 * itself (11 MB: ~3 ms of faults against a 0.3 ms copy). Here a buffer is a private mapping
 * aligned to 2 MiB and advised MADV_HUGEPAGE (one fault per 2 MiB), and a freed buffer is kept
 * for reuse while the cache holds at most `cache_limit` bytes (BNLAB_BUFFER_CACHE_BYTES,
 * default 512 MiB; 0 disables the cache; bnlab.kernels.empty_cache() releases it).
 *
 * The operators of bnlab_ops.cpp take a buffer for an output and wrap it in a tensor whose
 * deleter gives it back. Both happen outside the GIL, on any thread (autograd's backward thread
 * frees tensors too), so `cache_lock` guards the cache. */
#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <pthread.h>
#include <unistd.h>
#define BNLAB_HAVE_BUFFERS 1
#else
#define BNLAB_HAVE_BUFFERS 0
#endif

#if BNLAB_HAVE_BUFFERS
#define HUGE_ALIGN ((size_t)2 << 20)
#define CACHE_SLOTS 64
#define CACHE_DEFAULT ((long long)512 << 20)

typedef struct {
    void *ptr;
    size_t cap;
} mapping_t;

static mapping_t cache[CACHE_SLOTS];
static int cache_n = 0;
static size_t cache_bytes = 0;
static long long cache_limit = -2; /* -2: not read from the environment yet */
static unsigned long long stat_hits = 0, stat_misses = 0;
static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;

static size_t limit_bytes(void) {
    if (cache_limit == -2) {
        const char *e = getenv("BNLAB_BUFFER_CACHE_BYTES");
        cache_limit = e && *e ? atoll(e) : CACHE_DEFAULT;
        if (cache_limit < 0) cache_limit = 0;
    }
    return (size_t)cache_limit;
}

static size_t page_round(size_t n) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return (n + page - 1) / page * page;
}

/* A fresh private mapping of `cap` bytes starting on a 2 MiB boundary (NULL on failure). */
static void *map_aligned(size_t cap) {
    size_t len = cap + HUGE_ALIGN;
    char *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return NULL;
    char *p = (char *)(((uintptr_t)base + HUGE_ALIGN - 1) & ~(uintptr_t)(HUGE_ALIGN - 1));
    if (p > base) munmap(base, (size_t)(p - base));
    if (base + len > p + cap) munmap(p + cap, (size_t)(base + len - (p + cap)));
#ifdef MADV_HUGEPAGE
    if (cap >= HUGE_ALIGN) madvise(p, cap, MADV_HUGEPAGE); /* advice only: errors are fine */
#endif
    return p;
}

/* A mapping of at least n bytes: the smallest cached one that is not more than twice as
 * large, and of those the most recently freed (its lines are the likeliest to be in cache:
 * alternating between two equal buffers doubled the working set and cost a third of an
 * 11 MB evaluation pass in misses); else a new one. The cache is kept in the order the
 * mappings were freed, oldest first. */
static mapping_t take_mapping(size_t n) {
    size_t cap = page_round(n);
    int best = -1;
    for (int i = 0; i < cache_n; i++)
        if (cache[i].cap >= cap && cache[i].cap / 2 <= cap &&
            (best < 0 || cache[i].cap <= cache[best].cap))
            best = i;
    if (best >= 0) {
        mapping_t m = cache[best];
        memmove(cache + best, cache + best + 1, (size_t)(cache_n - best - 1) * sizeof(mapping_t));
        cache_n--;
        cache_bytes -= m.cap;
        stat_hits++;
        return m;
    }
    stat_misses++;
    mapping_t m = {map_aligned(cap), cap};
    return m;
}

/* Keep a freed mapping for reuse, evicting the oldest ones beyond the byte limit. */
static void give_mapping(mapping_t m) {
    size_t limit = limit_bytes();
    if (m.cap > limit) {
        munmap(m.ptr, m.cap);
        return;
    }
    while (cache_n > 0 && (cache_n == CACHE_SLOTS || cache_bytes + m.cap > limit)) {
        munmap(cache[0].ptr, cache[0].cap);
        cache_bytes -= cache[0].cap;
        memmove(cache, cache + 1, (size_t)(cache_n - 1) * sizeof(mapping_t));
        cache_n--;
    }
    cache[cache_n++] = m;
    cache_bytes += m.cap;
}

static void release_cache(void) {
    for (int i = 0; i < cache_n; i++) munmap(cache[i].ptr, cache[i].cap);
    cache_n = 0;
    cache_bytes = 0;
}

static PyObject *py_empty_cache(PyObject *self, PyObject *noargs) {
    pthread_mutex_lock(&cache_lock);
    release_cache();
    pthread_mutex_unlock(&cache_lock);
    Py_RETURN_NONE;
}

static PyObject *py_buffer_stats(PyObject *self, PyObject *noargs) {
    pthread_mutex_lock(&cache_lock);
    size_t limit = limit_bytes();
    pthread_mutex_unlock(&cache_lock);
    return Py_BuildValue("{s:n,s:K,s:L,s:K,s:K}", "cached_buffers", (Py_ssize_t)cache_n,
                         "cached_bytes", (unsigned long long)cache_bytes, "limit_bytes",
                         (long long)limit, "hits", stat_hits, "misses", stat_misses);
}

static PyObject *py_set_cache_limit(PyObject *self, PyObject *args) {
    long long v;
    if (!PyArg_ParseTuple(args, "L", &v)) return NULL;
    pthread_mutex_lock(&cache_lock);
    long long previous = (long long)limit_bytes();
    cache_limit = v < 0 ? 0 : v;
    while (cache_n > 0 && cache_bytes > (size_t)cache_limit) {
        munmap(cache[0].ptr, cache[0].cap);
        cache_bytes -= cache[0].cap;
        memmove(cache, cache + 1, (size_t)(cache_n - 1) * sizeof(mapping_t));
        cache_n--;
    }
    pthread_mutex_unlock(&cache_lock);
    return PyLong_FromLongLong(previous);
}
#endif
