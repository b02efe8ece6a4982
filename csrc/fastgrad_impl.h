/* Kernel template, included by fastgrad.c once per floating type.
 * Before inclusion: T is the element type, S(name) appends the suffix, and
 * SQRT, FABS are T's math functions; SELECT(c, a, b) is c ? a : b by bit
 * masks; EXP_NONPOS (e^x), EXPM1_NONPOS (e^x - 1), both for x <= 0,
 * EXP_ANY (e^x for any x), TANH,
 * GELU and GELU_GRAD (its derivative) are fastgrad's own, in plain
 * arithmetic, so that the loops calling them vectorize (GELU in double
 * keeps the C library's erfc).
 * A loop whose line ends in the comment "vec" must vectorize on every
 * target ("vec f32": in the float instantiation): tests/test_vectorization.py
 * reads these markers and the compiler's report. */

/* Column block for the bias-gradient reduction: its double accumulators
 * live on the stack, so the kernels never allocate. */
#ifndef FG_COLS
#define FG_COLS 512
#endif

/* Elements per block of rows in the activation kernels: enough rows of a
 * narrow layer that each element loop runs long, few enough to stay in L1. */
#ifndef FG_BLOCK
#define FG_BLOCK 4096
#endif

/* Kernels split their work over fastgrad's threads (fg_parallel) from this
 * many elements, in shares of about FG_SHARE elements; every element's
 * result is the same whichever thread computes it. */
#ifndef FG_PARALLEL_MIN
#define FG_PARALLEL_MIN 131072
#endif
#ifndef FG_SHARE
#define FG_SHARE 16384
#endif

static inline T S(sigmoid)(T z)
{
    /* exp of -|z| never overflows; sigmoid(-|z|) = e s, sigmoid(|z|) = s */
    T e = EXP_NONPOS(-FABS(z)), sv = (T)1 / ((T)1 + e);
    return SELECT(z >= 0, sv, e * sv);
}

/* Pairwise total of lanes (a power of two), a fixed order. */
FG_INLINE double S(lanes_total)(double *acc, int lanes)
{
    for (int h = lanes / 2; h > 0; h /= 2)
        for (int j = 0; j < h; j++) acc[j] += acc[j + h];
    return acc[0];
}

/* tanh(softplus(z)) = r and 1 - r, from w = e^-|z| alone (no overflow):
 * z <= 0: n = w (w + 2), r = n / (n + 2), 1 - r = 2 / (n + 2);
 * z > 0:  a = 1 + 2 w,   r = a / (a + 2 w^2), 1 - r = 2 w^2 / (a + 2 w^2).
 * sig, when given, receives sigmoid(z) from the same w. In double for
 * either type: a float result is then rounded once. */
FG_INLINE void S(mish_parts)(double z, double *r, double *omr, double *sig)
{
    double w = fg_exp_nonpos_f64(-fabs(z)), n = w * (w + 2.0), a = 1.0 + 2.0 * w;
    double w2 = 2.0 * w * w, dp = a + w2, dn = n + 2.0;
    int pos = z > 0;
    *r = fg_select_f64(pos, a / dp, n / dn);
    *omr = fg_select_f64(pos, w2 / dp, 2.0 / dn);
    if (sig) {
        double inv = 1.0 / (1.0 + w);
        *sig = fg_select_f64(pos, inv, w * inv);
    }
}

/* sum_k x_k y_k (y NULL: sum_k x_k) in double: in order for short rows; for
 * rows of 32 or more in 16 lanes (lane j takes k = j mod 16) added
 * pairwise. The order depends on n alone: the same result on every
 * instruction set. */
FG_INLINE double S(row_dot)(const T *x, const T *y, ptrdiff_t n)
{
#define FG_TERM(k) (y ? (double)x[k] * (double)y[k] : (double)x[k])
    double acc[16] = {0};
    ptrdiff_t k = 0;
    if (n < 32) {
        for (; k < n; k++) acc[0] += FG_TERM(k);
        return acc[0];
    }
    for (; k + 16 <= n; k += 16)
        for (int j = 0; j < 16; j++) acc[j] += FG_TERM(k + j);
    for (int j = 0; k < n; k++, j++) acc[j] += FG_TERM(k);
#undef FG_TERM
    return S(lanes_total)(acc, 16);
}

/* Largest element of a row (NaN, if first, stays). A running maximum is a
 * reduction compilers keep scalar without -ffinite-math-only, so long rows
 * keep 16 running maxima in memory, lane j taking k = j mod 16, updated by
 * an element-wise loop that vectorizes (not unrolled: unrolled, the lanes
 * become 16 scalar chains), then compared in order. */
FG_INLINE T S(row_max)(const T *y, ptrdiff_t n)
{
    T l[16], m = y[0];
    if (n < 32) {
        for (ptrdiff_t k = 1; k < n; k++) m = SELECT(y[k] > m, y[k], m);
        return m;
    }
    ptrdiff_t k = 16;
    for (int j = 0; j < 16; j++) l[j] = y[j];
    for (; k + 16 <= n; k += 16) {
        const T *v = y + k;
#if defined(__GNUC__)
#pragma GCC unroll 1
#endif
        for (int j = 0; j < 16; j++) l[j] = SELECT(v[j] > l[j], v[j], l[j]); /* vec */
    }
    for (int j = 0; k < n; k++, j++) l[j] = SELECT(y[k] > l[j], y[k], l[j]);
    for (int j = 1; j < 16; j++) m = SELECT(l[j] > m, l[j], m);
    return m;
}

/* Adds x[0..n) into 16 lanes, lane j taking k = j mod 16 (n a multiple
 * of 16 but in a row's last chunk, so the lanes run on across chunks). */
FG_INLINE void S(lanes_add)(double *acc, const T *x, ptrdiff_t n)
{
    ptrdiff_t k = 0;
    for (; k + 16 <= n; k += 16)
        for (int j = 0; j < 16; j++) acc[j] += (double)x[k + j];
    for (int j = 0; k < n; k++, j++) acc[j] += (double)x[k];
}

/* The first k < n with y[k] == v, else n: 16 elements at a time, their
 * comparisons folded into one flag in a loop that vectorizes (in double
 * too, but for SSE2), then the place inside the first block with one. */
FG_INLINE ptrdiff_t S(first_equal)(const T *y, ptrdiff_t n, T v)
{
    ptrdiff_t k = 0;
    for (; k + 16 <= n; k += 16) {
        int hit = 0;
#if defined(__GNUC__)
#pragma GCC unroll 1
#endif
        for (int j = 0; j < 16; j++) hit |= y[k + j] == v; /* vec f32 */
        if (hit) break;
    }
    while (k < n && !(y[k] == v)) k++;
    return k;
}

/* Log-softmax of one row of length O > 0, in place on y (which holds z on
 * entry): y = (z - m) - log(1 + sum over the other entries of e^(z - m)),
 * m the first maximum, whose own term (exactly 1) is left out of the sum so
 * that log1p keeps its digits when it dominates. The exponentials go
 * through a stack block (z is still needed), summed in 16 double lanes. */
FG_INLINE void S(log_softmax_row)(T *y, ptrdiff_t O)
{
    enum { CH = 512 };
    T e[CH];
    const T m = S(row_max)(y, O);
    /* its first place: a search that stops there (NaN m, only when y[0]
     * is NaN: place 0) */
    ptrdiff_t im = S(first_equal)(y, O, m);
    if (im == O) im = 0;
    double acc[16] = {0};
    for (ptrdiff_t j0 = 0; j0 < O; j0 += CH) {
        const ptrdiff_t w = O - j0 < CH ? O - j0 : CH;
        const T *z = y + j0;
        for (ptrdiff_t j = 0; j < w; j++) e[j] = EXP_NONPOS(z[j] - m); /* vec */
        if (im >= j0 && im < j0 + w) e[im - j0] = 0;
        S(lanes_add)(acc, e, w);
    }
    const double ls = log1p(S(lanes_total)(acc, 16)), md = (double)m;
    for (ptrdiff_t j = 0; j < O; j++) y[j] = (T)(((double)y[j] - md) - ls); /* vec */
}

/* Softmax of nr rows of length O > 0, in place on y (which holds z on
 * entry): each row less its maximum, then exponentials, then each row times
 * 1 / its sum. Rows of 64 or more take their exponentials in the same loop
 * as the subtraction; shorter ones, after, in one loop over the whole block
 * (long even when rows are short). The same operations either way. */
FG_INLINE void S(softmax_rows)(T *y, ptrdiff_t nr, ptrdiff_t O)
{
    if (O >= 64) {
        for (ptrdiff_t i = 0; i < nr; i++) {
            T *r = y + i * O, m = S(row_max)(r, O);
            for (ptrdiff_t j = 0; j < O; j++) r[j] = EXP_NONPOS(r[j] - m); /* vec */
        }
    } else {
        for (ptrdiff_t i = 0; i < nr; i++) {
            T *r = y + i * O, m = S(row_max)(r, O);
            for (ptrdiff_t j = 0; j < O; j++) r[j] = r[j] - m; /* vec */
        }
        for (ptrdiff_t k = 0; k < nr * O; k++) y[k] = EXP_NONPOS(y[k]); /* vec */
    }
    for (ptrdiff_t i = 0; i < nr; i++) {
        T *r = y + i * O, inv = (T)(1.0 / S(row_dot)(r, NULL, O));
        for (ptrdiff_t j = 0; j < O; j++) r[j] *= inv; /* vec */
    }
}

/* y = act(x) over n elements, for every activation but softmax; x may be
 * y itself. Reading x in the same loop lets its loads overlap the
 * arithmetic (a copy first would be a pass bound by memory alone).
 * Branch-free loops (selects are masks), so that each vectorizes. */
FG_INLINE void S(act_apply)(T *y, const T *x, ptrdiff_t n, int act, T a)
{
    switch (act) {
    case FG_LINEAR:
        if (y != x) memcpy(y, x, (size_t)n * sizeof(T));
        break;
    case FG_RELU:      /* z <= 0 ? 0 : z lets NaN through */
        for (ptrdiff_t k = 0; k < n; k++) y[k] = SELECT(x[k] <= 0, (T)0, x[k]); /* vec */
        break;
    case FG_LEAKY_RELU:
        for (ptrdiff_t k = 0; k < n; k++) y[k] = SELECT(x[k] > 0, x[k], a * x[k]); /* vec */
        break;
    case FG_SIGMOID:
        for (ptrdiff_t k = 0; k < n; k++) y[k] = S(sigmoid)(x[k]); /* vec */
        break;
    case FG_SILU:
        for (ptrdiff_t k = 0; k < n; k++) y[k] = x[k] * S(sigmoid)(x[k]); /* vec */
        break;
    case FG_TANH:
        for (ptrdiff_t k = 0; k < n; k++) y[k] = TANH(x[k]); /* vec */
        break;
    case FG_ELU:       /* e^z - 1 of min(z, 0), the unused side finite;
                        * selected on z <= 0 so that NaN and -0 pass */
        for (ptrdiff_t k = 0; k < n; k++) { /* vec */
            T z = x[k], em = EXPM1_NONPOS(SELECT(z <= 0, z, (T)0));
            y[k] = SELECT(z <= 0, a * em, z);
        }
        break;
    case FG_SELU:
        for (ptrdiff_t k = 0; k < n; k++) { /* vec */
            T z = x[k], em = EXPM1_NONPOS(SELECT(z <= 0, z, (T)0));
            y[k] = SELECT(z <= 0, (T)(FG_SELU_SCALE * FG_SELU_ALPHA) * em, (T)FG_SELU_SCALE * z);
        }
        break;
    case FG_GELU:
        for (ptrdiff_t k = 0; k < n; k++) y[k] = GELU(x[k]); /* vec f32 */
        break;
    case FG_SOFTPLUS:  /* max(z, 0) + log(1 + e^-|z|): no overflow, no
                        * cancellation; in double, so a float rounds once */
        for (ptrdiff_t k = 0; k < n; k++) { /* vec */
            double z = x[k];
            y[k] = (T)(fg_select_f64(z > 0, z, 0.0)
                       + fg_log1p_unit_f64(fg_exp_nonpos_f64(-fabs(z))));
        }
        break;
    case FG_SOFTSIGN:
        for (ptrdiff_t k = 0; k < n; k++) y[k] = x[k] / ((T)1 + FABS(x[k])); /* vec */
        break;
    case FG_RELU6:     /* selects that let NaN through, as relu's */
        for (ptrdiff_t k = 0; k < n; k++) { /* vec */
            T z = x[k], c = SELECT(z > (T)6, (T)6, z);
            y[k] = SELECT(z <= 0, (T)0, c);
        }
        break;
    case FG_HARD_SIGMOID:   /* relu6(z + 3) / 6 */
        for (ptrdiff_t k = 0; k < n; k++) { /* vec */
            T t = x[k] + (T)3;
            t = SELECT(t > (T)6, (T)6, t);
            y[k] = SELECT(t <= 0, (T)0, t) / (T)6;
        }
        break;
    case FG_HARD_SILU:      /* z relu6(z + 3) / 6 */
        for (ptrdiff_t k = 0; k < n; k++) { /* vec */
            T z = x[k], t = z + (T)3;
            t = SELECT(t > (T)6, (T)6, t);
            y[k] = z * (SELECT(t <= 0, (T)0, t) / (T)6);
        }
        break;
    case FG_MISH:
        for (ptrdiff_t k = 0; k < n; k++) { /* vec */
            double z = x[k], r, omr;
            S(mish_parts)(z, &r, &omr, NULL);
            y[k] = (T)(z * r);
        }
        break;
    case FG_EXPONENTIAL:
        for (ptrdiff_t k = 0; k < n; k++) y[k] = EXP_ANY(x[k]); /* vec */
        break;
    }
}

/* What a share of an activation pass needs (fg_parallel's ctx). The
 * shares are rows [lo, hi) or, for an element-wise pass, elements. */
typedef struct {
    T *out, *pre, *dpre;
    const T *inp, *bias, *dout, *y, *z;
    ptrdiff_t O;
    int act;
    T a;
    fg_act_stats *stats;
} S(act_args);

/* Shares of n units of `unit` elements each: whole blocks of `block` units
 * of about FG_SHARE elements, or all n below FG_PARALLEL_MIN elements. */
FG_INLINE ptrdiff_t S(share)(ptrdiff_t n, ptrdiff_t unit, ptrdiff_t block)
{
    if (n * unit < FG_PARALLEL_MIN) return n;
    ptrdiff_t blocks = (FG_SHARE + block * unit - 1) / (block * unit);
    return blocks * block;
}

/* Rows [lo, hi) of the dense epilogue below, in blocks of rb rows. */
FG_TARGETS static void S(bias_act_rows)(void *p, ptrdiff_t lo, ptrdiff_t hi)
{
    const S(act_args) *A = p;
    const ptrdiff_t O = A->O, rb = O < FG_BLOCK ? FG_BLOCK / O : 1;
    const int act = A->act;
    const T *bias = A->bias;
    fg_act_stats *stats = A->stats;
    for (ptrdiff_t i0 = lo; i0 < hi; i0 += rb) {
        const ptrdiff_t nr = hi - i0 < rb ? hi - i0 : rb, n = nr * O;
        const T *x = A->inp + i0 * O;
        T *y = A->out + i0 * O;
        const T *z = x;   /* the activation's input */
        if (bias) {
            for (ptrdiff_t i = 0; i < nr; i++)
                for (ptrdiff_t j = 0; j < O; j++) y[i * O + j] = x[i * O + j] + bias[j]; /* vec */
            z = y;
        }
        if (A->pre) for (ptrdiff_t k = 0; k < n; k++) A->pre[i0 * O + k] = z[k];
        if (act == FG_SOFTMAX || act == FG_LOG_SOFTMAX) {  /* in place on rows */
            if (z != y) memcpy(y, z, (size_t)n * sizeof(T));
            if (act == FG_SOFTMAX) S(softmax_rows)(y, nr, O);
            else for (ptrdiff_t i = 0; i < nr; i++) S(log_softmax_row)(y + i * O, O);
        } else {
            S(act_apply)(y, z, n, act, A->a);
        }
        if (!stats) continue;   /* only when asked: a second look, in cache */
        if (act == FG_RELU && stats->alive) {
            unsigned char *alive = stats->alive;
            for (ptrdiff_t i = 0; i < nr; i++)
                for (ptrdiff_t j = 0; j < O; j++) alive[j] |= y[i * O + j] > 0;
        } else if (act == FG_SIGMOID || act == FG_TANH) {
            const T sat_lo = act == FG_SIGMOID ? (T)0.01 : (T)-0.99;
            int64_t sat = 0;
            for (ptrdiff_t k = 0; k < n; k++) sat += (y[k] < sat_lo) | (y[k] > (T)0.99);
            stats->saturated += sat;
        }
    }
}

/* Dense epilogue: out = act(inp + bias), one pass; inp may be out itself
 * (the GEMM result, updated in place). inp, out are (B,O); bias is (O) or
 * NULL; pre is (B,O) or NULL and receives z = inp + bias. Rows go in
 * blocks of about FG_BLOCK elements, each finished while in L1; from
 * FG_PARALLEL_MIN elements, shares of them over the threads (not with
 * stats, which every row adds to). */
FG_TARGETS int S(fg_bias_act_forward)(T *out, T *pre, const T *inp, const T *bias,
                           ptrdiff_t B, ptrdiff_t O, int act, double alpha,
                           fg_act_stats *stats)
{
    if (act < 0 || act >= FG_N_ACTIVATIONS) return FG_EACTIVATION;
    if (O <= 0) return FG_OK;
    if (act == FG_LINEAR && !bias && !pre) {  /* a copy, at memcpy's speed */
        if (out != inp) memcpy(out, inp, (size_t)B * (size_t)O * sizeof(T));
        return FG_OK;
    }
    S(act_args) A = {.out = out, .pre = pre, .inp = inp, .bias = bias, .O = O,
                     .act = act, .a = (T)alpha, .stats = stats};
    ptrdiff_t rows = B;
    if (!bias && !stats && act != FG_SOFTMAX && act != FG_LOG_SOFTMAX) {
        /* element-wise: B*O rows of one element, so that a few long rows split too */
        rows = B * O;
        A.O = 1;
    }
    const ptrdiff_t rb = A.O < FG_BLOCK ? FG_BLOCK / A.O : 1;
    fg_parallel(S(bias_act_rows), &A, rows, stats ? rows : S(share)(rows, A.O, rb));
    return FG_OK;
}

/* dpre = dout * act'(z) over n elements, every activation but softmax;
 * z is pre, or y where the derivative needs no z. Branch-free loops. */
FG_INLINE void S(slope)(T *d, const T *g, const T *y, const T *z, ptrdiff_t n,
                        int act, T a)
{
    switch (act) {
    case FG_LINEAR:
        if (d != g) memcpy(d, g, (size_t)n * sizeof(T));
        break;
    case FG_RELU:
        for (ptrdiff_t k = 0; k < n; k++) d[k] = SELECT(y[k] > 0, g[k], (T)0); /* vec */
        break;
    case FG_LEAKY_RELU:
        for (ptrdiff_t k = 0; k < n; k++) d[k] = SELECT(y[k] > 0, g[k], a * g[k]); /* vec */
        break;
    case FG_ELU:
        for (ptrdiff_t k = 0; k < n; k++) d[k] = SELECT(y[k] > 0, g[k], g[k] * (y[k] + a)); /* vec */
        break;
    case FG_SIGMOID:
        for (ptrdiff_t k = 0; k < n; k++) d[k] = g[k] * y[k] * ((T)1 - y[k]); /* vec */
        break;
    case FG_TANH:
        for (ptrdiff_t k = 0; k < n; k++) d[k] = g[k] * ((T)1 - y[k] * y[k]); /* vec */
        break;
    case FG_SILU:
        for (ptrdiff_t k = 0; k < n; k++) { /* vec */
            T s = S(sigmoid)(z[k]);
            d[k] = g[k] * (s * ((T)1 + z[k] * ((T)1 - s)));
        }
        break;
    case FG_SELU:
        for (ptrdiff_t k = 0; k < n; k++) /* vec */
            d[k] = g[k] * SELECT(y[k] > 0, (T)FG_SELU_SCALE,
                                 y[k] + (T)(FG_SELU_SCALE * FG_SELU_ALPHA));
        break;
    case FG_GELU:
        for (ptrdiff_t k = 0; k < n; k++) d[k] = g[k] * GELU_GRAD(z[k]); /* vec f32 */
        break;
    case FG_SOFTPLUS:
        for (ptrdiff_t k = 0; k < n; k++) d[k] = g[k] * S(sigmoid)(z[k]); /* vec */
        break;
    case FG_SOFTSIGN:  /* g / (1 + |z|)^2, divided twice: no overflow */
        for (ptrdiff_t k = 0; k < n; k++) { /* vec */
            T q = (T)1 + FABS(z[k]);
            d[k] = g[k] / q / q;
        }
        break;
    case FG_RELU6:
        for (ptrdiff_t k = 0; k < n; k++) /* vec */
            d[k] = SELECT((y[k] > 0) & (y[k] < (T)6), g[k], (T)0);
        break;
    case FG_HARD_SIGMOID:
        for (ptrdiff_t k = 0; k < n; k++) /* vec */
            d[k] = SELECT((y[k] > 0) & (y[k] < (T)1), g[k] / (T)6, (T)0);
        break;
    case FG_HARD_SILU:     /* (2z + 3) / 6 on (-3, 3), 1 above, 0 below */
        for (ptrdiff_t k = 0; k < n; k++) { /* vec */
            T zk = z[k], mid = ((T)2 * zk + (T)3) / (T)6;
            T sl = SELECT(zk > (T)-3, mid, (T)0);
            d[k] = g[k] * SELECT(zk >= (T)3, (T)1, sl);
        }
        break;
    case FG_MISH:          /* r + z (1 - r)(1 + r) sigmoid(z) */
        for (ptrdiff_t k = 0; k < n; k++) { /* vec */
            double zk = z[k], r, omr, sg;
            S(mish_parts)(zk, &r, &omr, &sg);
            d[k] = (T)((double)g[k] * (r + zk * (omr * (1.0 + r) * sg)));
        }
        break;
    case FG_EXPONENTIAL:
        for (ptrdiff_t k = 0; k < n; k++) d[k] = g[k] * y[k]; /* vec */
        break;
    }
}

/* Rows [lo, hi) of the softmax and log-softmax backward:
 *   softmax:     dz_j = y_j (g_j - sum_k g_k y_k)
 *   log_softmax: dz_j = g_j - e^(y_j) sum_k g_k
 * the row's sum first, so rows are done whole. */
FG_TARGETS static void S(softmax_back_rows)(void *p, ptrdiff_t lo, ptrdiff_t hi)
{
    const S(act_args) *A = p;
    const ptrdiff_t O = A->O;
    for (ptrdiff_t i = lo; i < hi; i++) {
        const T *g = A->dout + i * O, *y = A->y + i * O;
        T *d = A->dpre + i * O;
        if (A->act == FG_LOG_SOFTMAX) {
            const double sum = S(row_dot)(g, NULL, O);
            for (ptrdiff_t j = 0; j < O; j++) /* vec */
                d[j] = (T)((double)g[j] - (double)EXP_NONPOS(y[j]) * sum);
            continue;
        }
        const T dot = (T)S(row_dot)(g, y, O);
        for (ptrdiff_t j = 0; j < O; j++) d[j] = y[j] * (g[j] - dot); /* vec */
    }
}

/* Elements [lo, hi) of dpre = dout * act'(z), without the bias gradient. */
FG_TARGETS static void S(slope_part)(void *p, ptrdiff_t lo, ptrdiff_t hi)
{
    const S(act_args) *A = p;
    S(slope)(A->dpre + lo, A->dout + lo, A->y + lo, A->z + lo, hi - lo, A->act, A->a);
}

/* Activation backward with the bias gradient fused in.
 * dpre, dout, out, pre are (B,O); dbias is (O) or NULL; pre may be NULL
 * unless fg_activation_needs_pre(act). dpre may alias dout.
 * dpre = dout * act'(z); dbias = sum over rows of dpre (double accumulation).
 * From FG_PARALLEL_MIN elements the softmax rows, and the element-wise pass
 * when there is no bias gradient, go in shares over the threads. */
FG_TARGETS int S(fg_act_backward)(T *dpre, T *dbias, const T *dout, const T *out,
                       const T *pre, ptrdiff_t B, ptrdiff_t O, int act,
                       double alpha)
{
    if (act < 0 || act >= FG_N_ACTIVATIONS) return FG_EACTIVATION;
    if (fg_activation_needs_pre(act) && !pre && B > 0 && O > 0) return FG_ENEEDS_PRE;
    if (B <= 0 || O <= 0) {
        if (dbias) for (ptrdiff_t j = 0; j < O; j++) dbias[j] = 0;
        return FG_OK;
    }
    const T a = (T)alpha;
    double acc[FG_COLS];
    S(act_args) A = {.dpre = dpre, .dout = dout, .y = out, .z = pre ? pre : out, .O = O,
                     .act = act, .a = a};

    if (act == FG_SOFTMAX || act == FG_LOG_SOFTMAX) {
        fg_parallel(S(softmax_back_rows), &A, B, S(share)(B, O, 1));
        if (!dbias) return FG_OK;
        /* the bias sums below then read dpre */
        act = FG_LINEAR;
        dout = dpre;
    }

    if (!dbias) {  /* element-wise alone: one pass over everything */
        fg_parallel(S(slope_part), &A, B * O, S(share)(B * O, 1, FG_BLOCK));
        return FG_OK;
    }

    /* Column blocks, so that the double accumulators fit on the stack; when
     * one block spans whole rows, the slope runs over blocks of rows at once.
     * Then the block's rows are added into the bias sums, from L1. */
    for (ptrdiff_t c0 = 0; c0 < O; c0 += FG_COLS) {
        const ptrdiff_t w = O - c0 < FG_COLS ? O - c0 : FG_COLS;
        const ptrdiff_t rb = w == O ? (O < FG_BLOCK ? FG_BLOCK / O : 1) : 1;
        for (ptrdiff_t j = 0; j < w; j++) acc[j] = 0.0;
        for (ptrdiff_t i0 = 0; i0 < B; i0 += rb) {
            const ptrdiff_t nr = B - i0 < rb ? B - i0 : rb, off = i0 * O + c0;
            T *d = dpre + off;
            S(slope)(d, dout + off, out + off, pre ? pre + off : out + off,
                     w == O ? nr * O : w, act, a);
            if (dbias)
                for (ptrdiff_t i = 0; i < nr; i++)
                    for (ptrdiff_t j = 0; j < w; j++) acc[j] += d[i * O + j]; /* vec */
        }
        if (dbias) for (ptrdiff_t j = 0; j < w; j++) dbias[c0 + j] = (T)acc[j];
    }
    return FG_OK;
}

/* e[j] = exp(x[j] - shift) in double for j < n, all arguments <= 0:
 * fastgrad's exponential, which vectorizes, for runs of 16 or more; the C
 * library's for shorter ones, where the polynomial's latency would dominate. */
static inline void S(exp_shifted)(double *e, const T *x, double shift, ptrdiff_t n)
{
    if (n >= 16) for (ptrdiff_t j = 0; j < n; j++) e[j] = fg_exp_nonpos_f64((double)x[j] - shift);
    else for (ptrdiff_t j = 0; j < n; j++) e[j] = exp((double)x[j] - shift);
}

/* Categorical focal cross-entropy of one row: l = sum_j alpha (1 - q_j)^gamma
 * (-t_j log q_j), with q = p / sum(p) clipped to [eps, 1 - eps] (Keras), or
 * from logits q = softmax(z), log q = z - logsumexp(z) (no clip needed).
 * With c_j = dl/dq_j (0 where clipped):
 *   probabilities: dl/dp_k = (c_k - sum_j c_j q_j) / sum(p)
 *   logits:        dl/dz_k = c_k q_k - q_k sum_j c_j q_j
 * d (scaled by invB) and q (logits: the softmax) may be NULL. */
static double S(categorical_focal_row)(T *d, T *q, const T *p, const T *t, ptrdiff_t O,
                                       int from_logits, double alpha, double gamma,
                                       double invB)
{
    const double eps = FG_EPSILON;
    double row = 0.0, cq = 0.0, s = 0.0, lse = 0.0;
    if (O == 0) return 0.0;
    if (from_logits) {
        double m = p[0];
        for (ptrdiff_t j = 1; j < O; j++) if (p[j] > m) m = p[j];
        for (ptrdiff_t j = 0; j < O; j++) s += exp((double)p[j] - m);
        lse = m + log(s);
    } else {
        for (ptrdiff_t j = 0; j < O; j++) s += p[j];
    }
    /* two passes: the loss and sum_j c_j q_j, then the gradient */
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1 && !d) break;
        for (ptrdiff_t j = 0; j < O; j++) {
            double y = t[j], qj, lq;
            int clipped = 0;
            if (from_logits) {
                lq = (double)p[j] - lse;
                qj = exp(lq);
                if (pass == 0 && q) q[j] = (T)qj;
            } else {
                qj = (double)p[j] / s;
                clipped = qj < eps || qj > 1.0 - eps;
                lq = log(FG_CLAMP(qj, eps, 1.0 - eps));
            }
            double qc = from_logits ? qj : FG_CLAMP(qj, eps, 1.0 - eps), om = 1.0 - qc;
            /* cqj = c_j q_j, formed without dividing by q (which underflows
             * for very negative logits) */
            double cqj = 0.0;
            if (y != 0.0) {
                double ff = pow(om, gamma);
                if (pass == 0) row -= alpha * ff * y * lq;
                if (!clipped)
                    cqj = alpha * y * ((gamma == 0 ? 0.0 : gamma * pow(om, gamma - 1.0) * lq * qj)
                                       - ff * (from_logits ? 1.0 : qj / qc));
            }
            if (pass == 0) cq += cqj;
            else if (from_logits) d[j] = (T)((cqj - qj * cq) * invB);
            else d[j] = (T)((y != 0.0 && !clipped ? cqj / qj - cq : -cq) / s * invB);
        }
    }
    return row;
}

/* The loss kernel calls the helpers below rather than inlining them in
 * each of its cases: the same work, in a body the compiler (and its
 * optimization record) goes over once. */
static FG_NOINLINE double S(loss_dot)(const T *x, const T *y, ptrdiff_t n)
{
    return S(row_dot)(x, y, n);
}

static FG_NOINLINE double S(loss_total)(double *acc)
{
    return S(lanes_total)(acc, 16);
}

/* Adds x[0..n) into 16 lanes as S(lanes_add) does, for double terms. */
static FG_NOINLINE void S(lanes_add_d)(double *acc, const double *x, ptrdiff_t n)
{
    ptrdiff_t k = 0;
    for (; k + 16 <= n; k += 16)
        for (int j = 0; j < 16; j++) acc[j] += x[k + j];
    for (int j = 0; k < n; k++, j++) acc[j] += x[k];
}

/* The element losses go over a row in chunks of FG_COLS: one loop per
 * loss, without branches, writes each term to lt and each gradient to dj
 * (a scratch block when dpred is NULL; likewise qj for prob), and the
 * terms are added in 16 lanes in double, in an order set by O alone. */
#define FG_CHUNKS_BEGIN                                                      \
    for (ptrdiff_t j0 = 0; j0 < O; j0 += FG_COLS) {                          \
        const ptrdiff_t w = O - j0 < FG_COLS ? O - j0 : FG_COLS;             \
        const T *pj = p + j0, *tj = t ? t + j0 : NULL;                       \
        T *dj = d ? d + j0 : dscr, *qj = q ? q + j0 : qscr;                  \
        (void)tj; (void)dj; (void)qj;
#define FG_CHUNKS_END                                                        \
        S(lanes_add_d)(lanes, lt, w);                                        \
    }                                                                        \
    row = S(loss_total)(lanes);
/* the same, for the losses that average over the row */
#define FG_CHUNKS_MEAN FG_CHUNKS_END row /= (double)O;
/* the sign of a double as a double (NaN: 0), without an int from a
 * double comparison (which SSE2 cannot narrow in a vector) */
#define FG_SIGN(e) fg_select_f64((e) > 0, 1.0, fg_select_f64((e) < 0, -1.0, 0.0))
/* a clamp whose NaN passes, as select masks */
#define FG_CLIP(x, lo, hi) fg_select_f64((x) < (lo), (lo), fg_select_f64((x) > (hi), (hi), (x)))

/* Loss value and gradient in one pass.
 * pred, target, dpred, prob are (B,O); labels is (B) for the sparse loss
 * (target is then unused). rows (B) receives each l_i. Any of rows, dpred,
 * prob, weights may be NULL.
 * loss = (1/B) sum_i w_i l_i, with l_i the per-row loss (see losses.py) and
 * w_i = weights[i] (1 when weights is NULL): Keras's sum_over_batch_size,
 * which divides by the rows, not by the sum of the weights;
 * dpred = d loss / d pred, or d loss / d logits when from_logits.
 * prob receives sigmoid/softmax(pred) when from_logits.
 * lp holds Huber's delta and the focal losses' alpha, gamma and class
 * balancing. The hinge losses take targets in {-1, 1}; targets all in
 * {0, 1} (over the whole batch, as Keras checks) are mapped to 2 t - 1. */
FG_TARGETS int S(fg_loss_forward_backward)(double *loss, T *rows, T *dpred, T *prob,
                                const T *pred, const T *target,
                                const int64_t *labels, const T *weights,
                                ptrdiff_t B, ptrdiff_t O, int kind, int from_logits,
                                const fg_loss_params *lp)
{
    if (kind < 0 || kind >= FG_N_LOSSES) return FG_ELOSS;
    if (kind == FG_SPARSE_CATEGORICAL_CROSSENTROPY) {
        for (ptrdiff_t i = 0; i < B; i++)
            if (labels[i] < 0 || labels[i] >= O) return FG_ELABEL;
    }
    const double eps = FG_EPSILON, delta = lp->delta;
    const double fa = lp->alpha, fgam = lp->gamma;
    const double invB_all = B > 0 ? 1.0 / (double)B : 0.0;
    const double invBO_all = (B > 0 && O > 0) ? invB_all / (double)O : 0.0;
    int to_pm1 = 0;
    if (kind == FG_HINGE || kind == FG_SQUARED_HINGE) {
        to_pm1 = 1;
        for (ptrdiff_t k = 0; k < B * O; k++) to_pm1 &= (target[k] == 0) | (target[k] == 1);
    }
    double total = 0.0;

    for (ptrdiff_t i = 0; i < B; i++) {
        /* a row's weight scales its share of the mean, hence its gradient */
        const double wi = weights ? (double)weights[i] : 1.0;
        const double invB = weights ? invB_all * wi : invB_all;
        const double invBO = weights ? invBO_all * wi : invBO_all;
        const T *p = pred + i * O;
        const T *t = target ? target + i * O : NULL;
        T *d = dpred ? dpred + i * O : NULL;
        T *q = prob ? prob + i * O : NULL;
        double row = 0.0, lanes[16] = {0}, lt[FG_COLS];
        T dscr[FG_COLS], qscr[FG_COLS];   /* where no dpred or prob is wanted */

        switch (kind) {
        case FG_MSE:
        case FG_MAE: {
            const int sq = kind == FG_MSE;
            FG_CHUNKS_BEGIN
            for (ptrdiff_t j = 0; j < w; j++) { /* vec */
                double e = (double)pj[j] - (double)tj[j];
                lt[j] = fg_select_f64(sq, e * e, fabs(e));
                dj[j] = SELECT(sq, (T)(2.0 * e * invBO), (T)FG_SIGN(e) * (T)invBO);
            }
            FG_CHUNKS_MEAN
            break;
        }
        case FG_HUBER:
            FG_CHUNKS_BEGIN
            for (ptrdiff_t j = 0; j < w; j++) { /* vec */
                double e = (double)pj[j] - (double)tj[j], ae = fabs(e);
                lt[j] = fg_select_f64(ae <= delta, 0.5 * e * e, delta * ae - 0.5 * delta * delta);
                dj[j] = (T)fg_select_f64(ae <= delta, e * invBO, FG_SIGN(e) * delta * invBO);
            }
            FG_CHUNKS_MEAN
            break;
        case FG_BINARY_CROSSENTROPY:
            FG_CHUNKS_BEGIN
            if (from_logits)
                /* max(z,0) - z y + log(1 + exp(-|z|)): finite for any z */
                for (ptrdiff_t j = 0; j < w; j++) { /* vec */
                    double z = pj[j], y = tj[j];
                    T s = S(sigmoid)(pj[j]);
                    lt[j] = fg_select_f64(z > 0, z, 0.0) - z * y
                            + fg_log1p_unit_f64(fg_exp_nonpos_f64(-fabs(z)));
                    qj[j] = s;
                    dj[j] = (T)(((double)s - y) * invBO);
                }
            else
                /* the clip passes no gradient outside [eps, 1 - eps] */
                for (ptrdiff_t j = 0; j < w; j++) { /* vec */
                    double z = pj[j], y = tj[j], pc = FG_CLIP(z, eps, 1.0 - eps);
                    lt[j] = -(y * fg_log_f64(pc) + (1.0 - y) * fg_log_f64(1.0 - pc));
                    dj[j] = (T)fg_select_f64(z < eps, 0.0, fg_select_f64(z > 1.0 - eps, 0.0,
                                             (-y / pc + (1.0 - y) / (1.0 - pc)) * invBO));
                }
            FG_CHUNKS_MEAN
            break;
        case FG_CATEGORICAL_CROSSENTROPY:
        case FG_SPARSE_CATEGORICAL_CROSSENTROPY: {
            const int sparse = kind == FG_SPARSE_CATEGORICAL_CROSSENTROPY;
            const ptrdiff_t lab = sparse ? (ptrdiff_t)labels[i] : -1;
            if (O == 0) break;
            if (from_logits) {
                /* l = sum_j t_j (lse - z_j), lse = m + log sum exp(z - m):
                 * a block of exponentials on the stack, added in four fixed
                 * chains */
                double m = S(row_max)(p, O);
                double eb[FG_COLS], s4[4] = {0.0, 0.0, 0.0, 0.0};
                for (ptrdiff_t j0 = 0; j0 < O; j0 += FG_COLS) {
                    ptrdiff_t w = O - j0 < FG_COLS ? O - j0 : FG_COLS, k = 0;
                    S(exp_shifted)(eb, p + j0, m, w);
                    for (; k + 4 <= w; k += 4) {
                        s4[0] += eb[k]; s4[1] += eb[k + 1]; s4[2] += eb[k + 2]; s4[3] += eb[k + 3];
                    }
                    for (; k < w; k++) s4[k & 3] += eb[k];
                }
                double lse = m + log((s4[0] + s4[1]) + (s4[2] + s4[3]));
                /* sparse: the label's entry; one-hot: sums in row_dot's order */
                const double tsum = sparse ? 1.0 : S(loss_dot)(t, NULL, O);
                const double tz = sparse ? (double)p[lab] : S(loss_dot)(t, p, O);
                row = tsum * lse - tz;
                double sm_lab = 0.0;
                /* dl/dz_j = softmax_j tsum - t_j, block by block through the
                 * stack, one simple loop per output so that each vectorizes;
                 * sparse: t is 0 but at the label, mended after */
                for (ptrdiff_t j0 = 0; j0 < O; j0 += FG_COLS) {
                    ptrdiff_t w = O - j0 < FG_COLS ? O - j0 : FG_COLS;
                    S(exp_shifted)(eb, p + j0, lse, w);
                    if (sparse && lab >= j0 && lab < j0 + w) sm_lab = eb[lab - j0];
                    /* (in double, a copy the compiler makes a memcpy) */
                    if (q) for (ptrdiff_t j = 0; j < w; j++) q[j0 + j] = (T)eb[j]; /* vec f32 */
                    if (d && sparse)
                        for (ptrdiff_t j = 0; j < w; j++) d[j0 + j] = (T)(eb[j] * tsum * invB); /* vec */
                    else if (d)
                        for (ptrdiff_t j = 0; j < w; j++) /* vec */
                            d[j0 + j] = (T)((eb[j] * tsum - (double)t[j0 + j]) * invB);
                }
                if (d && sparse) d[lab] = (T)((sm_lab * tsum - 1.0) * invB);
            } else {
                /* Keras: q = p / sum(p), clipped to [eps, 1 - eps];
                 * l = -sum_j t_j log q_j.  dl/dp_k = (Tu - [k unclipped] t_k / q_k) / sum(p),
                 * Tu the sum of t_j over unclipped j. The sparse loss reads
                 * its one-hot row from a block on the stack, and its
                 * gradient at the label is mended after. */
                const double s = S(loss_dot)(p, NULL, O);
                double tl[16] = {0}, tub[FG_COLS];
                T yb[FG_COLS];
                FG_CHUNKS_BEGIN
                const T *tv = tj;
                if (sparse) {
                    for (ptrdiff_t j = 0; j < w; j++) yb[j] = 0;
                    if (lab >= j0 && lab < j0 + w) yb[lab - j0] = 1;
                    tv = yb;
                }
                for (ptrdiff_t j = 0; j < w; j++) { /* vec */
                    double y = tv[j], qj = (double)pj[j] / s, qc = FG_CLIP(qj, eps, 1.0 - eps);
                    lt[j] = fg_select_f64(y != 0.0, -(y * fg_log_f64(qc)), 0.0);
                    tub[j] = fg_select_f64(qj < eps, 0.0, fg_select_f64(qj > 1.0 - eps, 0.0, y));
                }
                S(lanes_add_d)(tl, tub, w);
                FG_CHUNKS_END
                const double tu = S(loss_total)(tl);
                const T *tv = sparse ? p : t;   /* read either way: no branch */
#define FG_CE_GRAD(y, qj) ((tu - fg_select_f64((qj) < eps, 0.0, fg_select_f64((qj) > 1.0 - eps, \
                           0.0, fg_select_f64((y) == 0.0, 0.0, (y) / (qj))))) / s * invB)
                if (d) for (ptrdiff_t j = 0; j < O; j++) { /* vec */
                    double y = fg_select_f64(sparse, 0.0, (double)tv[j]), qj = (double)p[j] / s;
                    d[j] = (T)FG_CE_GRAD(y, qj);
                }
                if (d && sparse) d[lab] = (T)FG_CE_GRAD(1.0, (double)p[lab] / s);
#undef FG_CE_GRAD
            }
            break;
        }
        case FG_LOG_COSH:
            /* with a = |e|, X = e^-a, E = X - 1 (expm1, exact digits):
             * log cosh e = log1p(E^2 / (2 X)), no cancellation near 0, and
             * a - ln2 + X^2 (below 1e-34, all log1p(X^2) keeps) from 40 on,
             * where X^2 would underflow; tanh a = -E (2 + E) / (1 + X^2) */
            FG_CHUNKS_BEGIN
            for (ptrdiff_t j = 0; j < w; j++) { /* vec */
                double e = (double)pj[j] - (double)tj[j], a = fabs(e);
                double em = fg_expm1_nonpos_f64(-a), x = fg_exp_nonpos_f64(-a);
                lt[j] = fg_select_f64(a < 40.0, fg_log1p_f64(em * em / (2.0 * x)),
                                      a - FG_LN2 + x * x);
                dj[j] = (T)(copysign(-em * (2.0 + em) / (1.0 + x * x), e) * invBO);
            }
            FG_CHUNKS_MEAN
            break;
        case FG_KL_DIVERGENCE:   /* sum_j t log(t / p), both clipped to [eps, 1] */
            FG_CHUNKS_BEGIN
            for (ptrdiff_t j = 0; j < w; j++) { /* vec */
                double y = FG_CLIP((double)tj[j], eps, 1.0), z = pj[j], pc = FG_CLIP(z, eps, 1.0);
                lt[j] = y * fg_log_f64(y / pc);
                dj[j] = (T)fg_select_f64(z > eps, fg_select_f64(z < 1.0, -y / pc * invB, 0.0), 0.0);
            }
            FG_CHUNKS_END
            break;
        case FG_POISSON:
            FG_CHUNKS_BEGIN
            for (ptrdiff_t j = 0; j < w; j++) { /* vec */
                double y = tj[j], z = (double)pj[j] + eps;
                lt[j] = (double)pj[j] - y * fg_log_f64(z);
                dj[j] = (T)((1.0 - y / z) * invBO);
            }
            FG_CHUNKS_MEAN
            break;
        case FG_HINGE:
        case FG_SQUARED_HINGE: {
            const int sq = kind == FG_SQUARED_HINGE;
            FG_CHUNKS_BEGIN
            for (ptrdiff_t j = 0; j < w; j++) { /* vec */
                double y = to_pm1 ? 2.0 * (double)tj[j] - 1.0 : (double)tj[j];
                double m = 1.0 - y * (double)pj[j], h = fg_select_f64(m < 0, 0.0, m);   /* NaN passes */
                lt[j] = fg_select_f64(sq, h * h, h);
                dj[j] = (T)(fg_select_f64(sq, -2.0 * y * h, fg_select_f64(m > 0, -y, 0.0)) * invBO);
            }
            FG_CHUNKS_MEAN
            break;
        }
        case FG_CATEGORICAL_HINGE: {
            /* max(neg - pos + 1, 0), pos = sum t p, neg = max (1 - t) p; the
             * gradient of the max goes to its first place: that search for
             * an index stays scalar */
            if (O == 0) break;
            double neg = (1.0 - (double)t[0]) * (double)p[0];
            ptrdiff_t kn = 0;
            for (ptrdiff_t j = 0; j < O; j++) {
                double v = (1.0 - (double)t[j]) * (double)p[j];
                kn = v > neg ? j : kn;
                neg = v > neg ? v : neg;
            }
            const double pos = S(loss_dot)(t, p, O), m = neg - pos + 1.0;
            row = m < 0 ? 0.0 : m;
            if (d) {
                for (ptrdiff_t j = 0; j < O; j++) /* vec */
                    d[j] = (T)fg_select_f64(m > 0, -(double)t[j] * invB, 0.0);
                if (m > 0) d[kn] = (T)((1.0 - (double)t[kn] - (double)t[kn]) * invB);
            }
            break;
        }
        case FG_MAPE:   /* 100 mean_j |t - p| / max(|t|, eps) */
            FG_CHUNKS_BEGIN
            for (ptrdiff_t j = 0; j < w; j++) { /* vec */
                double y = tj[j], e = (double)pj[j] - y;
                double den = fg_select_f64(fabs(y) > eps, fabs(y), eps);
                lt[j] = fabs(e) / den;
                dj[j] = (T)(100.0 * FG_SIGN(e) / den * invBO);
            }
            FG_CHUNKS_END
            row *= 100.0 / (double)O;
            break;
        case FG_MSLE:   /* mean_j (log(max(p, eps) + 1) - log(max(t, eps) + 1))^2 */
            FG_CHUNKS_BEGIN
            for (ptrdiff_t j = 0; j < w; j++) { /* vec */
                double z = pj[j], y = tj[j], pc = fg_select_f64(z < eps, eps, z);
                double a = fg_log1p_f64(pc) - fg_log1p_f64(fg_select_f64(y < eps, eps, y));
                lt[j] = a * a;
                dj[j] = (T)fg_select_f64(z > eps, 2.0 * a / (1.0 + pc) * invBO, 0.0);
            }
            FG_CHUNKS_MEAN
            break;
        case FG_BINARY_FOCAL_CROSSENTROPY: {
            /* bce and 1 - p_t, with their derivatives, then the focal factor */
            const int cb = lp->class_balancing;
            double bce[FG_COLS], om[FG_COLS], dbce[FG_COLS], dom[FG_COLS];
            FG_CHUNKS_BEGIN
            if (from_logits)
                /* log p = -softplus(-z), log(1 - p) = -softplus(z); 1 - p_t
                 * from sigmoid(-z), no cancellation */
                for (ptrdiff_t j = 0; j < w; j++) { /* vec */
                    double y = tj[j], z = pj[j], e = fg_exp_nonpos_f64(-fabs(z));
                    double l1 = fg_log1p_unit_f64(e), ie = 1.0 / (1.0 + e), ee = e / (1.0 + e);
                    double s = fg_select_f64(z >= 0, ie, ee), sm = fg_select_f64(z >= 0, ee, ie);
                    qj[j] = (T)s;
                    bce[j] = y * (fg_select_f64(z < 0, -z, 0.0) + l1)
                             + (1.0 - y) * (fg_select_f64(z > 0, z, 0.0) + l1);
                    om[j] = y * sm + (1.0 - y) * s;
                    dbce[j] = s - y;                        /* per logit */
                    dom[j] = (1.0 - 2.0 * y) * s * sm;
                }
            else
                for (ptrdiff_t j = 0; j < w; j++) { /* vec */
                    double y = tj[j], z = pj[j], pc = FG_CLIP(z, eps, 1.0 - eps);
                    bce[j] = -(y * fg_log_f64(pc) + (1.0 - y) * fg_log_f64(1.0 - pc));
                    om[j] = 1.0 - (y * z + (1.0 - y) * (1.0 - z));
                    dbce[j] = fg_select_f64(z < eps, 0.0, fg_select_f64(z > 1.0 - eps, 0.0,
                                            -y / pc + (1.0 - y) / (1.0 - pc)));
                    dom[j] = 1.0 - 2.0 * y;
                }
            for (ptrdiff_t j = 0; j < w; j++) { /* vec */
                double y = tj[j], wgt = fg_select_f64(cb, y * fa + (1.0 - y) * (1.0 - fa), 1.0);
                double lo = fg_log_f64(om[j]), ff = fg_pow_log_f64(lo, fgam);
                double dff = fg_select_f64(fgam == 0, 0.0, fgam * fg_pow_log_f64(lo, fgam - 1.0) * dom[j]);
                lt[j] = wgt * ff * bce[j];
                dj[j] = (T)(wgt * (ff * dbce[j] + dff * bce[j]) * invBO);
            }
            FG_CHUNKS_MEAN
            break;
        }
        case FG_CATEGORICAL_FOCAL_CROSSENTROPY:
            row = S(categorical_focal_row)(d, q, p, t, O, from_logits, fa, fgam, invB);
            break;
        case FG_COSINE_SIMILARITY: {
            /* -t.p / (|t| |p|), each 1/|.| capped at 1/eps as Keras' l2 normalization */
            const double st = S(loss_dot)(t, t, O), sp = S(loss_dot)(p, p, O);
            const double dot = S(loss_dot)(t, p, O);
            double it = fmin(1.0 / sqrt(st), 1.0 / eps), rp = 1.0 / sqrt(sp);
            int capped = !(rp < 1.0 / eps);
            double ip = capped ? 1.0 / eps : rp;
            row = -dot * it * ip;
            if (d) for (ptrdiff_t j = 0; j < O; j++) { /* vec */
                double g = (double)t[j] - fg_select_f64(capped, 0.0, dot * ip * ip * (double)p[j]);
                d[j] = (T)(-it * ip * g * invB);
            }
            break;
        }
        }
        if (rows) rows[i] = (T)row;
        total += weights ? wi * row : row;
    }
    *loss = total * invB_all;
    return FG_OK;
}
#undef FG_CHUNKS_BEGIN
#undef FG_CHUNKS_END
#undef FG_CHUNKS_MEAN
#undef FG_CLIP
#undef FG_SIGN

/* Sums of squares accumulate in double over 32 lanes (lane j takes the
 * elements k = j mod 32): enough independent chains to hide the add latency
 * once vectorized. The lanes are then added pairwise. A fixed order: the
 * same result from run to run and from one instruction set to another. */
FG_INLINE double S(sumsq)(const T *x, ptrdiff_t n)
{
    double acc[32] = {0};
    ptrdiff_t k = 0;
    for (; k + 32 <= n; k += 32)
        for (int j = 0; j < 32; j++) acc[j] += (double)x[k + j] * (double)x[k + j];
    for (int j = 0; k < n; k++, j++) acc[j] += (double)x[k] * (double)x[k];
    return S(lanes_total)(acc, 32);
}

/* 1 when some |x[k]| > limit (NaN never is), else 0: blocks of 1024 whose
 * loops vectorize, with an exit after the first block that has one. */
FG_TARGETS int S(fg_any_abs_above)(const T *x, ptrdiff_t N, double limit)
{
    const T lim = (T)limit;
    for (ptrdiff_t k0 = 0; k0 < N; k0 += 1024) {
        ptrdiff_t w = N - k0 < 1024 ? N - k0 : 1024;
        int hit = 0;
        for (ptrdiff_t k = 0; k < w; k++) hit |= FABS(x[k0 + k]) > lim;
        if (hit) return 1;
    }
    return 0;
}

/* Update-ratio sums, over blocks of FG_UPD_BLOCK (128) elements: lane j
 * takes the elements k = j mod 16 of a block; squares and the 8-term lane
 * sums are in T, and the block's lanes are then added in double. All terms
 * are positive, so a float total is off by less than 8 roundings, 4.8e-7
 * relative. Widening every element to double first would take twice the
 * vector work, and the ratios only need to show orders of magnitude (float
 * weights or updates beyond 1.8e19 in magnitude, whose squares overflow,
 * give a ratio of 0 or NaN). */
#ifndef FG_UPD_BLOCK
#define FG_UPD_BLOCK 128
#endif
#if defined(__GNUC__)
typedef T S(lanes) __attribute__((vector_size(16 * sizeof(T))));
typedef double S(dlanes) __attribute__((vector_size(16 * sizeof(double))));
FG_INLINE void S(block_sumsq2)(S(dlanes) *a, S(dlanes) *b, const T *x, const T *y)
{
    S(lanes) u, v, pa, pb;
    memcpy(&u, x, sizeof u);
    memcpy(&v, y, sizeof v);
    pa = u * u;
    pb = v * v;
    for (int k = 16; k < FG_UPD_BLOCK; k += 16) {
        memcpy(&u, x + k, sizeof u);
        memcpy(&v, y + k, sizeof v);
        pa += u * u;
        pb += v * v;
    }
    *a += __builtin_convertvector(pa, S(dlanes));
    *b += __builtin_convertvector(pb, S(dlanes));
}
#else
typedef struct { double v[16]; } S(dlanes);
FG_INLINE void S(block_sumsq2)(S(dlanes) *a, S(dlanes) *b, const T *x, const T *y)
{
    for (int j = 0; j < 16; j++) {
        T pa = x[j] * x[j], pb = y[j] * y[j];
        for (int k = 16 + j; k < FG_UPD_BLOCK; k += 16) { pa += x[k] * x[k]; pb += y[k] * y[k]; }
        a->v[j] += pa;
        b->v[j] += pb;
    }
}
#endif

FG_INLINE double S(dlanes_total)(const S(dlanes) *acc)
{
    double l[16];
    memcpy(l, acc, sizeof l);
    return S(lanes_total)(l, 16);
}

FG_TARGETS double S(fg_sum_squares)(const T *x, ptrdiff_t N)
{
    return S(sumsq)(x, N);
}

/* Pass 1 of an optimizer step, over the gradients only.
 * For each tensor t: adds the regularizer's gradient l1 sign(w) + 2 l2 w into
 * grad (so clipping sees the gradient of the regularized loss, as in Keras),
 * with acc (the gradients accumulated over the previous micro-steps) makes
 * grad = (grad + acc) / acc_steps, the average that is clipped and applied,
 * then sumsq[t] = sum of grad^2 in double. penalty receives the regularizers'
 * loss, sum_t l1 sum|w| + l2 sum w^2. first_bad receives the index of the
 * first tensor holding a non-finite gradient, or -1. */
FG_TARGETS void S(fg_grad_norms)(double *sumsq, double *penalty, int64_t *first_bad,
                     T *grad, const T *param, const T *acc, double acc_steps,
                     const fg_tensors *tt)
{
    const T ks = (T)acc_steps;
    *first_bad = -1;
    *penalty = 0.0;
    for (ptrdiff_t t = 0; t < tt->n_tensors; t++) {
        /* a frozen tensor is not trained: no penalty (Keras sums the
         * regularizers of trainable weights only), no part in the norms */
        if (tt->frozen && tt->frozen[t]) { sumsq[t] = 0.0; continue; }
        ptrdiff_t a = (ptrdiff_t)tt->offset[t], b = (ptrdiff_t)tt->offset[t + 1];
        const T l1 = (T)tt->l1[t], l2x2 = (T)(2.0 * tt->l2[t]);
        T *g = grad + a;
        const T *w = param + a;
        ptrdiff_t n = b - a;
        if (l1 != 0 || l2x2 != 0) {
            double a1 = 0, a2 = 0;
            for (ptrdiff_t k = 0; k < n; k++) {
                g[k] += l1 * (T)((w[k] > 0) - (w[k] < 0)) + l2x2 * w[k];
                a1 += fabs((double)w[k]);
                a2 += (double)w[k] * w[k];
            }
            *penalty += tt->l1[t] * a1 + tt->l2[t] * a2;
        }
        if (acc) {
            const T *at = acc + a;
            for (ptrdiff_t k = 0; k < n; k++) g[k] = (g[k] + at[k]) / ks;
        }
        sumsq[t] = S(sumsq)(g, n);
        /* inf or NaN anywhere makes the sum of squares inf or NaN */
        if (*first_bad < 0 && !isfinite(sumsq[t])) *first_bad = t;
    }
}

/* MaxNorm on a (rows, cols) kernel: each column's L2 norm capped (Keras axis=0). */
static void S(max_norm)(T *w, ptrdiff_t n, ptrdiff_t cols, double maxv)
{
    if (cols <= 0) cols = 1;                 /* a vector: one norm over it all */
    ptrdiff_t rows = n / cols;
    double acc[FG_COLS];
    for (ptrdiff_t c0 = 0; c0 < cols; c0 += FG_COLS) {
        ptrdiff_t wdt = cols - c0 < FG_COLS ? cols - c0 : FG_COLS;
        for (ptrdiff_t j = 0; j < wdt; j++) acc[j] = 0.0;
        for (ptrdiff_t i = 0; i < rows; i++)
            for (ptrdiff_t j = 0; j < wdt; j++) { double x = w[i * cols + c0 + j]; acc[j] += x * x; }
        for (ptrdiff_t j = 0; j < wdt; j++) {
            double nrm = sqrt(acc[j]);
            acc[j] = (nrm < maxv ? nrm : maxv) / (FG_EPSILON + nrm);
        }
        for (ptrdiff_t i = 0; i < rows; i++)
            for (ptrdiff_t j = 0; j < wdt; j++) w[i * cols + c0 + j] *= (T)acc[j];
    }
}

/* Pass 2: one read and one write of every parameter, gradient and moment.
 * Per element, with g the gradient after pass 1:
 *   g = clip(g * scale[t], -clipvalue, clipvalue)     (clipping, Keras order)
 *   w -= lr * weight_decay * w                        (decoupled decay, if any)
 *   SGD       v = momentum v - lr g;  w += v  (nesterov: w += momentum v - lr g)
 *             or w -= lr g without momentum
 *   RMSprop   v = rho v + (1-rho) g^2;  centered: m = rho m + (1-rho) g,
 *             d = v - m^2 + eps, else d = v + eps;  u = lr g / sqrt(d);
 *             momentum: vmax = momentum vmax + u, w -= vmax;  else w -= u
 *   Adam      m += (1-beta_1)(g - m);  v += (1-beta_2)(g^2 - v);
 *             amsgrad: vmax = max(vmax, v), used for v;
 *             w -= lr sqrt(1-beta_2^t)/(1-beta_1^t) * m / (sqrt(v) + eps)
 *   Adagrad   v += g^2;  w -= lr g / sqrt(v + eps)
 * then the tensor's constraint (NonNeg, ClipValue per element; MaxNorm after). */
/* Loop-invariant settings of one step, in the element type. */
typedef struct {
    int kind, clip, nesterov, centered, amsgrad;
    T lr, mu, eps, keep, cv, rho, b1, b2, adam_lr;
    T cm, cg, cv2, bc1;   /* Nadam's m, g and v factors; Adamax's 1 - beta_1^t */
} S(opt_consts);

/* The update of n consecutive elements of one tensor. One loop per kind,
 * with loop-invariant branches only, so that each vectorizes. G(k) is the
 * scaled and clipped gradient. */
FG_INLINE int S(update_range)(const S(opt_consts) *q, T *restrict w,
                            const T *restrict gr, T *restrict mt,
                            T *restrict vt, T *restrict xt, T *restrict dw,
                            T sc, ptrdiff_t n)
{
    const T lr = q->lr, mu = q->mu, eps = q->eps, keep = q->keep, cv = q->cv;
    const T rho = q->rho, b1 = q->b1, b2 = q->b2, adam_lr = q->adam_lr;
    const T cm = q->cm, cg = q->cg, cv2 = q->cv2, bc1 = q->bc1;
    const int clip = q->clip;
#define G(k) (clip ? FG_CLAMP(gr[k] * sc, -cv, cv) : gr[k] * sc)
/* the new weight; dw (when given) receives the change, for update ratios;
 * an integer OR records a weight that is no longer finite (an update
 * overflowing the type's range): free in a loop bound by memory */
#define PUT(k, expr) do { T w_new = (expr); if (dw) dw[k] = w_new - w[k]; \
                          w[k] = w_new; bad |= !(FABS(w_new) <= T_MAX); } while (0)
    int bad = 0;
    switch (q->kind) {
    case FG_SGD:
        if (mu == 0) {
            for (ptrdiff_t k = 0; k < n; k++) PUT(k, w[k] * keep - lr * G(k));
        } else if (q->nesterov) {
            for (ptrdiff_t k = 0; k < n; k++) {
                T g = G(k), vel = mu * vt[k] - lr * g;
                vt[k] = vel;
                PUT(k, w[k] * keep + mu * vel - lr * g);
            }
        } else {
            for (ptrdiff_t k = 0; k < n; k++) {
                T vel = mu * vt[k] - lr * G(k);
                vt[k] = vel;
                PUT(k, w[k] * keep + vel);
            }
        }
        break;
    case FG_RMSPROP:
        for (ptrdiff_t k = 0; k < n; k++) {
            T g = G(k);
            T vel = rho * vt[k] + ((T)1 - rho) * g * g;
            vt[k] = vel;
            T d = vel + eps;
            if (q->centered) {
                T avg = rho * mt[k] + ((T)1 - rho) * g;
                mt[k] = avg;
                d = vel - avg * avg + eps;
            }
            T u = lr * g / SQRT(d);
            if (mu != 0) { u = mu * xt[k] + u; xt[k] = u; }
            PUT(k, w[k] * keep - u);
        }
        break;
    case FG_ADAM:
        if (q->amsgrad) {
            for (ptrdiff_t k = 0; k < n; k++) {
                T g = G(k);
                T mm = mt[k] + ((T)1 - b1) * (g - mt[k]);
                T vv = vt[k] + ((T)1 - b2) * (g * g - vt[k]);
                mt[k] = mm; vt[k] = vv;
                T vh = xt[k] > vv ? xt[k] : vv;
                xt[k] = vh;
                PUT(k, w[k] * keep - adam_lr * mm / (SQRT(vh) + eps));
            }
        } else {
            for (ptrdiff_t k = 0; k < n; k++) {
                T g = G(k);
                T mm = mt[k] + ((T)1 - b1) * (g - mt[k]);
                T vv = vt[k] + ((T)1 - b2) * (g * g - vt[k]);
                mt[k] = mm; vt[k] = vv;
                PUT(k, w[k] * keep - adam_lr * mm / (SQRT(vv) + eps));
            }
        }
        break;
    case FG_ADAGRAD:
        for (ptrdiff_t k = 0; k < n; k++) {
            T g = G(k), acc = vt[k] + g * g;
            vt[k] = acc;
            PUT(k, w[k] * keep - lr * g / SQRT(acc + eps));
        }
        break;
    case FG_NADAM:
        for (ptrdiff_t k = 0; k < n; k++) {
            T g = G(k);
            T mm = mt[k] + ((T)1 - b1) * (g - mt[k]);
            T vv = vt[k] + ((T)1 - b2) * (g * g - vt[k]);
            mt[k] = mm; vt[k] = vv;
            PUT(k, w[k] * keep - (cm * mm + cg * g) * lr / (SQRT(vv * cv2) + eps));
        }
        break;
    case FG_ADAMAX:
        for (ptrdiff_t k = 0; k < n; k++) {
            T g = G(k), bu = b2 * vt[k], ag = FABS(g);
            T mm = mt[k] + ((T)1 - b1) * (g - mt[k]);
            T uu = bu > ag ? bu : ag;
            mt[k] = mm; vt[k] = uu;
            PUT(k, w[k] * keep - lr * mm / (bc1 * (uu + eps)));
        }
        break;
    case FG_ADADELTA:   /* v: accumulated g^2, m: accumulated delta^2 */
        for (ptrdiff_t k = 0; k < n; k++) {
            T g = G(k);
            T ag = rho * vt[k] + ((T)1 - rho) * g * g;
            T d = -(SQRT(mt[k] + eps) * g) / SQRT(ag + eps);
            vt[k] = ag;
            mt[k] = rho * mt[k] + ((T)1 - rho) * d * d;
            PUT(k, w[k] * keep + lr * d);
        }
        break;
    case FG_LION:
        for (ptrdiff_t k = 0; k < n; k++) {
            T g = G(k), c = mt[k] * b1 + g * ((T)1 - b1);
            T sgn = (T)(c > 0) - (T)(c < 0);
            mt[k] = mt[k] * b2 + g * ((T)1 - b2);
            PUT(k, w[k] * keep - lr * sgn);
        }
        break;
    }
#undef G
#undef PUT
    return bad;
}

/* Pass 2: one read and one write of every parameter, gradient and moment.
 * Per element, with g the gradient after pass 1:
 *   g = clip(g * scale[t], -clipvalue, clipvalue)     (clipping, Keras order)
 *   w -= lr * weight_decay * w                        (decoupled decay, if any)
 *   SGD       v = momentum v - lr g;  w += v  (nesterov: w += momentum v - lr g)
 *             or w -= lr g without momentum
 *   RMSprop   v = rho v + (1-rho) g^2;  centered: m = rho m + (1-rho) g,
 *             d = v - m^2 + eps, else d = v + eps;  u = lr g / sqrt(d);
 *             momentum: vmax = momentum vmax + u, w -= vmax;  else w -= u
 *   Adam      m += (1-beta_1)(g - m);  v += (1-beta_2)(g^2 - v);
 *             amsgrad: vmax = max(vmax, v), used for v;
 *             w -= lr sqrt(1-beta_2^t)/(1-beta_1^t) * m / (sqrt(v) + eps)
 *   Adagrad   v += g^2;  w -= lr g / sqrt(v + eps)
 *   Nadam     m, v as Adam; u_i = beta_1 (1 - 0.96^i / 2), U_t = prod_{i<=t} u_i
 *             (c->u_product, kept by the caller);
 *             w -= lr (u_{t+1} m / (1 - U_t u_{t+1}) + (1 - u_t) g / (1 - U_t))
 *                  / (sqrt(v / (1 - beta_2^t)) + eps)
 *   Adamax    m += (1-beta_1)(g - m);  u = max(beta_2 u, |g|)  (u in v);
 *             w -= lr m / ((1 - beta_1^t) (u + eps))
 *   Adadelta  a = rho a + (1-rho) g^2 (in v);  d = -sqrt(s + eps) g / sqrt(a + eps);
 *             s = rho s + (1-rho) d^2 (in m);  w += lr d
 *   Lion      w -= lr sign(beta_1 m + (1-beta_1) g);  m = beta_2 m + (1-beta_2) g
 * then, with an ema buffer, avg = mom avg + (1 - mom) w (and w = avg when
 * c->ema_overwrite), then the tensor's constraint (NonNeg, ClipValue,
 * MaxNorm), as Keras orders them. With an acc buffer, c->accumulate_only
 * makes the call a micro-step of gradient accumulation: acc += g and no
 * update (the EMA and the constraint still run, as in Keras); otherwise acc
 * is cleared after its tensor's update.
 * A frozen tensor (tt->frozen[t]) is skipped: weights, moments, EMA,
 * accumulator and constraint.
 * When tt->upd_sumsq is set, each tensor's sum (w_new - w_old)^2 (before the
 * constraint) and sum w_new^2 are accumulated too, block by block.
 * first_overflow receives the first tensor whose weights are not all finite
 * after the step (finite gradients whose update overflowed), or -1. */
/* The exponential moving average of n weights, and their overwrite. */
FG_INLINE void S(ema_range)(T *restrict w, T *restrict avg, T mom, int overwrite, ptrdiff_t n)
{
    if (overwrite) {
        for (ptrdiff_t k = 0; k < n; k++) { T a = mom * avg[k] + ((T)1 - mom) * w[k]; avg[k] = a; w[k] = a; }
    } else {
        for (ptrdiff_t k = 0; k < n; k++) avg[k] = mom * avg[k] + ((T)1 - mom) * w[k];
    }
}

FG_INLINE void S(dlanes_add)(S(dlanes) *a, const S(dlanes) *b)
{
    double x[16], y[16];
    memcpy(x, a, sizeof x);
    memcpy(y, b, sizeof y);
    for (int j = 0; j < 16; j++) x[j] += y[j];
    memcpy(a, x, sizeof x);
}

/* The tracked update of n elements of one tensor from a block boundary:
 * runs of up to 16 blocks per update call (a call's set-up costs as much
 * as a block's update), then each block's change and new weights into du,
 * ww while the run is in L1; a last partial block is zero-padded. The
 * update's flags go unused (and compile away): a weight that is not finite
 * shows in the sums. With et, the moving average follows each run. */
FG_INLINE void S(track_range)(const S(opt_consts) *q, T *w, const T *gr, T *mt, T *vt,
                              T *xt, T *et, T ema_m, int ema_over, T sc, ptrdiff_t n,
                              S(dlanes) *du, S(dlanes) *ww)
{
    enum { BLOCK = FG_UPD_BLOCK, RUN = 16 * FG_UPD_BLOCK };
    T dw[RUN];
    ptrdiff_t k0 = 0;
    for (; k0 + BLOCK <= n; ) {
        const ptrdiff_t whole = (n - k0) / BLOCK * BLOCK, len = whole < RUN ? whole : RUN;
        S(update_range)(q, w + k0, gr + k0, mt ? mt + k0 : NULL, vt ? vt + k0 : NULL,
                        xt ? xt + k0 : NULL, dw, sc, len);
        for (ptrdiff_t b = 0; b < len; b += BLOCK)
            S(block_sumsq2)(du, ww, dw + b, w + k0 + b);
        if (et) S(ema_range)(w + k0, et + k0, ema_m, ema_over, len);
        k0 += len;
    }
    if (k0 < n) {
        T ws[BLOCK] = {0};
        S(update_range)(q, w + k0, gr + k0, mt ? mt + k0 : NULL, vt ? vt + k0 : NULL,
                        xt ? xt + k0 : NULL, dw, sc, n - k0);
        for (ptrdiff_t k = n - k0; k < BLOCK; k++) dw[k] = 0;
        for (ptrdiff_t k = 0; k < n - k0; k++) ws[k] = w[k0 + k];
        S(block_sumsq2)(du, ww, dw, ws);
        if (et) S(ema_range)(w + k0, et + k0, ema_m, ema_over, n - k0);
    }
}

/* The tracked update in parts (fg_parallel's ctx): part u is elements
 * [first[u], first[u] + len[u]) of tensor tensor[u]; its sums go to du[u],
 * ww[u], which the caller adds in order. */
typedef struct {
    const S(opt_consts) *q;
    T *param, *m, *v, *vmax;
    const T *grad;
    const fg_tensors *tt;
    const int *tensor;
    const ptrdiff_t *first, *len;
    S(dlanes) *du, *ww;
} S(track_args);

FG_TARGETS static void S(track_part)(void *p, ptrdiff_t lo, ptrdiff_t hi)
{
    const S(track_args) *A = p;
    for (ptrdiff_t u = lo; u < hi; u++) {
        const ptrdiff_t a = (ptrdiff_t)A->tt->offset[A->tensor[u]] + A->first[u];
        memset(&A->du[u], 0, sizeof A->du[u]);
        memset(&A->ww[u], 0, sizeof A->ww[u]);
        S(track_range)(A->q, A->param + a, A->grad + a, A->m ? A->m + a : NULL,
                       A->v ? A->v + a : NULL, A->vmax ? A->vmax + a : NULL, NULL, 0, 0,
                       (T)A->tt->scale[A->tensor[u]], A->len[u], &A->du[u], &A->ww[u]);
    }
}

/* What a share of the plain update needs (fg_parallel's ctx): elements
 * [lo, hi) of the flat buffers, over the tensors they meet. */
typedef struct {
    const S(opt_consts) *q;
    T *param, *m, *v, *vmax;
    const T *grad;
    const fg_tensors *tt;
    ptrdiff_t share;
    unsigned char *bad;   /* per share: a weight not finite after it */
} S(upd_args);

FG_TARGETS static void S(update_part)(void *p, ptrdiff_t lo, ptrdiff_t hi)
{
    const S(upd_args) *A = p;
    const fg_tensors *tt = A->tt;
    ptrdiff_t t = 0, top = tt->n_tensors;   /* the tensor holding lo */
    while (t + 1 < top) {
        ptrdiff_t mid = (t + top) / 2;
        if ((ptrdiff_t)tt->offset[mid] <= lo) t = mid; else top = mid;
    }
    int bad = 0;
    for (; t < tt->n_tensors && (ptrdiff_t)tt->offset[t] < hi; t++) {
        ptrdiff_t a = (ptrdiff_t)tt->offset[t], b = (ptrdiff_t)tt->offset[t + 1];
        a = a > lo ? a : lo;
        b = b < hi ? b : hi;
        if (a >= b || (tt->frozen && tt->frozen[t])) continue;
        bad |= S(update_range)(A->q, A->param + a, A->grad + a, A->m ? A->m + a : NULL,
                               A->v ? A->v + a : NULL, A->vmax ? A->vmax + a : NULL, NULL,
                               (T)tt->scale[t], b - a);
    }
    A->bad[lo / A->share] |= (unsigned char)bad;
}

FG_TARGETS int S(fg_optimizer_step)(int64_t *first_overflow, T *param, T *m, T *v,
                         T *vmax, T *ema, T *acc, const T *grad, const fg_tensors *tt,
                         const fg_opt_config *c)
{
    *first_overflow = -1;
    if (c->kind < 0 || c->kind >= FG_N_OPTIMIZERS) return FG_EOPTIMIZER;
    S(opt_consts) q;
    q.kind = c->kind; q.clip = c->clipvalue > 0; q.nesterov = c->nesterov;
    q.centered = c->centered; q.amsgrad = c->amsgrad;
    q.lr = (T)c->lr; q.mu = (T)c->momentum; q.eps = (T)c->epsilon;
    q.keep = (T)(1.0 - c->lr * c->weight_decay);   /* decay as a factor */
    q.cv = (T)c->clipvalue; q.rho = (T)c->rho; q.b1 = (T)c->beta_1; q.b2 = (T)c->beta_2;
    q.adam_lr = q.cm = q.cg = q.cv2 = q.bc1 = 0;
    const double t = (double)c->step;
    if (c->kind == FG_ADAM)
        q.adam_lr = (T)(c->lr * sqrt(1.0 - pow(c->beta_2, t)) / (1.0 - pow(c->beta_1, t)));
    if (c->kind == FG_NADAM) {
        /* in T, as Keras computes them in the variable's dtype */
        T u_t = (T)c->beta_1 * ((T)1 - (T)0.5 * (T)pow(0.96, t));
        T u_t1 = (T)c->beta_1 * ((T)1 - (T)0.5 * (T)pow(0.96, t + 1.0));
        T up_t = (T)c->u_product, up_t1 = up_t * u_t1;
        q.cm = u_t1 / ((T)1 - up_t1);
        q.cg = ((T)1 - u_t) / ((T)1 - up_t);
        q.cv2 = (T)1 / ((T)1 - (T)pow(c->beta_2, t));
    }
    if (c->kind == FG_ADAMAX) q.bc1 = (T)(1.0 - pow(c->beta_1, t));
    const T ema_m = (T)c->ema_momentum;
    const int ema_over = c->ema_overwrite, acc_only = acc && c->accumulate_only;
    const unsigned fp_mode = fg_flush_begin();
    enum { CHUNK = 4096 };
    /* The update of a large model runs in shares over the kernel threads
     * first (element by element, or tracked parts: the same bits at any
     * count); the tensor loop below then does the rest. */
    enum { SHARES = 1024, SHARE = 8192, PARTS = 160 };
    const ptrdiff_t total = tt->n_tensors > 0 ? (ptrdiff_t)tt->offset[tt->n_tensors] : 0;
    const int split = !acc_only && !ema && total >= 4 * SHARE;
    /* Tracked sums go over parts of each tensor, from its start: lanes per
     * part, added in order, the same bits split or not. A part is at least
     * 64 blocks, and so large that a model has at most 96 parts beyond one
     * per tensor; with too many tensors for PARTS, the parts run here. */
    const ptrdiff_t part_blocks = ((total + 95) / 96 + FG_UPD_BLOCK - 1) / FG_UPD_BLOCK;
    const ptrdiff_t part_len = (part_blocks > 64 ? part_blocks : 64) * FG_UPD_BLOCK;
    const int plain_split = split && !tt->upd_sumsq;
    int split_bad = 0, tracked_split = split && tt->upd_sumsq;
    S(dlanes) pdu[PARTS], pww[PARTS];
    int ptensor[PARTS];
    ptrdiff_t pfirst[PARTS], plen[PARTS], nparts = 0;
    for (ptrdiff_t t = 0; t < tt->n_tensors && tracked_split; t++) {
        const ptrdiff_t n = (ptrdiff_t)(tt->offset[t + 1] - tt->offset[t]);
        if (tt->frozen && tt->frozen[t]) continue;
        for (ptrdiff_t k0 = 0; k0 < n; k0 += part_len, nparts++) {
            tracked_split = nparts < PARTS;
            if (!tracked_split) break;
            ptensor[nparts] = (int)t;
            pfirst[nparts] = k0;
            plen[nparts] = n - k0 < part_len ? n - k0 : part_len;
        }
    }
    if (tracked_split) {
        S(track_args) A = {.q = &q, .param = param, .m = m, .v = v, .vmax = vmax,
                           .grad = grad, .tt = tt, .tensor = ptensor, .first = pfirst,
                           .len = plen, .du = pdu, .ww = pww};
        fg_parallel(S(track_part), &A, nparts, 1);
    }
    if (plain_split) {
        unsigned char flags[SHARES] = {0};
        ptrdiff_t share = (total + SHARES - 1) / SHARES;
        share = share > SHARE ? share : SHARE;
        S(upd_args) A = {.q = &q, .param = param, .m = m, .v = v, .vmax = vmax, .grad = grad,
                         .tt = tt, .share = share, .bad = flags};
        fg_parallel(S(update_part), &A, total, share);
        for (int i = 0; i < SHARES; i++) split_bad |= flags[i];
    }
    ptrdiff_t u_next = 0;   /* the next tracked part to add */
    for (ptrdiff_t t = 0; t < tt->n_tensors; t++) {
        if (tt->frozen && tt->frozen[t]) {   /* weights and moments untouched */
            if (tt->upd_sumsq) tt->upd_sumsq[t] = tt->w_sumsq[t] = 0.0;
            continue;
        }
        ptrdiff_t a = (ptrdiff_t)tt->offset[t], n = (ptrdiff_t)tt->offset[t + 1] - a;
        T *w = param + a;
        const T *gr = grad + a;
        T *mt = m ? m + a : NULL, *vt = v ? v + a : NULL, *xt = vmax ? vmax + a : NULL;
        const T sc = (T)tt->scale[t];
        T *et = ema ? ema + a : NULL;
        int bad = 0;
        if (plain_split) {
            bad = split_bad;   /* whose weights: looked for below */
        } else if (acc_only) {   /* a micro-step: the weights do not change */
            T *at = acc + a;
            for (ptrdiff_t k = 0; k < n; k++) at[k] += gr[k];
            if (et) S(ema_range)(w, et, ema_m, ema_over, n);
        } else if (!tt->upd_sumsq && !et) {
            bad = S(update_range)(&q, w, gr, mt, vt, xt, NULL, sc, n);
        } else if (!tt->upd_sumsq) {
            /* the average follows each chunk while it is in cache */
            for (ptrdiff_t k0 = 0; k0 < n; k0 += CHUNK) {
                ptrdiff_t len = n - k0 < CHUNK ? n - k0 : CHUNK;
                bad |= S(update_range)(&q, w + k0, gr + k0, mt ? mt + k0 : NULL,
                                       vt ? vt + k0 : NULL, xt ? xt + k0 : NULL, NULL, sc, len);
                S(ema_range)(w + k0, et + k0, ema_m, ema_over, len);
            }
        } else {
            S(dlanes) du = {0}, ww = {0};
            if (tracked_split) {
                for (; u_next < nparts && ptensor[u_next] == t; u_next++) {
                    S(dlanes_add)(&du, &pdu[u_next]);
                    S(dlanes_add)(&ww, &pww[u_next]);
                }
            } else {
                for (ptrdiff_t k0 = 0; k0 < n; k0 += part_len) {
                    S(dlanes) pu = {0}, pw = {0};
                    S(track_range)(&q, w + k0, gr + k0, mt ? mt + k0 : NULL,
                                   vt ? vt + k0 : NULL, xt ? xt + k0 : NULL,
                                   et ? et + k0 : NULL, ema_m, ema_over, sc,
                                   n - k0 < part_len ? n - k0 : part_len, &pu, &pw);
                    S(dlanes_add)(&du, &pu);
                    S(dlanes_add)(&ww, &pw);
                }
            }
            tt->upd_sumsq[t] = S(dlanes_total)(&du);
            tt->w_sumsq[t] = S(dlanes_total)(&ww);
            /* inf or NaN in the sums: an update that overflowed, or only
             * squares past the range; a look at the weights tells */
            bad = !(tt->upd_sumsq[t] + tt->w_sumsq[t] <= DBL_MAX);
        }
        if (acc && !acc_only && n > 0) memset(acc + a, 0, (size_t)n * sizeof(T));
        /* Constraints: rare, so a second pass over the constrained tensor
         * keeps the update loops free of them. */
        const T cval = (T)tt->cvalue[t];
        switch (tt->constraint[t]) {
        case FG_NON_NEG:
            for (ptrdiff_t k = 0; k < n; k++) w[k] = w[k] < 0 ? (T)0 : w[k];
            break;
        case FG_CLIP_VALUE:
            for (ptrdiff_t k = 0; k < n; k++) w[k] = FG_CLAMP(w[k], -cval, cval);
            break;
        case FG_MAX_NORM:
            S(max_norm)(w, n, (ptrdiff_t)tt->cols[t], tt->cvalue[t]);
            break;
        }
        if (bad && (split || tt->upd_sumsq || et || tt->constraint[t] != FG_NO_CONSTRAINT)) {
            bad = 0;   /* a constraint (ClipValue) may have mended it */
            for (ptrdiff_t k = 0; k < n; k++) bad |= !(FABS(w[k]) <= T_MAX);
        }
        if (bad && *first_overflow < 0) *first_overflow = t;
    }
    fg_flush_end(fp_mode);
    return FG_OK;
}

/* BatchNormalization forward. inp, out are (B,F); gamma, beta (F) or NULL
 * (scale=False, center=False); mean, rstd (F) receive what backward needs;
 * moving_mean, moving_var (F).
 * training: mu, var = batch mean and biased variance, accumulated in double
 *           about the first row (shifted data: no cancellation when the mean
 *           is large against the spread);
 *           moving = momentum * moving + (1 - momentum) * batch statistic
 * inference: mu, var = moving_mean, moving_var
 * out = gamma * (inp - mu) / sqrt(var + epsilon) + beta.  out may alias inp.
 * One row (B = 1) has var = 0, so out = beta, as in Keras. No rows (B = 0)
 * estimate nothing: the moving statistics stay and mean, rstd are theirs. */
FG_TARGETS void S(fg_batchnorm_forward)(T *out, double *mean, double *rstd,
                            T *moving_mean, T *moving_var, const T *inp,
                            const T *gamma, const T *beta, ptrdiff_t B,
                            ptrdiff_t F, double epsilon, double momentum,
                            int training)
{
    double s1[FG_COLS], s2[FG_COLS], sh[FG_COLS];
    T mhi[FG_COLS], mlo[FG_COLS], a[FG_COLS], b[FG_COLS];
    if (B <= 0) training = 0;
    for (ptrdiff_t c0 = 0; c0 < F; c0 += FG_COLS) {
        ptrdiff_t w = F - c0 < FG_COLS ? F - c0 : FG_COLS;
        if (training) {
            const T *shift = inp + c0;   /* row 0 */
            for (ptrdiff_t j = 0; j < w; j++) {
                s1[j] = s2[j] = 0.0;
                sh[j] = (double)shift[j];
            }
            /* four rows at a time: a quarter of the loads and stores of s1, s2 */
            ptrdiff_t i = 0;
            for (; i + 4 <= B; i += 4) {
                const T *x = inp + i * F + c0, *x1 = x + F, *x2 = x1 + F, *x3 = x2 + F;
                for (ptrdiff_t j = 0; j < w; j++) {
                    double d0 = (double)x[j] - sh[j], d1 = (double)x1[j] - sh[j];
                    double d2 = (double)x2[j] - sh[j], d3 = (double)x3[j] - sh[j];
                    s1[j] += (d0 + d1) + (d2 + d3);
                    s2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
                }
            }
            for (; i < B; i++) {
                const T *x = inp + i * F + c0;
                for (ptrdiff_t j = 0; j < w; j++) {
                    double d = (double)x[j] - sh[j];
                    s1[j] += d;
                    s2[j] += d * d;
                }
            }
            for (ptrdiff_t j = 0; j < w; j++) {
                double dm = s1[j] / (double)B;
                double var = s2[j] / (double)B - dm * dm;
                if (var < 0) var = 0;
                double mu = (double)shift[j] + dm;
                mean[c0 + j] = mu;
                rstd[c0 + j] = 1.0 / sqrt(var + epsilon);
                moving_mean[c0 + j] = (T)(momentum * moving_mean[c0 + j] + (1.0 - momentum) * mu);
                moving_var[c0 + j] = (T)(momentum * moving_var[c0 + j] + (1.0 - momentum) * var);
            }
        } else {
            for (ptrdiff_t j = 0; j < w; j++) {
                mean[c0 + j] = moving_mean[c0 + j];
                rstd[c0 + j] = 1.0 / sqrt((double)moving_var[c0 + j] + epsilon);
            }
        }
        /* y = a (x - mu) + b per column, in T so that it vectorizes. The mean
         * is split into mhi + mlo: x - mhi is exact for x near the mean
         * (Sterbenz), so large means lose nothing. */
        for (ptrdiff_t j = 0; j < w; j++) {
            double mu = mean[c0 + j];
            mhi[j] = (T)mu;
            mlo[j] = (T)(mu - (double)mhi[j]);
            a[j] = (T)((gamma ? (double)gamma[c0 + j] : 1.0) * rstd[c0 + j]);
            b[j] = beta ? beta[c0 + j] : (T)0;
        }
        for (ptrdiff_t i = 0; i < B; i++) {
            const T *x = inp + i * F + c0;
            T *y = out + i * F + c0;
            for (ptrdiff_t j = 0; j < w; j++)
                y[j] = a[j] * ((x[j] - mhi[j]) - mlo[j]) + b[j];
        }
    }
}

/* BatchNormalization backward (training statistics), closed form with
 * xhat = (inp - mean) rstd recomputed, g = dout * gamma:
 *   dbeta  = sum_i dout        dgamma = sum_i dout xhat
 *   dinp   = rstd / B * (B g - sum_i g - xhat sum_i g xhat)
 * Sums accumulate in double; the centering splits the mean as forward does.
 * dgamma, dbeta may be NULL; dinp may alias dout. */
FG_TARGETS void S(fg_batchnorm_backward)(T *dinp, T *dgamma, T *dbeta, const T *dout,
                             const T *inp, const double *mean,
                             const double *rstd, const T *gamma,
                             ptrdiff_t B, ptrdiff_t F)
{
    double sd[FG_COLS], sdx[FG_COLS];
    T mhi[FG_COLS], mlo[FG_COLS], kk[FG_COLS];
    double md[FG_COLS], mx[FG_COLS];
    for (ptrdiff_t c0 = 0; c0 < F; c0 += FG_COLS) {
        ptrdiff_t w = F - c0 < FG_COLS ? F - c0 : FG_COLS;
        const double *rs = rstd + c0;
        for (ptrdiff_t j = 0; j < w; j++) {
            sd[j] = sdx[j] = 0.0;
            mhi[j] = (T)mean[c0 + j];
            mlo[j] = (T)(mean[c0 + j] - (double)mhi[j]);
        }
        ptrdiff_t i = 0;
        for (; i + 4 <= B; i += 4) {     /* four rows at a time, as forward */
            const T *x0 = inp + i * F + c0, *y0 = dout + i * F + c0;
            const T *x1 = x0 + F, *x2 = x1 + F, *x3 = x2 + F;
            const T *y1 = y0 + F, *y2 = y1 + F, *y3 = y2 + F;
            for (ptrdiff_t j = 0; j < w; j++) {
                T c0_ = (x0[j] - mhi[j]) - mlo[j], c1 = (x1[j] - mhi[j]) - mlo[j];
                T c2 = (x2[j] - mhi[j]) - mlo[j], c3 = (x3[j] - mhi[j]) - mlo[j];
                sd[j] += ((double)y0[j] + (double)y1[j]) + ((double)y2[j] + (double)y3[j]);
                sdx[j] += ((double)(y0[j] * c0_) + (double)(y1[j] * c1))
                        + ((double)(y2[j] * c2) + (double)(y3[j] * c3));
            }
        }
        for (; i < B; i++) {
            const T *x = inp + i * F + c0, *dy = dout + i * F + c0;
            for (ptrdiff_t j = 0; j < w; j++) {
                T xc = (x[j] - mhi[j]) - mlo[j];
                sd[j] += dy[j];
                sdx[j] += (double)(dy[j] * xc);
            }
        }
        for (ptrdiff_t j = 0; j < w; j++) {
            sdx[j] *= rs[j];           /* sum dy xhat */
            if (dbeta) dbeta[c0 + j] = (T)sd[j];
            if (dgamma) dgamma[c0 + j] = (T)sdx[j];
            /* dinp = k (dy - sd/B - xc rstd sdx/B), k = gamma rstd */
            kk[j] = (T)((gamma ? (double)gamma[c0 + j] : 1.0) * rs[j]);
            md[j] = B > 0 ? sd[j] / (double)B : 0.0;   /* B = 0: no rows use them */
            mx[j] = B > 0 ? sdx[j] * rs[j] / (double)B : 0.0;
        }
        for (ptrdiff_t i = 0; i < B; i++) {
            const T *x = inp + i * F + c0, *dy = dout + i * F + c0;
            T *dx = dinp + i * F + c0;
            /* dy - mean(dy) - xhat mean(dy xhat) cancels to almost nothing in
             * small batches: that difference is taken in double */
            for (ptrdiff_t j = 0; j < w; j++) {
                T xc = (x[j] - mhi[j]) - mlo[j];
                dx[j] = (T)((double)kk[j] * ((double)dy[j] - md[j] - (double)xc * mx[j]));
            }
        }
    }
}

/* Inverted dropout: out = inp * keep_k / (1 - rate), keep_k drawn with
 * probability 1 - rate from fg_splitmix64(seed, offset + k). Backward is the
 * same call on the gradient with the same seed and offset. out may alias inp. */
FG_TARGETS void S(fg_dropout_forward)(T *out, const T *inp, ptrdiff_t N, double rate,
                           uint64_t seed, uint64_t offset)
{
    /* keep when the top 32 bits r are below (1 - rate) 2^32, compared in
     * 32 bits (no 64-bit vector comparison before SSE4.2): r < lim, or
     * every r when the bound is 2^32 */
    const uint64_t threshold = (uint64_t)((1.0 - rate) * 4294967296.0);
    const int all = threshold > 0xFFFFFFFFu;
    const uint32_t lim = all ? 0xFFFFFFFFu : (uint32_t)threshold;
    const T scale = (T)(1.0 / (1.0 - rate));
    if (fg_wide_products())
        for (ptrdiff_t k = 0; k < N; k++) {
            uint32_t r = (uint32_t)(fg_splitmix64_wide(seed, offset + (uint64_t)k) >> 32);
            out[k] = inp[k] * SELECT((r < lim) | all, scale, (T)0);
        }
    else
        for (ptrdiff_t k = 0; k < N; k++) { /* vec */
            uint32_t r = (uint32_t)(fg_splitmix64(seed, offset + (uint64_t)k) >> 32);
            out[k] = inp[k] * SELECT((r < lim) | all, scale, (T)0);
        }
}

/* Gaussian noise from the dropout generator: element k takes one normal
 * number z_k from fg_splitmix64(seed, offset + k) by Box-Muller on its two
 * 32-bit halves (u1 in (0, 1], so the logarithm is finite; |z| < 6.7):
 *   multiply == 0:  out = inp + stddev z            (GaussianNoise)
 *   multiply == 1:  out = inp (1 + stddev z)        (GaussianDropout)
 * The same call on the gradient with the same seed and offset is the
 * backward of the multiplicative form. out may alias inp. */
FG_TARGETS void S(fg_gaussian_noise)(T *out, const T *inp, ptrdiff_t N, double stddev,
                          int multiply, uint64_t seed, uint64_t offset)
{
    const double two_pi = 6.283185307179586476925286766559;
    for (ptrdiff_t k = 0; k < N; k++) {
        uint64_t r = fg_splitmix64(seed, offset + (uint64_t)k);
        double u1 = ((double)(r >> 32) + 1.0) * 0x1p-32, u2 = (double)(r & 0xffffffffu) * 0x1p-32;
        T e = (T)(stddev * sqrt(-2.0 * log(u1)) * cos(two_pi * u2));
        out[k] = multiply ? inp[k] * ((T)1 + e) : inp[k] + e;
    }
}

/* Alpha dropout (Klambauer et al. 2017) with the mask of fg_dropout_forward
 * (same generator and threshold): out = keep ? a inp + b_keep : b_drop.
 * Forward: b_keep = b, b_drop = a alpha' + b (layers.AlphaDropout gives the
 * formulas); backward: the same call on the gradient with b_keep = b_drop = 0.
 * out may alias inp. */
FG_TARGETS void S(fg_alpha_dropout)(T *out, const T *inp, ptrdiff_t N, double rate,
                         double a, double b_keep, double b_drop,
                         uint64_t seed, uint64_t offset)
{
    const uint64_t threshold = (uint64_t)((1.0 - rate) * 4294967296.0);
    const T ta = (T)a, tk = (T)b_keep, td = (T)b_drop;
    for (ptrdiff_t k = 0; k < N; k++) {
        uint64_t r = fg_splitmix64(seed, offset + (uint64_t)k) >> 32;
        T x = inp[k], kept = ta * x + tk;
        out[k] = r < threshold ? kept : td;
    }
}

/* A per-feature affine map (Normalization, Rescaling and their backward).
 * inp, out are (B,F); shift (F) or NULL (zeros), scale (F).
 *   divide:  out = (inp - shift) / scale       else:  out = inp * scale + shift
 * out may alias inp. */
FG_TARGETS void S(fg_affine)(T *out, const T *inp, const T *shift, const T *scale,
                  ptrdiff_t B, ptrdiff_t F, int divide)
{
    for (ptrdiff_t i = 0; i < B; i++) {
        const T *x = inp + i * F;
        T *y = out + i * F;
        if (divide && shift) for (ptrdiff_t j = 0; j < F; j++) y[j] = (x[j] - shift[j]) / scale[j];
        else if (divide) for (ptrdiff_t j = 0; j < F; j++) y[j] = x[j] / scale[j];
        else if (shift) for (ptrdiff_t j = 0; j < F; j++) y[j] = x[j] * scale[j] + shift[j];
        else for (ptrdiff_t j = 0; j < F; j++) y[j] = x[j] * scale[j];
    }
}

/* Index of the first row of x (B,F) holding inf or NaN, or -1. */
FG_TARGETS ptrdiff_t S(fg_first_nonfinite_row)(const T *x, ptrdiff_t B, ptrdiff_t F)
{
    for (ptrdiff_t i = 0; i < B; i++) {
        const T *r = x + i * F;
        int bad = 0;
        /* x - x is 0 for finite x and NaN for inf or NaN; an integer OR
         * reduction vectorizes where a float sum would not */
        for (ptrdiff_t j = 0; j < F; j++) {
            T d = r[j] - r[j];
            bad |= d != d;
        }
        if (bad) return i;
    }
    return -1;
}

/* LayerNormalization forward, per row of inp (B,F); gamma, beta (F) or NULL
 * (scale=False, center=False); mean, rstd (B) receive what backward needs:
 *   mu = mean_j x_j,  var = mean_j (x_j - mu)^2     (two passes, in double)
 *   out = gamma (x - mu) / sqrt(var + epsilon) + beta
 * The row stays in L1 between its passes; sums run over FG_LN_LANES lanes
 * in a fixed order (they vectorize and give the same result on every
 * instruction set). Two passes: no cancellation when the mean is large
 * against the spread. Rows are split over threads (fg_parallel) when there
 * are at least FG_PARALLEL_MIN elements; each row's result is the same
 * whichever thread computes it. out may alias inp. */
#ifndef FG_LN_LANES
#define FG_LN_LANES 32
#endif
typedef struct {
    T *out, *dinp, *dgamma, *dbeta;
    double *mean, *rstd, *work;
    const T *inp, *dout, *gamma, *beta;
    const double *cmean, *crstd;
    ptrdiff_t B, F;
    double epsilon;
} S(ln_args);

FG_TARGETS static void S(ln_forward_part)(void *p, ptrdiff_t lo, ptrdiff_t hi)
{
    enum { L = FG_LN_LANES };
    const S(ln_args) *a = p;
    const ptrdiff_t F = a->F;
    const T *gamma = a->gamma, *beta = a->beta;
    for (ptrdiff_t i = lo; i < hi; i++) {
        const T *x = a->inp + i * F;
        T *y = a->out + i * F;
        double acc[L] = {0};
        ptrdiff_t k = 0;
        for (; k + L <= F; k += L)
            for (int l = 0; l < L; l++) acc[l] += (double)x[k + l];
        for (int l = 0; k < F; k++, l++) acc[l] += (double)x[k];
        const double mu = S(lanes_total)(acc, L) / (double)F;
        for (int l = 0; l < L; l++) acc[l] = 0.0;
        for (k = 0; k + L <= F; k += L)
            for (int l = 0; l < L; l++) {
                double c = (double)x[k + l] - mu;
                acc[l] += c * c;
            }
        for (int l = 0; k < F; k++, l++) {
            double c = (double)x[k] - mu;
            acc[l] += c * c;
        }
        const double r = 1.0 / sqrt(S(lanes_total)(acc, L) / (double)F + a->epsilon);
        a->mean[i] = mu;
        a->rstd[i] = r;
        /* in T so that it vectorizes; mu = mhi + mlo, and x - mhi is exact
         * for x near the mean (Sterbenz), so a large mean loses nothing */
        const T mhi = (T)mu, mlo = (T)(mu - (double)mhi), rt = (T)r;
        if (gamma && beta)
            for (ptrdiff_t j = 0; j < F; j++) y[j] = ((x[j] - mhi) - mlo) * rt * gamma[j] + beta[j];
        else if (gamma)
            for (ptrdiff_t j = 0; j < F; j++) y[j] = ((x[j] - mhi) - mlo) * rt * gamma[j];
        else if (beta)
            for (ptrdiff_t j = 0; j < F; j++) y[j] = ((x[j] - mhi) - mlo) * rt + beta[j];
        else
            for (ptrdiff_t j = 0; j < F; j++) y[j] = ((x[j] - mhi) - mlo) * rt;
    }
}

void S(fg_layernorm_forward)(T *out, double *mean, double *rstd, const T *inp,
                             const T *gamma, const T *beta, ptrdiff_t B, ptrdiff_t F,
                             double epsilon)
{
    S(ln_args) a = {.out = out, .mean = mean, .rstd = rstd, .inp = inp, .gamma = gamma,
                    .beta = beta, .B = B, .F = F, .epsilon = epsilon};
    fg_parallel(S(ln_forward_part), &a, B, S(share)(B, F, 1));
}

/* xhat = (x - mean) rstd of row i, in T as the forward computes it. */
#define FG_LN_XHAT(x, j, i) ((((x)[j] - mhi[i]) - mlo[i]) * rt[i])

/* Column sums of LayerNormalization's backward over the n <= 4 rows of
 * dout and inp (B,F), added to wg (dgamma) and wb (dbeta): a group of four
 * rows is added in T (one conversion instead of four), the groups in
 * double. */
FG_INLINE void S(ln_columns)(double *wg, double *wb, const T *dout, const T *inp,
                             const double *mean, const double *rstd,
                             ptrdiff_t n, ptrdiff_t F)
{
    T mhi[4], mlo[4], rt[4];
    for (ptrdiff_t i = 0; i < n; i++) {
        mhi[i] = (T)mean[i];
        mlo[i] = (T)(mean[i] - (double)mhi[i]);
        rt[i] = (T)rstd[i];
    }
    if (n == 4) {
        const T *x0 = inp, *x1 = inp + F, *x2 = inp + 2 * F, *x3 = inp + 3 * F;
        const T *d0 = dout, *d1 = dout + F, *d2 = dout + 2 * F, *d3 = dout + 3 * F;
        for (ptrdiff_t j = 0; j < F; j++) {
            T g0 = d0[j] * FG_LN_XHAT(x0, j, 0), g1 = d1[j] * FG_LN_XHAT(x1, j, 1);
            T g2 = d2[j] * FG_LN_XHAT(x2, j, 2), g3 = d3[j] * FG_LN_XHAT(x3, j, 3);
            wg[j] += (double)((g0 + g1) + (g2 + g3));
            wb[j] += (double)((d0[j] + d1[j]) + (d2[j] + d3[j]));
        }
        return;
    }
    for (ptrdiff_t i = 0; i < n; i++) {
        const T *x = inp + i * F, *dy = dout + i * F;
        for (ptrdiff_t j = 0; j < F; j++) {
            wg[j] += (double)(dy[j] * FG_LN_XHAT(x, j, i));
            wb[j] += (double)dy[j];
        }
    }
}

/* dinp of row i: pass A takes the row's two sums, pass B writes it. */
FG_INLINE void S(ln_backward_row)(const S(ln_args) *a, ptrdiff_t i)
{
    enum { L = FG_LN_LANES };
    const ptrdiff_t F = a->F;
    const T *gamma = a->gamma;
    const T *x = a->inp + i * F, *dy = a->dout + i * F;
    T *dx = a->dinp + i * F;
    const T mhi[1] = {(T)a->cmean[i]}, mlo[1] = {(T)(a->cmean[i] - (double)mhi[0])};
    const T rt[1] = {(T)a->crstd[i]};
#define FG_G(j) (gamma ? dy[j] * gamma[j] : dy[j])
    double a1[L] = {0}, a2[L] = {0};
    ptrdiff_t k = 0;
    /* two terms added in T, then in double: half the conversions, and an
     * error of the order of g's own rounding */
    for (; k + 2 * L <= F; k += 2 * L)
        for (int l = 0; l < L; l++) {
            T g = FG_G(k + l), h = FG_G(k + L + l);
            a1[l] += (double)(g + h);
            a2[l] += (double)(g * FG_LN_XHAT(x, k + l, 0) + h * FG_LN_XHAT(x, k + L + l, 0));
        }
    for (; k + L <= F; k += L)
        for (int l = 0; l < L; l++) {
            T g = FG_G(k + l);
            a1[l] += (double)g;
            a2[l] += (double)(g * FG_LN_XHAT(x, k + l, 0));
        }
    for (int l = 0; k < F; k++, l++) {
        T g = FG_G(k);
        a1[l] += (double)g;
        a2[l] += (double)(g * FG_LN_XHAT(x, k, 0));
    }
    /* in T, at full vector width; with the sums above, dx stays within a
     * few ulps of its largest element (tests/test_layernorm.py) */
    const T m1 = (T)(S(lanes_total)(a1, L) / (double)F);
    const T m2 = (T)(S(lanes_total)(a2, L) / (double)F);
    for (ptrdiff_t j = 0; j < F; j++)
        dx[j] = rt[0] * ((FG_G(j) - m1) - FG_LN_XHAT(x, j, 0) * m2);
#undef FG_G
}

/* dinp of rows [lo, hi), without the column sums. */
FG_TARGETS static void S(ln_rows_part)(void *p, ptrdiff_t lo, ptrdiff_t hi)
{
    for (ptrdiff_t i = lo; i < hi; i++) S(ln_backward_row)(p, i);
}

/* Part q of FG_LN_PARTS (a fixed share of the rows): its column sums into
 * its own slice of work, four rows at a time, each group before its rows'
 * dinp is written (dinp may alias dout). */
FG_TARGETS static void S(ln_parts_part)(void *p, ptrdiff_t lo, ptrdiff_t hi)
{
    const S(ln_args) *a = p;
    const ptrdiff_t F = a->F, B = a->B;
    for (ptrdiff_t q = lo; q < hi; q++) {
        double *wg = a->work + 2 * F * q, *wb = wg + F;
        for (ptrdiff_t j = 0; j < 2 * F; j++) wg[j] = 0.0;
        const ptrdiff_t r1 = B * (q + 1) / FG_LN_PARTS;
        for (ptrdiff_t i0 = B * q / FG_LN_PARTS; i0 < r1; i0 += 4) {
            const ptrdiff_t n = r1 - i0 < 4 ? r1 - i0 : 4;
            S(ln_columns)(wg, wb, a->dout + i0 * F, a->inp + i0 * F, a->cmean + i0,
                          a->crstd + i0, n, F);
            for (ptrdiff_t i = i0; i < i0 + n; i++) S(ln_backward_row)(a, i);
        }
    }
}
#undef FG_LN_XHAT

/* LayerNormalization backward, with xhat = (x - mean) rstd recomputed and
 * g = dout * gamma:
 *   dinp   = rstd (g - mean_j g - xhat mean_j (g xhat))     (per row)
 *   dgamma = sum_i dout xhat,   dbeta = sum_i dout           (per column)
 * Row sums run over FG_LN_LANES lanes in double (pairs of terms added in T
 * first). The column sums are taken over FG_LN_PARTS fixed shares of the
 * rows, each in its slice of work (2F FG_LN_PARTS doubles, required when
 * dgamma or dbeta is given), and the shares are added in order: the same
 * result for any number of threads. The shares, or without column sums the rows, are
 * split over threads as in the forward. dgamma, dbeta may be NULL; dinp
 * may alias dout. */
void S(fg_layernorm_backward)(T *dinp, T *dgamma, T *dbeta, double *work, const T *dout,
                              const T *inp, const double *mean, const double *rstd,
                              const T *gamma, ptrdiff_t B, ptrdiff_t F)
{
    S(ln_args) a = {.dinp = dinp, .dgamma = dgamma, .dbeta = dbeta, .work = work,
                    .inp = inp, .dout = dout, .gamma = gamma, .cmean = mean,
                    .crstd = rstd, .B = B, .F = F};
    if (!dgamma && !dbeta) {
        fg_parallel(S(ln_rows_part), &a, B, S(share)(B, F, 1));
        return;
    }
    fg_parallel(S(ln_parts_part), &a, FG_LN_PARTS,
                B * F < FG_PARALLEL_MIN ? FG_LN_PARTS : 1);
    for (ptrdiff_t j = 0; j < 2 * F; j++) {
        double t = work[j];
        for (ptrdiff_t q = 1; q < FG_LN_PARTS; q++) t += work[2 * F * q + j];
        work[j] = t;
    }
    if (dgamma) for (ptrdiff_t j = 0; j < F; j++) dgamma[j] = (T)work[j];
    if (dbeta) for (ptrdiff_t j = 0; j < F; j++) dbeta[j] = (T)work[F + j];
}

/* Keras 3's relu with its options, element-wise over N:
 *   out = x > threshold ? min(x, max_value) : negative_slope (x - threshold)
 * (max_value = inf: no cap). NaN passes. out may alias inp. */
FG_TARGETS void S(fg_relu_forward)(T *out, const T *inp, ptrdiff_t N,
                        double negative_slope, double threshold, double max_value)
{
    const T s = (T)negative_slope, th = (T)threshold, hi = (T)max_value;
    for (ptrdiff_t k = 0; k < N; k++) {
        T x = inp[k], c = x < hi ? x : hi;
        out[k] = x > th ? c : s * (x - th);
    }
}

/* Its backward: dinp = dout * (x > threshold ? [x < max_value] : negative_slope).
 * dinp may alias dout. */
FG_TARGETS void S(fg_relu_backward)(T *dinp, const T *dout, const T *inp, ptrdiff_t N,
                         double negative_slope, double threshold, double max_value)
{
    const T s = (T)negative_slope, th = (T)threshold, hi = (T)max_value;
    for (ptrdiff_t k = 0; k < N; k++) {
        T x = inp[k], g = dout[k], up = x < hi ? g : (T)0;
        dinp[k] = x > th ? up : s * g;
    }
}

/* PReLU: out = x > 0 ? x : alpha_j x, inp (B,F), alpha (F). out may alias inp. */
FG_TARGETS void S(fg_prelu_forward)(T *out, const T *inp, const T *alpha, ptrdiff_t B,
                         ptrdiff_t F)
{
    for (ptrdiff_t i = 0; i < B; i++) {
        const T *x = inp + i * F;
        T *y = out + i * F;
        for (ptrdiff_t j = 0; j < F; j++) {
            T xj = x[j];
            y[j] = xj > 0 ? xj : alpha[j] * xj;
        }
    }
}

/* PReLU backward: dinp = dout (x > 0 ? 1 : alpha_j); dalpha_j = sum_i dout
 * min(x, 0), in double over column blocks on the stack. dalpha may be
 * NULL; dinp may alias dout. */
FG_TARGETS void S(fg_prelu_backward)(T *dinp, T *dalpha, const T *dout, const T *inp,
                          const T *alpha, ptrdiff_t B, ptrdiff_t F)
{
    double acc[FG_COLS];
    for (ptrdiff_t c0 = 0; c0 < F; c0 += FG_COLS) {
        ptrdiff_t w = F - c0 < FG_COLS ? F - c0 : FG_COLS;
        for (ptrdiff_t j = 0; j < w; j++) acc[j] = 0.0;
        for (ptrdiff_t i = 0; i < B; i++) {
            const T *x = inp + i * F + c0, *g = dout + i * F + c0, *a = alpha + c0;
            T *d = dinp + i * F + c0;
            for (ptrdiff_t j = 0; j < w; j++) {
                T xj = x[j], gj = g[j];
                acc[j] += (double)gj * (double)(xj > 0 ? (T)0 : xj);
                d[j] = xj > 0 ? gj : a[j] * gj;
            }
        }
        if (dalpha) for (ptrdiff_t j = 0; j < w; j++) dalpha[c0 + j] = (T)acc[j];
    }
}
