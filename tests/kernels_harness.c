/* Runs the kernels of csrc/ on fixed inputs and writes every output to
 * stdout as raw bytes, so that builds for different instruction sets can be
 * compared bit for bit (tests/test_vectorization.py). Each section is its
 * name, a newline, its length as 8 little-endian bytes, then the bytes.
 * Inputs cover the edge values: +-0, subnormals, +-1e20, +-inf, NaN, the
 * exponential's switch points and limits, and pseudo-random values from a
 * fixed generator. A NaN is written as one canonical NaN: its sign and
 * payload are the hardware's choice (x86 and ARM make different ones), not
 * the kernels'. Build: cc -O3 -fno-math-errno -ffp-contract=off -Icsrc
 * tests/kernels_harness.c csrc/fastgrad.c -lm */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fastgrad.h"

static void put_section(const char *name, const void *data, size_t bytes)
{
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)((uint64_t)bytes >> (8 * i));
    fputs(name, stdout);
    fputc('\n', stdout);
    fwrite(len, 1, 8, stdout);
    fwrite(data, 1, bytes, stdout);
}

static uint64_t lcg_state = 88172645463325252ULL;
static double uniform(double lo, double hi)   /* a fixed sequence */
{
    lcg_state = lcg_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return lo + (hi - lo) * (double)(lcg_state >> 11) * 0x1p-53;
}

/* Edge values first, then pseudo-random ones in [-20, 20] and [-1, 1]. */
static const double edges[] = {
    0.0, -0.0, 1e-40, -1e-40, 1e-310, -1e-310, 1e-20, -1e-20, 1e20, -1e20,
    INFINITY, -INFINITY, NAN, 1.0, -1.0, 0.5, -0.5, 1e-8, -1e-8,
    0.3499, -0.3499, 0.35, -0.35, 0.3501, -0.3501, 0.175, -0.175,
    10.0, -10.0, 44.0, -44.0, 52.0, -52.0, 87.3, -87.3, 88.8, -88.8, 89.0, -89.0,
    103.9, -103.9, 104.0, -104.0, 105.0, -105.0, 150.0, -150.0,
    354.0, -354.0, 372.0, -372.0, 708.0, -708.0, 709.9, -709.9, 744.0, -744.0,
    745.2, -745.2, 746.0, -746.0, 800.0, -800.0, 1e5, -1e5};
#define N_EDGES (sizeof edges / sizeof edges[0])

#define HARNESS(T, S)                                                              \
static void fill_##S(T *x, size_t n, int with_edges)                               \
{                                                                                  \
    for (size_t k = 0; k < n; k++) {                                               \
        if (with_edges && k < N_EDGES) x[k] = (T)edges[k];                         \
        else x[k] = (T)(k % 3 ? uniform(-20.0, 20.0) : uniform(-1.0, 1.0));        \
    }                                                                              \
}                                                                                  \
                                                                                   \
static void put_##S(const char *name, T *x, size_t n)                              \
{                                                                                  \
    for (size_t k = 0; k < n; k++) if (x[k] != x[k]) x[k] = (T)NAN;                 \
    put_section(name, x, n * sizeof(T));                                           \
}                                                                                  \
                                                                                   \
static void put_double_##S(const char *name, double *x, size_t n)                  \
{                                                                                  \
    for (size_t k = 0; k < n; k++) if (x[k] != x[k]) x[k] = NAN;                    \
    put_section(name, x, n * sizeof(double));                                      \
}                                                                                  \
                                                                                   \
/* Forward and backward of every activation on a (B, O) batch with edge values; \
 * O = 10 (short rows), 77 (the long-row paths) and 600 (two column blocks). */   \
static void activations_##S(void)                                                  \
{                                                                                  \
    static const ptrdiff_t shapes[3][2] = {{13, 10}, {3, 77}, {2, 600}};           \
    char name[64];                                                                 \
    for (int s = 0; s < 3; s++) {                                                  \
        ptrdiff_t B = shapes[s][0], O = shapes[s][1], n = B * O;                   \
        T *x = malloc(n * sizeof(T)), *y = malloc(n * sizeof(T));                  \
        T *z = malloc(n * sizeof(T)), *g = malloc(n * sizeof(T));                  \
        T *d = malloc(n * sizeof(T)), *bias = malloc(O * sizeof(T));               \
        T *db = malloc(O * sizeof(T));                                             \
        fg_act_stats stats;                                                        \
        unsigned char *alive = malloc(O);                                          \
        for (int act = 0; act < FG_N_ACTIVATIONS; act++) {                         \
            fill_##S(x, n, 1);                                                     \
            fill_##S(bias, O, 0);                                                  \
            fill_##S(g, n, 0);                                                     \
            memset(alive, 0, O);                                                   \
            stats.alive = alive;                                                   \
            stats.saturated = 0;                                                   \
            /* GELU in double calls the C library's erfc, whose last bits \
             * vary between libraries: its sections are marked */           \
            const char *tag = act == FG_GELU && sizeof(T) == 8 ? "libm " : ""; \
            fg_bias_act_forward##S(y, z, x, act % 2 ? bias : NULL, B, O, act,      \
                                   0.3, &stats);                                   \
            snprintf(name, sizeof name, "%sforward" #S " act=%d O=%td", tag, act, O); \
            put_##S(name, y, n);                                                   \
            snprintf(name, sizeof name, "%sstats", tag);                           \
            put_section(name, alive, O);                                           \
            put_section("saturated", &stats.saturated, sizeof stats.saturated);    \
            fg_act_backward##S(d, db, g, y, z, B, O, act, 0.3);                    \
            snprintf(name, sizeof name, "%sbackward" #S " act=%d O=%td", tag, act, O); \
            put_##S(name, d, n);                                                   \
            snprintf(name, sizeof name, "%sdbias", tag);                           \
            put_##S(name, db, O);                                                  \
            /* in place, as the layers call it */                                  \
            fg_bias_act_forward##S(x, NULL, x, NULL, B, O, act, 0.3, NULL);        \
            snprintf(name, sizeof name, "%sforward in place", tag);                \
            put_##S(name, x, n);                                                   \
        }                                                                          \
        free(x); free(y); free(z); free(g); free(d); free(bias); free(db);         \
        free(alive);                                                               \
    }                                                                              \
}                                                                                  \
                                                                                   \
static void dropout_##S(void)                                                      \
{                                                                                  \
    static const double rates[] = {0.0, 0.1, 0.5, 0.999};                          \
    enum { N = 1031 };                                                             \
    T x[N], y[N];                                                                  \
    for (int r = 0; r < 4; r++) {                                                  \
        fill_##S(x, N, 1);                                                         \
        fg_dropout_forward##S(y, x, N, rates[r], 12345u + r, 77u * r);             \
        put_##S("dropout" #S, y, N);                                               \
    }                                                                              \
}                                                                                  \
                                                                                   \
/* Every loss with and without logits, unweighted and with row weights,            \
 * targets in [0, 1]. */                                                           \
static void losses_##S(void)                                                       \
{                                                                                  \
    enum { B = 6, O = 40 };                                                        \
    T p[B * O], t[B * O], d[B * O], q[B * O], rows[B], w[B];                       \
    int64_t labels[B];                                                             \
    for (int kind = 0; kind < FG_N_LOSSES; kind++)                                 \
        for (int logits = 0; logits < 4; logits++) {                               \
            fill_##S(p, B * O, 0);                                                 \
            for (int k = 0; k < B * O; k++) {                                      \
                t[k] = (T)uniform(0.0, 1.0);                                       \
                if (!(logits & 1)) p[k] = (T)uniform(0.0, 1.0);                    \
            }                                                                      \
            for (int i = 0; i < B; i++) labels[i] = (i * 7) % O;                   \
            for (int i = 0; i < B; i++) w[i] = (T)uniform(0.0, 2.0);               \
            double loss = 0.0;                                                     \
            memset(d, 0, sizeof d);                                                \
            memset(q, 0, sizeof q);                                                \
            fg_loss_params lp = {.delta = 0.7, .alpha = 0.25, .gamma = 2.0,        \
                                 .class_balancing = kind & 1};                     \
            fg_loss_forward_backward##S(&loss, rows, d, q, p, t, labels,           \
                                        logits & 2 ? w : NULL, B, O, kind,         \
                                        logits & 1, &lp);                          \
            put_double_##S("loss" #S, &loss, 1);                                   \
            put_##S("rows", rows, B);                                              \
            put_##S("dpred", d, B * O);                                            \
            put_##S("prob", q, B * O);                                             \
        }                                                                          \
}                                                                                  \
                                                                                   \
static void batchnorm_##S(void)                                                    \
{                                                                                  \
    enum { B = 9, F = 37 };                                                        \
    T x[B * F], y[B * F], dy[B * F], dx[B * F], gamma[F], beta[F];                 \
    T mm[F], mv[F], dg[F], dbeta[F];                                               \
    double mean[F], rstd[F];                                                       \
    fill_##S(x, B * F, 0);                                                         \
    fill_##S(dy, B * F, 0);                                                        \
    fill_##S(gamma, F, 0);                                                         \
    fill_##S(beta, F, 0);                                                          \
    for (int j = 0; j < F; j++) { mm[j] = 0; mv[j] = 1; x[j] += (T)1000; }         \
    fg_batchnorm_forward##S(y, mean, rstd, mm, mv, x, gamma, beta, B, F,           \
                            1e-3, 0.99, 1);                                        \
    put_##S("batchnorm" #S, y, B * F);                                             \
    put_##S("moving", mm, F);                                                      \
    put_##S("moving var", mv, F);                                                  \
    fg_batchnorm_backward##S(dx, dg, dbeta, dy, x, mean, rstd, gamma, B, F);       \
    put_##S("dx", dx, B * F);                                                      \
    put_##S("dgamma", dg, F);                                                      \
    put_##S("dbeta", dbeta, F);                                                    \
}                                                                                  \
                                                                                   \
/* Optimizer steps on normal numbers (x86 flushes subnormals during a step,  \
 * other CPUs do not), with regularizers, clipping and constraints. */            \
static void optimizers_##S(void)                                                   \
{                                                                                  \
    enum { N = 300 };                                                              \
    static const int64_t offset[4] = {0, 40, 200, 300}, cols[3] = {0, 8, 0};      \
    static const double l1[3] = {0, 1e-3, 0}, l2[3] = {1e-2, 0, 0};               \
    static const double scale[3] = {1.0, 0.5, 0.25}, cvalue[3] = {0, 0.7, 0.05};  \
    static const int constraint[3] = {FG_NO_CONSTRAINT, FG_MAX_NORM, FG_CLIP_VALUE};\
    for (int kind = 0; kind < FG_N_OPTIMIZERS; kind++) {                           \
        T w[N], m[N], v[N], vmax[N], g[N];                                         \
        double sumsq[3], penalty, upd[3], wsq[3];                                  \
        int64_t bad, overflow;                                                     \
        fill_##S(w, N, 0);                                                         \
        fill_##S(g, N, 0);                                                         \
        for (int k = 0; k < N; k++) { m[k] = (T)0.01 * w[k]; v[k] = (T)0.5; vmax[k] = (T)0.6; } \
        fg_tensors tt = {.offset = offset, .l1 = l1, .l2 = l2, .scale = scale,    \
                         .constraint = constraint, .cvalue = cvalue, .cols = cols, \
                         .frozen = NULL, .upd_sumsq = upd, .w_sumsq = wsq,         \
                         .n_tensors = 3};                                          \
        fg_opt_config c = {.kind = kind, .lr = 0.01, .momentum = 0.9, .rho = 0.9,  \
                           .beta_1 = 0.9, .beta_2 = 0.999, .epsilon = 1e-7,        \
                           .weight_decay = 1e-3, .clipvalue = 0.9,                 \
                           .nesterov = kind == FG_SGD, .centered = kind == FG_RMSPROP, \
                           .amsgrad = kind == FG_ADAM, .step = 3, .u_product = 0.5};\
        fg_grad_norms##S(sumsq, &penalty, &bad, g, w, NULL, 1.0, &tt);             \
        fg_optimizer_step##S(&overflow, w, m, v, vmax, NULL, NULL, g, &tt, &c);    \
        put_double_##S("sumsq" #S, sumsq, 3);                                      \
        put_double_##S("penalty", &penalty, 1);                                    \
        put_double_##S("update ratios", upd, 3);                                   \
        put_double_##S("weight norms", wsq, 3);                                    \
        put_##S("weights", w, N);                                                  \
        put_##S("m", m, N);                                                        \
        put_##S("v", v, N);                                                        \
        put_##S("vmax", vmax, N);                                                  \
        double ss = fg_sum_squares##S(g, N);                                       \
        put_double_##S("sum_squares", &ss, 1);                                     \
    }                                                                              \
}

HARNESS(float, _f32)
HARNESS(double, _f64)

int main(void)
{
    activations__f32();
    activations__f64();
    dropout__f32();
    dropout__f64();
    losses__f32();
    losses__f64();
    batchnorm__f32();
    batchnorm__f64();
    optimizers__f32();
    optimizers__f64();
    return 0;
}
