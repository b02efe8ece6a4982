/* Instantiates the kernels of fastgrad_impl.h for float and double. */
#include <float.h>
#include <math.h>
#include <string.h>
#include "fastgrad.h"

/* No trapping math (GCC; Clang's default). Under -ftrapping-math GCC may
 * not compute speculatively a ?: arm (or an if) that does arithmetic, so
 * such a loop stays scalar on every target without masked arithmetic (all
 * but AVX-512). It changes no result, only lets both arms be computed;
 * nothing here reads the floating-point exception flags. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#define FG_SELU_ALPHA 1.6732632423543772848170429916717
#define FG_SELU_SCALE 1.0507009873554804934193349852946
#define FG_SQRT1_2 0.70710678118654752440084436210485
#define FG_INV_SQRT_2PI 0.39894228040143267793994605993438
#define FG_LN2 0.69314718055994530941723212145818
#define FG_CLAMP(x, lo, hi) ((x) < (lo) ? (lo) : ((x) > (hi) ? (hi) : (x)))
/* Keras' backend epsilon: probabilities are clipped to [eps, 1 - eps]. */
#define FG_EPSILON 1e-7

/* The element loops are compiled for AVX-512, AVX2 and the baseline x86-64,
 * and the loader picks one by the CPU (GNU ifunc). Built with
 * -ffp-contract=off (no fused multiply-add) and without reassociation, every
 * version does the same operations in the same order: bit-identical results. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones) && !defined(FG_NO_CLONES)
#define FG_TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#define FG_CLONED 1
#endif
#endif
#ifndef FG_TARGETS
#define FG_TARGETS
#endif

/* Helpers inlined into each clone, so they get its instruction set. */
#if defined(__GNUC__)
#define FG_INLINE static inline __attribute__((always_inline))
#define FG_NOINLINE __attribute__((noinline))
#else
#define FG_INLINE static inline
#define FG_NOINLINE
#endif

/* Subnormal numbers flushed to zero (FTZ) and read as zero (DAZ) for the
 * span of an optimizer step, as TensorFlow runs Keras on the CPU. A moment
 * decaying through the subnormal range (Adam's v under a gradient that has
 * gone to zero stays there for thousands of steps) would otherwise cost a
 * microcode assist, about a hundred cycles, per element. MXCSR is per
 * thread and restored on the way out. */
#if defined(__SSE2__)
#include <xmmintrin.h>
static inline unsigned fg_fp_mode(void) { return _mm_getcsr(); }
static inline void fg_set_fp_mode(unsigned mode) { _mm_setcsr(mode); }
static inline unsigned fg_flush_begin(void)
{
    unsigned old = _mm_getcsr();
    _mm_setcsr(old | 0x8040u);   /* FTZ (bit 15) | DAZ (bit 6) */
    return old;
}
static inline void fg_flush_end(unsigned old) { _mm_setcsr(old); }
#else
static inline unsigned fg_fp_mode(void) { return 0; }
static inline void fg_set_fp_mode(unsigned mode) { (void)mode; }
static inline unsigned fg_flush_begin(void) { return 0; }
static inline void fg_flush_end(unsigned old) { (void)old; }
#endif

/* Threads for kernels whose rows (or columns) are independent: fg_parallel
 * runs fn(ctx, lo, hi) over [0, n) in chunks, on the calling thread and on
 * up to fg_threads - 1 workers of a small pool. The caller takes chunks too
 * and waits only for chunks a worker has begun, so a worker that a busy
 * machine does not schedule costs at most one chunk: the call is never much
 * slower than one thread. Between calls workers poll briefly, yielding,
 * then sleep on a condition variable (fg_new_job_soon). A chunk's result
 * does not depend on which thread computed it (workers take the caller's
 * floating-point mode), so results are the same for any number of
 * threads. One parallel call at a time: a second caller runs its work
 * alone. Without POSIX threads and C11 atomics, everything runs on the
 * calling thread. */
#if (defined(__unix__) || defined(__APPLE__)) && defined(__STDC_VERSION__) \
    && __STDC_VERSION__ >= 201112L && !defined(__STDC_NO_ATOMICS__) && !defined(FG_NO_THREADS)
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>
#define FG_MAX_THREADS 64

static struct {
    pthread_mutex_t busy;      /* held by the one parallel call running */
    pthread_mutex_t m;         /* guards the fields below it */
    pthread_cond_t wake;
    atomic_ulong job;          /* bumped for each call (under m) */
    int workers;               /* started */
    int active;                /* workers that take part in the current job */
    fg_range_fn fn;
    void *ctx;
    ptrdiff_t n, chunk;
    unsigned fp_mode;          /* the caller's floating-point mode (MXCSR) */
    atomic_llong next;         /* job << 32 | next chunk: a claim names its job */
    atomic_llong finished;     /* chunks done in the current job */
} fg_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
             PTHREAD_COND_INITIALIZER, 0, 0, 0, NULL, NULL, 0, 0, 0, 0, 0};
static atomic_int fg_threads = 0;   /* 0: one per online CPU */

/* Claims and runs chunks of job `job` until none is left. */
static void fg_run_chunks(long long job, fg_range_fn fn, void *ctx, ptrdiff_t n,
                          ptrdiff_t chunk)
{
    for (;;) {
        long long c = atomic_load(&fg_pool.next);
        if ((c >> 32) != job || (c & 0xffffffffLL) * chunk >= n) return;
        if (!atomic_compare_exchange_weak(&fg_pool.next, &c, c + 1)) continue;
        ptrdiff_t lo = (ptrdiff_t)(c & 0xffffffffLL) * chunk;
        fn(ctx, lo, lo + chunk < n ? lo + chunk : n);
        atomic_fetch_add(&fg_pool.finished, 1);
    }
}

/* After a job a worker polls for the next one for FG_SPIN_NS, yielding the
 * core between polls (as OpenBLAS's threads do), so calls in quick
 * succession (a forward, then its backward) do not wait for a wake-up,
 * which costs tens of microseconds on some machines; then it sleeps. */
#ifndef FG_SPIN_NS
#define FG_SPIN_NS 100000
#endif
static atomic_int fg_blas_threaded = 0;   /* products on the BLAS's threads */
static void fg_new_job_soon(unsigned long seen)
{
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    /* the BLAS's threads need the cores: make way for them */
    while (atomic_load(&fg_pool.job) == seen && atomic_load(&fg_blas_threaded) == 0) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) > FG_SPIN_NS)
            return;
        sched_yield();
    }
}

/* Worker number id (from 0); it skips jobs that want fewer workers. */
static void *fg_worker(void *id)
{
    const int me = (int)(intptr_t)id;
    unsigned long seen = 0;
    for (;;) {
        fg_new_job_soon(seen);
        pthread_mutex_lock(&fg_pool.m);
        while (atomic_load(&fg_pool.job) == seen)
            pthread_cond_wait(&fg_pool.wake, &fg_pool.m);
        seen = atomic_load(&fg_pool.job);
        fg_range_fn fn = fg_pool.fn;
        void *ctx = fg_pool.ctx;
        ptrdiff_t n = fg_pool.n, chunk = fg_pool.chunk;
        const int takes_part = me < fg_pool.active;
        const unsigned fp_mode = fg_pool.fp_mode;
        pthread_mutex_unlock(&fg_pool.m);
        /* a chunk computes as it would on the caller's thread: the same
         * rounding and subnormal handling (an optimizer step flushes) */
        fg_set_fp_mode(fp_mode);
        if (takes_part) fg_run_chunks((long long)(seen & 0x7fffffffUL), fn, ctx, n, chunk);
    }
    return NULL;
}

/* A child of fork() has no workers: it starts its own when it needs them. */
static void fg_pool_after_fork(void)
{
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
    fg_pool.busy = fresh;
    fg_pool.m = fresh;
    fg_pool.wake = cond;
    fg_pool.workers = 0;
    fg_pool.n = 0;   /* a job another thread had begun has no chunks left here */
}

static void fg_register_fork_handler(void)
{
    pthread_atfork(NULL, NULL, fg_pool_after_fork);
}

/* Read once: glibc reads a file in /sys for it, which would cost more than
 * a small kernel's work on every call. */
static int fg_online_cpus(void)
{
    static atomic_int cpus = 0;
    int c = atomic_load(&cpus);
    if (c == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        c = n < 1 ? 1 : n > FG_MAX_THREADS ? FG_MAX_THREADS : (int)n;
        atomic_store(&cpus, c);
    }
    return c;
}

/* Small products on one BLAS thread. OpenBLAS's openblas_set_num_threads_local
 * (0.3.27 and later) sets the count that calls use and returns the previous
 * one; in SciPy's OpenBLAS it sets the count of every thread. So products
 * take turns by class: small ones (count 1) run together, the first setting
 * 1 and the last putting back the count before; other products wait for
 * them, and small ones wait for other products, so that no product runs at
 * a count it did not ask for (OpenBLAS rounds some products differently at
 * different counts). Products are short, so are the waits. fg_blas_bind
 * finds the function among the libraries that a loaded shared object
 * (SciPy's BLAS bindings) uses. */
static int (*fg_blas_set_local)(int) = NULL;
static pthread_mutex_t fg_blas_m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t fg_blas_turn = PTHREAD_COND_INITIALIZER;
static int fg_blas_small = 0, fg_blas_large = 0, fg_blas_before = 0;

int fg_blas_bind(const char *loaded)
{
    static const char *const names[] = {
        "openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local",
        "scipy_openblas_set_num_threads_local64_", NULL};
    void *lib = dlopen(loaded, RTLD_LAZY | RTLD_NOLOAD);
    if (lib == NULL) return 0;
    for (int i = 0; names[i] != NULL && fg_blas_set_local == NULL; i++) {
        void *f = dlsym(lib, names[i]);
        if (f != NULL) memcpy(&fg_blas_set_local, &f, sizeof f);
    }
    dlclose(lib);   /* only the reference RTLD_NOLOAD added: it stays loaded */
    return fg_blas_set_local != NULL;
}

int fg_blas_begin(int small)
{
    if (fg_blas_set_local == NULL) return 0;
    pthread_mutex_lock(&fg_blas_m);
    if (small) {
        while (fg_blas_large > 0) pthread_cond_wait(&fg_blas_turn, &fg_blas_m);
        if (fg_blas_small++ == 0) fg_blas_before = fg_blas_set_local(1);
    } else {
        while (fg_blas_small > 0) pthread_cond_wait(&fg_blas_turn, &fg_blas_m);
        fg_blas_large++;
        atomic_fetch_add(&fg_blas_threaded, 1);
    }
    pthread_mutex_unlock(&fg_blas_m);
    return 1;
}

void fg_blas_end(int small)
{
    pthread_mutex_lock(&fg_blas_m);
    int last = small ? --fg_blas_small == 0 : --fg_blas_large == 0;
    if (!small) atomic_fetch_sub(&fg_blas_threaded, 1);
    if (last && small) fg_blas_set_local(fg_blas_before > 0 ? fg_blas_before : 0);
    if (last) pthread_cond_broadcast(&fg_blas_turn);
    pthread_mutex_unlock(&fg_blas_m);
}

void fg_set_threads(int n)
{
    atomic_store(&fg_threads, n < 0 ? 0 : n > FG_MAX_THREADS ? FG_MAX_THREADS : n);
}

int fg_get_threads(void)
{
    int t = atomic_load(&fg_threads);
    return t ? t : fg_online_cpus();
}

static void fg_parallel(fg_range_fn fn, void *ctx, ptrdiff_t n, ptrdiff_t chunk)
{
    const int want = fg_get_threads();
    if (chunk < 1) chunk = 1;
    if (want < 2 || n <= chunk || (n - 1) / chunk >= 0x7fffffffLL
        || pthread_mutex_trylock(&fg_pool.busy) != 0) {
        if (n > 0) fn(ctx, 0, n);
        return;
    }
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, fg_register_fork_handler);
    pthread_mutex_lock(&fg_pool.m);
    if (fg_pool.workers < want - 1) {
        /* workers start with every signal blocked, so that signals meant
         * for the process (SIGINT, a timer's SIGALRM) reach the threads of
         * the program, whose handlers expect them, never these */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        while (fg_pool.workers < want - 1) {
            pthread_t t;
            if (pthread_create(&t, NULL, fg_worker, (void *)(intptr_t)fg_pool.workers) != 0)
                break;
            pthread_detach(t);
            fg_pool.workers++;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    const long long job = (long long)((atomic_fetch_add(&fg_pool.job, 1) + 1) & 0x7fffffffUL);
    fg_pool.active = want - 1;
    fg_pool.fn = fn;
    fg_pool.ctx = ctx;
    fg_pool.n = n;
    fg_pool.chunk = chunk;
    fg_pool.fp_mode = fg_fp_mode();
    atomic_store(&fg_pool.finished, 0);
    atomic_store(&fg_pool.next, job << 32);
    pthread_cond_broadcast(&fg_pool.wake);
    pthread_mutex_unlock(&fg_pool.m);
    fg_run_chunks(job, fn, ctx, n, chunk);
    /* every chunk is claimed now; wait for those a worker is finishing */
    const long long chunks = (n + chunk - 1) / chunk;
    while (atomic_load(&fg_pool.finished) < chunks) sched_yield();
    pthread_mutex_unlock(&fg_pool.busy);
}
#else
int fg_blas_bind(const char *loaded) { (void)loaded; return 0; }
int fg_blas_begin(int small) { (void)small; return 0; }
void fg_blas_end(int small) { (void)small; }
void fg_set_threads(int n) { (void)n; }
int fg_get_threads(void) { return 1; }
static void fg_parallel(fg_range_fn fn, void *ctx, ptrdiff_t n, ptrdiff_t chunk)
{
    (void)chunk;
    if (n > 0) fn(ctx, 0, n);
}
#endif

void fg_parallel_for(fg_range_fn fn, void *ctx, ptrdiff_t n, ptrdiff_t chunk)
{
    fg_parallel(fn, ctx, n, chunk);
}

int fg_activation_needs_pre(int act)
{
    return act == FG_GELU || act == FG_SILU || act == FG_SOFTPLUS || act == FG_SOFTSIGN
        || act == FG_HARD_SILU || act == FG_MISH;
}

/* Branch-free selects, c ? a : b (see the pragma above): a bit mask for
 * float, straight code for any compiler and flags; a ?: for double, whose
 * 64-bit mask from a comparison has no SSE2 instruction. */
FG_INLINE float fg_select_f32(int c, float a, float b)
{
    union { float f; uint32_t i; } ua = {.f = a}, ub = {.f = b};
    uint32_t m = 0u - (uint32_t)c;
    ua.i = (ua.i & m) | (ub.i & ~m);
    return ua.f;
}

FG_INLINE double fg_select_f64(int c, double a, double b)
{
    return c ? a : b;
}

/* a * b mod 2^64 from 32-bit halves: the same bits as a 64-bit multiply,
 * which SSE2 and NEON lack as vector instructions, so that the dropout
 * loop vectorizes on every target. */
FG_INLINE uint64_t fg_mul64(uint64_t a, uint64_t b)
{
    uint32_t al = (uint32_t)a, ah = (uint32_t)(a >> 32);
    uint32_t bl = (uint32_t)b, bh = (uint32_t)(b >> 32);
    uint32_t cross = al * bh + ah * bl;
    return (uint64_t)al * bl + ((uint64_t)cross << 32);
}

/* Dropout's counter-based generator, splitmix64 (Steele, Lea, Flood 2014):
 * state seed + (position + 1) * gamma, then its finalizer. Element k of a call
 * with (seed, offset) draws position offset + k, so a mask is recomputed
 * rather than stored, and a seed reproduces every mask. Inlined so the
 * dropout loop has no call in it. fg_splitmix64_wide is the same with
 * plain 64-bit products: the same bits, twice as fast where AVX-512
 * vectorizes them, and not vectorized elsewhere (see fg_wide_products). */
#define FG_SPLITMIX64(name, mul)                                            \
    FG_INLINE uint64_t name(uint64_t seed, uint64_t position)              \
    {                                                                       \
        uint64_t z = seed + mul(position + 1, 0x9E3779B97F4A7C15ULL);       \
        z = mul(z ^ (z >> 30), 0xBF58476D1CE4E5B9ULL);                      \
        z = mul(z ^ (z >> 27), 0x94D049BB133111EBULL);                      \
        return z ^ (z >> 31);                                               \
    }
#define FG_MUL64_PLAIN(a, b) ((a) * (b))
FG_SPLITMIX64(fg_splitmix64, fg_mul64)
FG_SPLITMIX64(fg_splitmix64_wide, FG_MUL64_PLAIN)

/* Whether the generator's loops take plain 64-bit products: in the
 * AVX-512 clone only, which the loader picks exactly when the CPU has
 * AVX-512F (a build for one -march keeps the halves, whose loop is the one
 * the vectorization test follows). */
static int fg_wide_products(void)
{
#if defined(FG_CLONED)
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

/* fastgrad_exp.h: e^x (any x, and x <= 0) and e^x - 1 (x <= 0) */

/* e^r = 1 + (r + r^2 q(r)) and e^r - 1 = r + r^2 (1/2 + r q1(r)) in float
 * for |r| <= 0.36, q and q1 of degree 4 and 3 fitted for the least maximum
 * relative error (truncation 0.05 and 0.15 ulp). q and q1 go by Estrin's
 * scheme, independent pairs joined by powers of r, which halves the chain
 * of dependent operations that bounds the loops' speed; the last steps add
 * the small terms to the large ones, so that the result rounds about once. */
static inline float fg_exp_poly_f32(float r)
{
    float r2 = r * r;
    float q = (0.49999991059303284f + r * 0.1666649729013443f)
              + r2 * ((0.041668668389320374f + r * 0.008371495641767979f)
                      + r2 * 0.001380884787067771f);
    return 1.0f + (r + r2 * q);
}

static inline float fg_expm1_poly_f32(float r)
{
    float r2 = r * r;
    float q = (0.16666530072689056f + r * 0.04166688397526741f)
              + r2 * (0.0083685964345932f + r * 0.0013898882316425443f);
    return r - (0.0f - r2 * (0.5f + r * q));   /* r + r^2 (...), but -0 stays -0 */
}

/* The same in double by their Taylor series, of degree 13 and 16
 * (truncation below half an ulp), in Horner's form. */
static inline double fg_exp_poly_f64(double r)
{
    static const double c[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                               1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0,
                               1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
    double p = c[0];
    for (int i = 1; i < (int)(sizeof c / sizeof c[0]); i++) p = c[i] + r * p;
    return p;
}

static inline double fg_expm1_poly_f64(double r)
{
    static const double c[] = {1.0 / 20922789888000.0, 1.0 / 1307674368000.0,
                               1.0 / 87178291200.0, 1.0 / 6227020800.0, 1.0 / 479001600.0,
                               1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
                               1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0,
                               1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0};
    double p = c[0];
    for (int i = 1; i < (int)(sizeof c / sizeof c[0]); i++) p = c[i] + r * p;
    return r * p;
}

#define ET float
#define E(name) name##_f32
#define EU uint32_t
#define E_MANT 23
#define E_BIAS 127u
#define E_MAGIC 12582912.0f
#define E_LOG2E 1.44269504088896341f
#define E_LN2_HI 0.693145751953125f
#define E_LN2_LO 1.42860682030941723212e-6f
#define E_LO (-104.0f)
#define E_HI 89.0f
#define E_EXPM1_LO (-30.0f)
#define E_SELECT fg_select_f32
#include "fastgrad_exp.h"

#define ET double
#define E(name) name##_f64
#define EU uint64_t
#define E_MANT 52
#define E_BIAS 1023u
#define E_MAGIC 6755399441055744.0
#define E_LOG2E 1.4426950408889634074
#define E_LN2_HI 6.93147180369123816490e-01
#define E_LN2_LO 1.90821492927058770002e-10
#define E_LO (-746.0)
#define E_HI 710.0
#define E_EXPM1_LO (-40.0)
#define E_SELECT fg_select_f64
#include "fastgrad_exp.h"

/* tanh x = -E / (2 + E) with E = e^(-2|x|) - 1, signed like x (-0 stays -0) */
static inline float fg_tanh_f32(float x)
{
    float e = fg_expm1_reduced_f32(-2.0f * fabsf(x));
    return copysignf(-e / (2.0f + e), x);
}

static inline double fg_tanh_f64(double x)
{
    double e = fg_expm1_reduced_f64(-2.0 * fabs(x));
    return copysign(-e / (2.0 + e), x);
}

/* log(1 + e) for e in [0, 1] (or NaN), in arithmetic only (softplus and
 * mish compute in double for either type): with
 * s = e / (2 + e) in [0, 1/3], log(1 + e) = 2 atanh s = 2 s (1 + s^2/3 +
 * s^4/5 + ...), truncated below half an ulp; no cancellation, so relative
 * accuracy holds down to e = 0 and through the subnormals. */
static inline double fg_log1p_unit_f64(double e)
{
    static const double inv_odd[18] = {     /* 1/35, 1/33, ..., 1/1 */
        1.0 / 35, 1.0 / 33, 1.0 / 31, 1.0 / 29, 1.0 / 27, 1.0 / 25, 1.0 / 23, 1.0 / 21,
        1.0 / 19, 1.0 / 17, 1.0 / 15, 1.0 / 13, 1.0 / 11, 1.0 / 9, 1.0 / 7, 1.0 / 5,
        1.0 / 3, 1.0};
    double s = e / (2.0 + e), q = s * s;
    double p = 1.0 / 37;
    /* two loops of 9: each short enough to be unrolled whole, so that the
     * loops calling this have no control flow left and vectorize */
    for (int i = 0; i < 9; i++) p = inv_odd[i] + q * p;
    for (int i = 9; i < 18; i++) p = inv_odd[i] + q * p;
    return 2.0 * s * p;
}

/* log x in double arithmetic that vectorizes on every target (the loss
 * loops call it; a libm call would keep them scalar). x = 2^k m with m in
 * [sqrt(1/2), sqrt 2), both read from the bits: the biased exponent is
 * turned into a double by or-ing it under 2^52 (SSE2 has no vector
 * conversion from 64-bit integers), subnormal x is first scaled by 2^54.
 * log m = 2 atanh s, s = (m - 1) / (m + 1) in [-0.172, 0.172]: the odd
 * series to s^23 (truncation below 2^-60); then k ln2 with ln2 split so
 * that k ln2_hi is exact. Within 2 ulp; log 0 = -inf, log of a negative
 * number NaN, log inf = inf, NaN stays NaN. */
static inline double fg_log_f64(double x)
{
    static const double inv_odd[11] = {     /* 1/23, 1/21, ..., 1/3 */
        1.0 / 23, 1.0 / 21, 1.0 / 19, 1.0 / 17, 1.0 / 15, 1.0 / 13, 1.0 / 11, 1.0 / 9,
        1.0 / 7, 1.0 / 5, 1.0 / 3};
    const int sub = x < 0x1p-1022;
    double xs = fg_select_f64(sub, x * 0x1p54, x);
    union { double f; uint64_t i; } u = {.f = xs}, ke, mb;
    ke.i = (u.i >> 52) | 0x4330000000000000ULL;           /* 2^52 + biased exponent */
    mb.i = (u.i & 0x000FFFFFFFFFFFFFULL) | 0x3FF0000000000000ULL;   /* m in [1, 2) */
    double k = (ke.f - 0x1p52) - fg_select_f64(sub, 1023.0 + 54.0, 1023.0), m = mb.f;
    const int big = m > 1.4142135623730951;
    m = fg_select_f64(big, 0.5 * m, m);
    k = fg_select_f64(big, k + 1.0, k);
    double f = m - 1.0, s = f / (2.0 + f), z = s * s, p = inv_odd[0];
    /* unrolled whole (no control flow left in the loops calling this) */
    for (int i = 1; i < 11; i++) p = inv_odd[i] + z * p;
    double r = k * 6.93147180369123816490e-01 + (k * 1.90821492927058770002e-10
                                                  + (2.0 * s + 2.0 * s * (z * p)));
    double other = fg_select_f64(x == 0, -HUGE_VAL, fg_select_f64(x < 0, NAN, x));
    return fg_select_f64(x > 0, fg_select_f64(x <= DBL_MAX, r, x), other);
}

/* log(1 + x) for x > -1: log u, u = 1 + x, corrected by the rounding of
 * u, (x - (u - 1)) / u (Goldberg), which restores the digits of small x;
 * no correction where u is not finite and positive. */
static inline double fg_log1p_f64(double x)
{
    double u = 1.0 + x, c = (x - (u - 1.0)) / u;
    return fg_log_f64(u) + fg_select_f64(u > 0, fg_select_f64(u <= DBL_MAX, c, 0.0), 0.0);
}

/* x^g for x >= 0 (or NaN) from lx = log x, as e^(g lx), which vectorizes
 * (pow would not): relative error about |g lx| 2^-53 besides the
 * exponential's few ulp; x^0 = 1 for every x, as pow, and 0^g = 0 (g > 0)
 * or inf (g < 0). */
static inline double fg_pow_log_f64(double lx, double g)
{
    return fg_select_f64(g == 0, 1.0, fg_exp_f64(g * lx));
}

/* GELU from the normal distribution function Phi, for float z in double
 * arithmetic that vectorizes (erff is a library call, and 1 + erf loses
 * every digit of Phi in the left tail). With w = |z|,
 *     Phi(-w) = e^(-w^2/2) R(w),   R(w) = erfc(w / sqrt 2) e^(w^2/2) / 2,
 * and R is smooth and slowly varying: here a degree-9 polynomial in
 * t = 1 / (1 + 0.26 w), fitted to relative error 7e-9 for w <= 16 (beyond,
 * Phi(-w) underflows float). w^2 of a float is exact in double, so Phi and
 * the density e^(-z^2/2) / sqrt(2 pi) come out with a relative error near
 * 1e-8, and GELU within one float ulp; Phi(w) = 1 - Phi(-w). */
static inline double fg_ncdf_f32(float z, double *gauss)
{
    static const double r[10] = {
        0.033631556964495386, -0.1690135441113958, 0.2876599990606595,
        -0.1966612488456325, 0.19689017220745053, 0.032825209034820696,
        0.10895982475832316, 0.101819741064086, 0.10389489127556444,
        -6.602981989666435e-06};
    double x = z, t = 1.0 / (1.0 + 0.26 * fabs(x)), p = r[0];
    for (int i = 1; i < 10; i++) p = p * t + r[i];
    double e = fg_exp_nonpos_f64(-0.5 * x * x), lower = e * p;
    *gauss = e;
    return fg_select_f64(x < 0, lower, 1.0 - lower);
}

/* z Phi(z) */
static inline float fg_gelu_f32(float z)
{
    double e;
    return (float)(z * fg_ncdf_f32(z, &e));
}

/* d/dz z Phi(z) = Phi(z) + z phi(z) */
static inline float fg_gelu_grad_f32(float z)
{
    double e, c = fg_ncdf_f32(z, &e);
    return (float)(c + z * FG_INV_SQRT_2PI * e);
}

/* In double, Phi(z) = erfc(-z / sqrt 2) / 2 from the C library's erfc,
 * which stays accurate relative to its size in the left tail. What it is
 * given is not: rounding x = -z / sqrt 2 to double moves erfc by 2 x^2 of
 * its ulps (some 500 at z = -32). The rounding error d = -z / sqrt 2 - x
 * is exact from two products with fma (sqrt 1/2 split into hi + lo), and
 * erfc(x + d) = erfc(x) - d 2/sqrt(pi) e^(-x^2) to first order, which is
 * all d needs; likewise e^(-z^2/2) takes the low part of z^2. fma rounds
 * once by definition, so every platform gets the same bits. */
#define FG_SQRT1_2_LO (-4.8336466567264567e-17)   /* sqrt(1/2) - FG_SQRT1_2 */
#define FG_2_SQRTPI 1.1283791670955126            /* 2 / sqrt(pi) */

static inline double fg_ncdf_f64(double z)
{
    double x = -z * FG_SQRT1_2;
    double d = fma(-z, FG_SQRT1_2, -x) - z * FG_SQRT1_2_LO;
    d = fg_select_f64(fabs(z) <= DBL_MAX, d, 0.0);   /* inf - inf */
    return 0.5 * (erfc(x) - d * FG_2_SQRTPI * exp(-x * x));
}

/* e^(-z^2/2), with z^2 = zz + its rounding error */
static inline double fg_gauss_f64(double z)
{
    double zz = z * z, lo = fma(z, z, -zz);
    return exp(-0.5 * zz) * (1.0 - 0.5 * fg_select_f64(fabs(z) <= DBL_MAX, lo, 0.0));
}

static inline double fg_gelu_f64(double z)
{
    return z * fg_ncdf_f64(z);
}

static inline double fg_gelu_grad_f64(double z)
{
    return fg_ncdf_f64(z) + z * FG_INV_SQRT_2PI * fg_gauss_f64(z);
}

/* FG_ONLY_F32, FG_ONLY_F64: one instantiation alone, for the vectorization
 * test (GCC's optimization record of both, with the clones, would pass
 * its 2 GB limit). */
#ifndef FG_ONLY_F64
#define T float
#define S(name) name##_f32
#define EXP_NONPOS fg_exp_nonpos_f32
#define GELU fg_gelu_f32
#define GELU_GRAD fg_gelu_grad_f32
#define TANH fg_tanh_f32
#define SELECT fg_select_f32
#define SQRT sqrtf
#define FABS fabsf
#define T_MAX FLT_MAX
#define EXPM1_NONPOS fg_expm1_nonpos_f32
#define EXP_ANY fg_exp_f32
#include "fastgrad_impl.h"
#undef T
#undef S
#undef EXP_NONPOS
#undef GELU
#undef GELU_GRAD
#undef TANH
#undef SELECT
#undef SQRT
#undef FABS
#undef T_MAX
#undef EXPM1_NONPOS
#undef EXP_ANY

#endif

#ifndef FG_ONLY_F32
#define T double
#define S(name) name##_f64
#define EXP_NONPOS fg_exp_nonpos_f64
#define GELU fg_gelu_f64
#define GELU_GRAD fg_gelu_grad_f64
#define TANH fg_tanh_f64
#define SELECT fg_select_f64
#define SQRT sqrt
#define FABS fabs
#define T_MAX DBL_MAX
#define EXPM1_NONPOS fg_expm1_nonpos_f64
#define EXP_ANY fg_exp_f64
#include "fastgrad_impl.h"
#endif
