/* Times the eight GEMMs of one training step at batch 32 (forward, kernel
 * gradient, input gradient of a 3-layer MLP) with small-matrix GEMM libraries
 * against the OpenBLAS that fastgrad calls (SciPy's, through cython_blas).
 * Question asked: does any library beat that OpenBLAS by 1.3x or more on the
 * step's total? Matrices are row-major float32 as NumPy stores them.
 *
 * Build, OpenBLAS alone (dlopened, as SciPy ships it):
 *   cc -O2 -std=c99 bench/gemm_libraries.c -o /tmp/gemm_libraries -ldl -lm
 * With every library (each -DWITH_* also goes alone, with its own flags):
 *   cc -O2 -std=c99 -DWITH_XSMM -DWITH_DNNL -DWITH_BLIS -isystem $DNNL/include \
 *      -isystem /usr/include/x86_64-linux-gnu/blis-openmp bench/gemm_libraries.c \
 *      -o /tmp/gemm_libraries /usr/lib/libxsmm.a -L$DNNL/lib -Wl,-rpath,$DNNL/lib -ldnnl \
 *      -L/usr/lib/x86_64-linux-gnu/blis-openmp -Wl,-rpath,/usr/lib/x86_64-linux-gnu/blis-openmp \
 *      -lblis -lgomp -lpthread -lrt -ldl -lm
 *   libxsmm 1.17: apt-get install libxsmm-dev (a static library, JIT included)
 *   BLIS 0.9:     apt-get install libblis-dev (the OpenMP build)
 *   oneDNN 3.2:   the PyPI wheels onednn-cpu-gomp and onednn-devel-cpu-gomp
 *     2023.2.0; their .data/data/ folders hold lib/ and include/ ($DNNL; pip
 *     install puts them under sys.prefix). The newer "onednn" wheels are
 *     SYCL builds that need Intel's compiler runtime.
 * Run:
 *   /tmp/gemm_libraries OPENBLAS_SO [THREADS [CALLS [LIBRARY]]]
 *   OPENBLAS_SO: SciPy's, in site-packages/scipy.libs/ (libscipy_openblas-*.so),
 *     the library fastgrad's sgemm runs in
 *   THREADS (default 1): above 1, only shapes 1, 4 and 8 and the threaded
 *     libraries. Run one LIBRARY per process then: OpenBLAS's idle pthreads
 *     and OpenMP's spin for a while after work and slow whatever runs next.
 *     And on an idle machine only: with the other core busy, 2 threads on 2
 *     cores ran up to 30x slower here.
 *   CALLS (default 2000): calls per timed batch; 11 batches, median reported.
 * "openblas-shares" is that OpenBLAS called in shares, as fastgrad calls it.
 * Prints us per call for each shape and library, the sum over the eight
 * shapes, OpenBLAS sum / library sum, and each library's largest difference
 * from OpenBLAS's result (max |C - C_openblas| / max |C_openblas|). */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef WITH_XSMM
#include <libxsmm.h>
#endif
#ifdef WITH_DNNL
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#endif
#ifdef WITH_BLIS
#include <blis.h>
#endif

#define ROUNDS 11

/* One GEMM, row-major: C (MxN) = op(A) (MxK) @ op(B) (KxN), beta = 0.
 * ta: A is stored KxM (x^T in a kernel gradient); tb: B is stored NxK
 * (W^T in an input gradient). */
typedef struct {
    int M, N, K, ta, tb;
    const float *A, *B;
    float *C;   /* this library's own output */
    /* what the library builds once per shape: a JIT kernel, a primitive */
    void (*fn)(void);
    void *kern;
    float *tmp;
} Gemm;

typedef struct {
    const char *name;
    int threaded;
    int (*prep)(Gemm *); /* 0: the library cannot do this shape */
    void (*run)(Gemm *);
    void (*fini)(Gemm *); /* may be NULL */
} Lib;

/* ---- OpenBLAS, the baseline, through its Fortran sgemm as cython_blas calls it */
typedef void sgemm_fn(const char *, const char *, const int *, const int *, const int *,
                      const float *, const float *, const int *, const float *, const int *,
                      const float *, float *, const int *);
static sgemm_fn *openblas_sgemm;

static int none_prep(Gemm *g) { (void)g; return 1; }

/* Column-major sgemm on row-major data: C^T = op(B)^T op(A)^T, so the
 * operands swap and so do their transpose flags; this is what fastgrad does. */
static void openblas_run(Gemm *g) {
    const float one = 1, zero = 0;
    const char ta = g->tb ? 'T' : 'N', tb = g->ta ? 'T' : 'N';
    const int lda = g->ta ? g->M : g->K, ldb = g->tb ? g->K : g->N;
    openblas_sgemm(&ta, &tb, &g->N, &g->M, &g->K, &one, g->B, &ldb, g->A, &lda, &zero, g->C,
                   &g->N);
}

/* The same OpenBLAS called as fastgrad calls it (_gemm in
 * fastgrad/_core.pyx): from 2^19 multiply-adds, in an even number of shares
 * of the longer output side, each at most 10^6 multiply-adds and at least
 * 32 wide, here one after another on one thread. */
static void openblas_shares_run(Gemm *g) {
    const long long work = (long long)g->M * g->N * g->K;
    const int n = g->M > g->N ? g->M : g->N, by_cols = g->N >= g->M;
    long long share = work >= (1 << 19) ? 1000000 / (work / n) / 16 * 16 : 0;
    long long parts = share >= 32 ? (n + share - 1) / share : 0;
    parts += parts & 1;
    share = parts ? ((n + parts - 1) / parts + 15) / 16 * 16 : n;
    if (share >= n) {
        openblas_run(g);
        return;
    }
    const float one = 1, zero = 0;
    const char ta = g->tb ? 'T' : 'N', tb = g->ta ? 'T' : 'N';
    const int lda = g->ta ? g->M : g->K, ldb = g->tb ? g->K : g->N;
    for (int s0 = 0; s0 < n; s0 += (int)share) {
        const int w = n - s0 < share ? n - s0 : (int)share;
        int m = g->M, cols = g->N;
        const float *a = g->A, *b = g->B;
        float *c = g->C;
        if (by_cols) {
            cols = w;
            b += g->tb ? (size_t)s0 * ldb : (size_t)s0;
            c += s0;
        } else {
            m = w;
            a += g->ta ? (size_t)s0 : (size_t)s0 * lda;
            c += (size_t)s0 * g->N;
        }
        openblas_sgemm(&ta, &tb, &cols, &m, &g->K, &one, b, &ldb, a, &lda, &zero, c, &g->N);
    }
}

#ifdef WITH_XSMM
/* libxsmm.a refers to a BLAS, for what it does not JIT (libxsmm_sgemm above
 * M*N*K = 64^3, or with a transposed first operand). main points its sgemm
 * at OpenBLAS (libxsmm_original_sgemm_function); these only link. */
#ifndef WITH_BLIS /* else BLIS's BLAS layer has them */
void sgemm_(void) { abort(); }
void dgemm_(void) { abort(); }
void sgemv_(void) { abort(); }
void dgemv_(void) { abort(); }
#endif

/* The way a backend would use libxsmm: dispatch a kernel for the shape once,
 * call it many times. Column-major like BLAS, so operands swap as above.
 * libxsmm 1.17 JITs no transposed first operand (row-major W^T): such a call
 * transposes W into a scratch first (libxsmm_otrans), and that is timed. */
static int xsmm_prep(Gemm *g) {
    const float one = 1, zero = 0;
    const int flags = g->ta ? LIBXSMM_GEMM_FLAG_TRANS_B : 0;
    const libxsmm_blasint lda = g->N, ldb = g->ta ? g->M : g->K, ldc = g->N;
    if (g->tb && !(g->tmp = malloc(sizeof(float) * g->K * g->N)))
        return 0;
    g->fn = (void (*)(void))libxsmm_smmdispatch(g->N, g->M, g->K, &lda, &ldb, &ldc, &one, &zero,
                                                &flags, NULL);
    return g->fn != NULL;
}

static void xsmm_run(Gemm *g) {
    const float *b = g->B;
    if (g->tb) {
        libxsmm_otrans(g->tmp, g->B, sizeof(float), g->K, g->N, g->K, g->N);
        b = g->tmp;
    }
    ((libxsmm_smmfunction)g->fn)(b, g->A, g->C);
}

static void xsmm_fini(Gemm *g) { free(g->tmp); }

/* libxsmm's BLAS-like call: dispatches (a hash lookup) on every call. */
static void xsmm_sgemm_run(Gemm *g) {
    const float one = 1, zero = 0;
    const char ta = g->tb ? 'T' : 'N', tb = g->ta ? 'T' : 'N';
    const libxsmm_blasint M = g->M, N = g->N, K = g->K, lda = g->ta ? g->M : g->K,
                          ldb = g->tb ? g->K : g->N;
    libxsmm_sgemm(&ta, &tb, &N, &M, &K, &one, g->B, &ldb, g->A, &lda, &zero, g->C, &N);
}
#endif

#ifdef WITH_DNNL
/* dnnl_sgemm is row-major already. */
static void dnnl_sgemm_run(Gemm *g) {
    dnnl_sgemm(g->ta ? 'T' : 'N', g->tb ? 'T' : 'N', g->M, g->N, g->K, 1.0f, g->A,
               g->ta ? g->M : g->K, g->B, g->tb ? g->K : g->N, 0.0f, g->C, g->N);
}

/* The matmul primitive, made once per shape as a backend would keep it. The
 * transposes are only strides. */
static dnnl_engine_t engine;
static dnnl_stream_t stream;
typedef struct {
    dnnl_primitive_t prim;
    dnnl_memory_t mem[3];
} DnnlMatmul;

static int dnnl_mm_prep(Gemm *g) {
    const dnnl_dims_t ad = {g->M, g->K}, as = {g->ta ? 1 : g->K, g->ta ? g->M : 1};
    const dnnl_dims_t bd = {g->K, g->N}, bs = {g->tb ? 1 : g->N, g->tb ? g->K : 1};
    const dnnl_dims_t cd = {g->M, g->N}, cs = {g->N, 1};
    dnnl_memory_desc_t md[3];
    dnnl_primitive_desc_t pd;
    DnnlMatmul *d = g->kern = calloc(1, sizeof *d);
    if (!d)
        return 0;
    dnnl_memory_desc_create_with_strides(&md[0], 2, ad, dnnl_f32, as);
    dnnl_memory_desc_create_with_strides(&md[1], 2, bd, dnnl_f32, bs);
    dnnl_memory_desc_create_with_strides(&md[2], 2, cd, dnnl_f32, cs);
    int ok = dnnl_matmul_primitive_desc_create(&pd, engine, md[0], md[1], NULL, md[2], NULL) ==
         dnnl_success;
    if (ok) {
        ok = dnnl_primitive_create(&d->prim, pd) == dnnl_success;
        dnnl_primitive_desc_destroy(pd);
    }
    void *ptr[3] = {(void *)g->A, (void *)g->B, g->C};
    for (int i = 0; i < 3; i++) {
        ok = ok && dnnl_memory_create(&d->mem[i], md[i], engine, ptr[i]) == dnnl_success;
        dnnl_memory_desc_destroy(md[i]);
    }
    return ok;
}

/* With the OpenMP runtime a CPU stream runs the primitive before returning. */
static void dnnl_mm_run(Gemm *g) {
    DnnlMatmul *d = g->kern;
    const dnnl_exec_arg_t args[3] = {
        {DNNL_ARG_SRC, d->mem[0]}, {DNNL_ARG_WEIGHTS, d->mem[1]}, {DNNL_ARG_DST, d->mem[2]}};
    dnnl_primitive_execute(d->prim, stream, 3, args);
}

static void dnnl_mm_fini(Gemm *g) {
    DnnlMatmul *d = g->kern;
    if (!d)
        return;
    for (int i = 0; i < 3; i++)
        if (d->mem[i])
            dnnl_memory_destroy(d->mem[i]);
    if (d->prim)
        dnnl_primitive_destroy(d->prim);
    free(d);
}
#endif

#ifdef WITH_BLIS
/* BLIS takes a row and a column stride per operand: row-major and the
 * transposes are only strides. */
static void blis_run(Gemm *g) {
    float one = 1, zero = 0;
    bli_sgemm(BLIS_NO_TRANSPOSE, BLIS_NO_TRANSPOSE, g->M, g->N, g->K, &one, (float *)g->A,
              g->ta ? 1 : g->K, g->ta ? g->M : 1, (float *)g->B, g->tb ? 1 : g->N,
              g->tb ? g->K : 1, &zero, g->C, g->N, 1);
}
#endif

static const Lib libs[] = {
    {"openblas", 1, none_prep, openblas_run, NULL}, /* first: the reference */
    {"openblas-shares", 0, none_prep, openblas_shares_run, NULL},
#ifdef WITH_XSMM
    {"xsmm-jit", 0, xsmm_prep, xsmm_run, xsmm_fini},
    {"xsmm-sgemm", 0, none_prep, xsmm_sgemm_run, NULL},
#endif
#ifdef WITH_DNNL
    {"dnnl-sgemm", 1, none_prep, dnnl_sgemm_run, NULL},
    {"dnnl-matmul", 1, dnnl_mm_prep, dnnl_mm_run, dnnl_mm_fini},
#endif
#ifdef WITH_BLIS
    {"blis", 1, none_prep, blis_run, NULL},
#endif
};
#define NLIB ((int)(sizeof libs / sizeof libs[0]))

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static float *alloc_floats(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n * sizeof(float))) /* NumPy's data is 64-byte aligned too */
        abort();
    memset(p, 0, n * sizeof(float));
    return p;
}

static void fill(float *x, size_t n, unsigned *seed) {
    for (size_t i = 0; i < n; i++) {
        *seed = *seed * 1664525u + 1013904223u;
        x[i] = (float)(*seed >> 8) / (float)(1u << 23) - 1.0f; /* in [-1, 1) */
    }
}

static void *openblas_handle;

/* OpenBLAS gets n threads only when it is timed: as the reference alone it
 * keeps one, so no pool of its spins while another library is timed. */
static void set_threads(int n, int openblas_n) {
    void (*f)(int) = NULL;
    *(void **)&f = dlsym(openblas_handle, "scipy_openblas_set_num_threads");
    if (!f)
        *(void **)&f = dlsym(openblas_handle, "openblas_set_num_threads");
    if (f)
        f(openblas_n);
#ifdef WITH_DNNL
    omp_set_num_threads(n);
#endif
#ifdef WITH_BLIS
    bli_thread_set_num_threads(n);
#endif
    (void)n;
}

/* us per call over one batch of calls */
static double time_batch(const Lib *lib, Gemm *g, int calls) {
    double t0 = now_us();
    for (int i = 0; i < calls; i++)
        lib->run(g);
    return (now_us() - t0) / calls;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s OPENBLAS_SO [THREADS [CALLS [LIBRARY]]]\n", argv[0]);
        return 2;
    }
    const int threads = argc > 2 ? atoi(argv[2]) : 1, calls = argc > 3 ? atoi(argv[3]) : 2000;
    const char *only = argc > 4 ? argv[4] : NULL;
    if (!(openblas_handle = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL))) {
        fprintf(stderr, "%s\n", dlerror());
        return 1;
    }
    *(void **)&openblas_sgemm = dlsym(openblas_handle, "scipy_sgemm_"); /* SciPy's prefix */
    if (!openblas_sgemm)
        *(void **)&openblas_sgemm = dlsym(openblas_handle, "sgemm_");
    if (!openblas_sgemm) {
        fprintf(stderr, "no sgemm_ in %s\n", argv[1]);
        return 1;
    }
    /* Timed: every library, or the one named; above one thread only the
     * threaded ones. OpenBLAS also computes the reference, timed or not. */
    int timed[NLIB];
    for (int l = 0; l < NLIB; l++)
        timed[l] = (!only || !strcmp(only, libs[l].name)) && (threads == 1 || libs[l].threaded);
    set_threads(threads, timed[0] ? threads : 1);
    char *(*config)(void) = NULL;
    *(void **)&config = dlsym(openblas_handle, "scipy_openblas_get_config");
    if (!config)
        *(void **)&config = dlsym(openblas_handle, "openblas_get_config");
    printf("OpenBLAS %s\n", config ? config() : argv[1]);
#ifdef WITH_XSMM
    libxsmm_init();
    /* else libxsmm looks for sgemm_ with dlsym(RTLD_NEXT), and finds BLIS's */
    libxsmm_original_sgemm_function = (libxsmm_sgemm_function)openblas_sgemm;
    printf("libxsmm %s, target %s\n", LIBXSMM_CONFIG_VERSION, libxsmm_get_target_arch());
#endif
#ifdef WITH_DNNL
    const dnnl_version_t *v = dnnl_version();
    printf("oneDNN %d.%d.%d\n", v->major, v->minor, v->patch);
    dnnl_engine_create(&engine, dnnl_cpu, 0);
    dnnl_stream_create(&stream, engine, dnnl_stream_default_flags);
#endif
#ifdef WITH_BLIS
    printf("BLIS %s, kernels for %s\n", bli_info_get_version_str(),
           bli_arch_string(bli_arch_query_id()));
#endif
    printf("%d thread(s), median of %d batches of %d calls, us per call\n", threads, ROUNDS,
           calls);

    /* Layer widths of the two networks; batch 32. */
    const struct { const char *name; int d[4]; } nets[] = {
        {"mnist 784-256-256-10", {784, 256, 256, 10}}, {"digits 64-256-128-10", {64, 256, 128, 10}}};
    for (int n = 0; n < 2; n++) {
        const int *d = nets[n].d, b = 32;
        /* {M, N, K, ta, tb}: forward x @ W, kernel gradient x^T @ delta,
         * input gradient delta @ W^T; layer by layer. */
        const int shapes[8][5] = {
            {b, d[1], d[0], 0, 0}, {b, d[2], d[1], 0, 0}, {b, d[3], d[2], 0, 0},
            {d[0], d[1], b, 1, 0}, {d[1], d[2], b, 1, 0}, {d[2], d[3], b, 1, 0},
            {b, d[2], d[3], 0, 1}, {b, d[1], d[2], 0, 1}};
        double sum[NLIB] = {0}, maxdiff[NLIB] = {0};
        int missing[NLIB] = {0};
        printf("\n%s, batch %d\n%-20s", nets[n].name, b, "shape MxKxN");
        for (int l = 0; l < NLIB; l++)
            if (timed[l])
                printf(" %11s", libs[l].name);
        printf("\n");
        for (int s = 0; s < 8; s++) {
            if (threads > 1 && s != 0 && s != 3 && s != 7) /* the big three */
                continue;
            const int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
            float *A = alloc_floats((size_t)M * K), *B = alloc_floats((size_t)K * N);
            unsigned seed = 12345u + s;
            fill(A, (size_t)M * K, &seed);
            fill(B, (size_t)K * N, &seed);
            Gemm g[NLIB];
            int ok[NLIB];
            for (int l = 0; l < NLIB; l++) {
                g[l] = (Gemm){M, N, K, shapes[s][3], shapes[s][4], A, B,
                              alloc_floats((size_t)M * N), NULL, NULL, NULL};
                ok[l] = (timed[l] || l == 0) && libs[l].prep(&g[l]);
                if (l == 0)
                    libs[0].run(&g[0]); /* the reference result */
                if (timed[l] && ok[l]) /* warm-up: caches, thread pools, lazy set-up */
                    for (int i = 0; i < calls / 4 + 1; i++)
                        libs[l].run(&g[l]);
            }
            /* The libraries take turns batch by batch, so that a slow spell of
             * the machine falls on each of them alike. */
            double t[NLIB][ROUNDS];
            for (int r = 0; r < ROUNDS; r++)
                for (int l = 0; l < NLIB; l++)
                    if (timed[l] && ok[l])
                        t[l][r] = time_batch(&libs[l], &g[l], calls);
            char label[40];
            snprintf(label, sizeof label, "%d %dx%dx%d%s", s + 1, M, K, N,
                     shapes[s][3] ? " A^T" : shapes[s][4] ? " B^T" : "");
            printf("%-20s", label);
            double ref = 0;
            for (size_t i = 0; i < (size_t)M * N; i++)
                ref = fmax(ref, fabs(g[0].C[i]));
            for (int l = 0; l < NLIB; l++) {
                if (timed[l] && !ok[l]) {
                    printf(" %11s", "n/a");
                    missing[l] = 1;
                } else if (timed[l]) {
                    qsort(t[l], ROUNDS, sizeof(double), cmp_double);
                    printf(" %11.2f", t[l][ROUNDS / 2]);
                    sum[l] += t[l][ROUNDS / 2];
                    double diff = 0;
                    for (size_t i = 0; i < (size_t)M * N; i++)
                        diff = fmax(diff, fabs(g[l].C[i] - g[0].C[i]));
                    maxdiff[l] = fmax(maxdiff[l], diff / ref);
                }
            }
            printf("\n");
            for (int l = 0; l < NLIB; l++) {
                if (libs[l].fini)
                    libs[l].fini(&g[l]);
                free(g[l].C);
            }
            free(A);
            free(B);
        }
        /* A sum with a shape missing is marked: it does not compare. */
        printf("%-20s", "sum");
        for (int l = 0; l < NLIB; l++)
            if (timed[l])
                printf(missing[l] ? " %10.2f*" : " %11.2f", sum[l]);
        if (timed[0]) {
            printf("\n%-20s", "openblas/library");
            for (int l = 0; l < NLIB; l++)
                if (timed[l])
                    printf(missing[l] ? " %10.2f*" : " %11.2f", sum[0] / sum[l]);
        }
        printf("\n%-20s", "max rel diff");
        for (int l = 0; l < NLIB; l++)
            if (timed[l])
                printf(" %11.1e", maxdiff[l]);
        printf("\n");
    }
    return 0;
}
