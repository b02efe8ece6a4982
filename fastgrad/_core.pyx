# Compiled entry points: shape checks with the GIL held, then C and BLAS
# without it. Dtype, layout and friendly messages are checked in ops.py;
# here every size is checked against every other so that no call, however
# wrong, reads or writes outside its buffers.
from cython cimport floating
from libc.float cimport DBL_MAX
from libc.limits cimport INT_MAX
from libc.stdint cimport int64_t, uint64_t
from libc.math cimport ceil, fabs, log, sqrt
from libc.stddef cimport ptrdiff_t
from libc.string cimport memset
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv

from fastgrad._kernels cimport *

import numpy as _np

# The Python tables of the codes fastgrad.h declares, built from its enums.
ACTIVATION_CODES = {
    "linear": FG_LINEAR, "relu": FG_RELU, "leaky_relu": FG_LEAKY_RELU, "elu": FG_ELU,
    "selu": FG_SELU, "gelu": FG_GELU, "silu": FG_SILU, "sigmoid": FG_SIGMOID,
    "tanh": FG_TANH, "softmax": FG_SOFTMAX, "softplus": FG_SOFTPLUS, "softsign": FG_SOFTSIGN,
    "relu6": FG_RELU6, "hard_sigmoid": FG_HARD_SIGMOID, "hard_silu": FG_HARD_SILU,
    "mish": FG_MISH, "exponential": FG_EXPONENTIAL, "log_softmax": FG_LOG_SOFTMAX,
}
# float64 elements of layernorm_backward's work buffer per feature
LAYERNORM_WORK = 2 * FG_LN_PARTS
# names Keras gives to the same functions
ACTIVATION_ALIASES = {"swish": "silu", "hard_swish": "hard_silu"}
ACTIVATIONS_NEEDING_PRE = frozenset(
    name for name, code in ACTIVATION_CODES.items() if fg_activation_needs_pre(code))
ACTIVATIONS_NEEDING_PRE |= {a for a, name in ACTIVATION_ALIASES.items()
                            if name in ACTIVATIONS_NEEDING_PRE}
LOSS_CODES = {
    "mse": FG_MSE, "mae": FG_MAE, "huber": FG_HUBER,
    "binary_crossentropy": FG_BINARY_CROSSENTROPY,
    "categorical_crossentropy": FG_CATEGORICAL_CROSSENTROPY,
    "sparse_categorical_crossentropy": FG_SPARSE_CATEGORICAL_CROSSENTROPY,
    "log_cosh": FG_LOG_COSH, "kl_divergence": FG_KL_DIVERGENCE, "poisson": FG_POISSON,
    "hinge": FG_HINGE, "squared_hinge": FG_SQUARED_HINGE,
    "categorical_hinge": FG_CATEGORICAL_HINGE, "mape": FG_MAPE, "msle": FG_MSLE,
    "binary_focal_crossentropy": FG_BINARY_FOCAL_CROSSENTROPY,
    "categorical_focal_crossentropy": FG_CATEGORICAL_FOCAL_CROSSENTROPY,
    "cosine_similarity": FG_COSINE_SIMILARITY,
}
OPTIMIZER_CODES = {"sgd": FG_SGD, "rmsprop": FG_RMSPROP, "adam": FG_ADAM,
                   "adagrad": FG_ADAGRAD, "nadam": FG_NADAM, "adamax": FG_ADAMAX,
                   "adadelta": FG_ADADELTA, "lion": FG_LION}
# keyed by the constraint's class name; None: no constraint
CONSTRAINT_CODES = {None: FG_NO_CONSTRAINT, "MaxNorm": FG_MAX_NORM, "NonNeg": FG_NON_NEG,
                    "ClipValue": FG_CLIP_VALUE}

_STATUS_MESSAGES = {
    FG_EACTIVATION: "act: unknown activation code",
    FG_ELOSS: "kind: unknown loss code",
    FG_ELABEL: "y: a label is outside [0, number of classes)",
    FG_EOPTIMIZER: "config: unknown optimizer code",
    FG_ENEEDS_PRE: "pre: this activation's derivative needs the pre-activation",
}


cdef int _raise(int status) except -1:
    raise ValueError(_STATUS_MESSAGES.get(status, f"kernel failed with status {status}"))


cdef inline int _check(bint ok, str what) except -1:
    if not ok:
        raise ValueError(what)
    return 0


cdef int _blas_size(Py_ssize_t n, str name) except -1:
    if n > INT_MAX:
        raise ValueError(f"{name} has {n} elements along one side; BLAS takes at most {INT_MAX}")
    return 0


# One-row products read the whole matrix for little arithmetic: their speed
# is the cache's bandwidth, which each core adds to. From _GEMV_SPLIT_MIN
# elements the matrix goes in _GEMV_PARTS fixed shares of its columns (as the
# column-major BLAS sees it: rows of the row-major kernel) over the kernel
# threads, the same shares for any thread count (so the same bits): with
# op(A) = A, shares of the sum's terms, added in order afterwards; with
# op(A) = A^T, shares of the outputs.
cdef enum:
    _GEMV_PARTS = 4
    _GEMV_SPLIT_MIN = 131072
    _GEMV_SCRATCH = 1024    # outputs from which op(A) = A is not split


cdef struct _gemv_job:
    char trans
    bint dbl
    int rows, cols, ld, incx, share
    float fa, fb
    double da, db
    void *mat
    void *vec
    void *out
    void *scratch   # (_GEMV_PARTS - 1) rows of partial sums (op(A) = A)


cdef void _gemv_parts(void *ctx, ptrdiff_t lo, ptrdiff_t hi) noexcept nogil:
    """Shares lo..hi-1 of the column-major y = alpha op(A) x + beta y that
    _gemv_job describes, share p being columns [p share, (p+1) share) of A."""
    cdef _gemv_job *j = <_gemv_job *>ctx
    cdef int c0, c1, r, c, one = 1
    cdef Py_ssize_t y_off
    cdef ptrdiff_t p
    cdef void *y
    cdef float fb
    cdef double db
    for p in range(lo, hi):
        c0 = <int>(p * j.share)
        c1 = min(c0 + j.share, j.cols)
        if c0 >= c1:
            continue
        r, c = j.rows, c1 - c0
        if j.trans == b'N':   # partial sums over the columns: share 0 into y
            y, y_off, fb, db = j.out, 0, j.fb, j.db
            if p > 0:
                y, y_off, fb, db = j.scratch, (p - 1) * <Py_ssize_t>r, 0.0, 0.0
        else:                 # outputs c0..c1-1
            y, y_off, fb, db = j.out, c0, j.fb, j.db
        if j.dbl:
            dgemv(&j.trans, &r, &c, &j.da, <double *>j.mat + <Py_ssize_t>c0 * j.ld, &j.ld,
                  <double *>j.vec + (<Py_ssize_t>c0 * j.incx if j.trans == b'N' else 0),
                  &j.incx, &db, <double *>y + y_off, &one)
        else:
            sgemv(&j.trans, &r, &c, &j.fa, <float *>j.mat + <Py_ssize_t>c0 * j.ld, &j.ld,
                  <float *>j.vec + (<Py_ssize_t>c0 * j.incx if j.trans == b'N' else 0),
                  &j.incx, &fb, <float *>y + y_off, &one)


cdef void _gemv(char trans, int rows, int cols, double alpha, floating *mat, int ld,
                floating *vec, int incx, double beta, floating *out) noexcept nogil:
    """Column-major out = alpha op(mat) vec + beta out, op(mat) = mat for
    trans 'N' (rows x cols) or its transpose for 'T', split as above."""
    cdef _gemv_job job
    cdef double scratch[(_GEMV_PARTS - 1) * _GEMV_SCRATCH]
    cdef floating *part
    cdef int i, p, n = rows if trans == b'N' else cols
    job.trans, job.dbl, job.rows, job.cols, job.ld, job.incx = (
        trans, floating is double, rows, cols, ld, incx)
    job.fa, job.fb, job.da, job.db = <float>alpha, <float>beta, alpha, beta
    job.mat, job.vec, job.out, job.scratch = mat, vec, out, scratch
    if <Py_ssize_t>rows * cols < _GEMV_SPLIT_MIN or (trans == b'N' and n > _GEMV_SCRATCH):
        job.share = cols
        _gemv_parts(&job, 0, 1)
        return
    # shares of whole 64-byte lines of columns
    job.share = (cols + _GEMV_PARTS * 16 - 1) // (_GEMV_PARTS * 16) * 16
    # the shares run in parallel already: one BLAS thread each
    cdef int turn = fg_blas_begin(1)
    fg_parallel_for(_gemv_parts, &job, _GEMV_PARTS, 1)
    if turn:
        fg_blas_end(1)
    if trans == b'N':
        part = <floating *>scratch
        for p in range(1, _GEMV_PARTS):
            if p * job.share < cols:
                for i in range(n):
                    out[i] += part[(p - 1) * n + i]


# Products of fewer multiply-adds run on one BLAS thread (fastgrad.h): a
# second thread gains nothing there, and on a busy two-core machine the
# BLAS's threads made an epoch of fit on the digits network 2.2 times slower
# (15.3 against 6.9 ms; README, "Threads").
cdef enum:
    _ONE_BLAS_THREAD_BELOW = 1 << 21


import os as _os
import scipy.linalg.cython_blas as _cython_blas
# whether small products can be held to one BLAS thread here
BLAS_ONE_THREAD = bool(fg_blas_bind(_os.fsencode(_cython_blas.__file__)))


# Products of few rows, from _GEMM_SPLIT_MIN multiply-adds, go in shares of
# their longer output side over the kernel threads, one BLAS thread per
# share. Measured on one thread with SciPy's OpenBLAS (AVX-512 kernels):
# 32x784x256 in shares of 32 columns took 118 us against 181 us whole, and
# 32x256x256 in shares of 112, 38 against 59 us: its kernels for products
# of up to 10^6 multiply-adds skip the packing. So a share stays within
# _GEMM_SHARE_WORK; where that would leave it narrower than _GEMM_SHARE_MIN
# (many rows), the product stays whole, on the BLAS's threads from
# _ONE_BLAS_THREAD_BELOW (those split large products better: 256x784x256
# in shares of 128 took 1046 us against 1023 us whole on one thread). A
# product that fits in one share goes in two halves, for the threads. The
# shares depend on the shape alone, so the bits do not depend on the thread
# count.
cdef enum:
    _GEMM_SPLIT_MIN = 1 << 19
    _GEMM_SHARE_WORK = 1000000
    _GEMM_SHARE_MIN = 32


cdef struct _gemm_job:
    bint dbl, by_cols
    char ta, tb        # the BLAS's flags (operands swapped, see _gemm)
    int M, N, K, lda, ldb, ldc, share
    float fa, fb
    double da, db
    void *a
    void *b
    void *c


cdef void _gemm_parts(void *ctx, ptrdiff_t lo, ptrdiff_t hi) noexcept nogil:
    """Shares lo..hi-1 of the row-major product _gemm_job describes: share p
    is C's columns (by_cols) or rows [p share, (p+1) share)."""
    cdef _gemm_job *j = <_gemm_job *>ctx
    cdef int s0, s1, m, n
    cdef Py_ssize_t ao, bo, co
    cdef ptrdiff_t p
    for p in range(lo, hi):
        s0 = <int>(p * j.share)
        s1 = min(s0 + j.share, j.N if j.by_cols else j.M)
        if s0 >= s1:
            continue
        m, n, ao, bo, co = j.M, j.N, 0, 0, 0
        if j.by_cols:   # C[:, s0:s1] = op(A) op(B)[:, s0:s1]
            n = s1 - s0
            bo = s0 * <Py_ssize_t>j.ldb if j.ta == b'T' else s0
            co = s0
        else:           # C[s0:s1] = op(A)[s0:s1] op(B)
            m = s1 - s0
            ao = s0 if j.tb == b'T' else s0 * <Py_ssize_t>j.lda
            co = s0 * <Py_ssize_t>j.ldc
        if j.dbl:
            dgemm(&j.ta, &j.tb, &n, &m, &j.K, &j.da, <double *>j.b + bo, &j.ldb,
                  <double *>j.a + ao, &j.lda, &j.db, <double *>j.c + co, &j.ldc)
        else:
            sgemm(&j.ta, &j.tb, &n, &m, &j.K, &j.fa, <float *>j.b + bo, &j.ldb,
                  <float *>j.a + ao, &j.lda, &j.fb, <float *>j.c + co, &j.ldc)


cdef void _gemm(bint trans_a, bint trans_b, int M, int N, int K, double alpha,
                floating *a, int lda, floating *b, int ldb, double beta,
                floating *c, int ldc) noexcept nogil:
    """Row-major C (M,N) = alpha * op(A) (M,K) @ op(B) (K,N) + beta * C.

    The BLAS is column-major and a row-major matrix is its transpose there,
    so it computes C^T = op(B)^T op(A)^T: operands swapped, flags kept.
    lda, ldb, ldc are the row lengths of the stored matrices."""
    cdef char ta = b'T' if trans_b else b'N'
    cdef char tb = b'T' if trans_a else b'N'
    cdef floating al = <floating>alpha
    cdef floating be = <floating>beta
    cdef Py_ssize_t k
    if M == 0 or N == 0:
        return
    if K == 0:  # the BLAS would read nothing; C = beta * C
        for k in range(<Py_ssize_t>M * N):
            c[k] = 0 if beta == 0 else be * c[k]
        return
    if lda < 1: lda = 1
    if ldb < 1: ldb = 1
    if ldc < 1: ldc = 1
    cdef int one = 1, rows = N if not trans_b else K, cols = K if not trans_b else N
    cdef int step = lda if trans_a else 1
    if M == 1:
        # one row of A: a matrix-vector product, which the BLAS does in
        # less time than the same GEMM (784x256: 10.2 against 12.9 us)
        _gemv(ta, rows, cols, alpha, b, ldb, a, step, beta, c)
        return
    cdef long long work = <long long>M * N * K, share, parts
    cdef int small = work < _ONE_BLAS_THREAD_BELOW, n = max(M, N), turn
    cdef _gemm_job job
    if work >= _GEMM_SPLIT_MIN:
        # shares within _GEMM_SHARE_WORK: an even number, as even as whole
        # 64-byte lines allow
        share = _GEMM_SHARE_WORK // (work // n) // 16 * 16
        parts = (n + share - 1) // share if share >= _GEMM_SHARE_MIN else 0
        parts += parts & 1
        share = ((n + parts - 1) // parts + 15) // 16 * 16 if parts else n
        if share < n and fg_blas_begin(1):
            job.dbl, job.by_cols, job.ta, job.tb = floating is double, N >= M, ta, tb
            job.M, job.N, job.K, job.lda, job.ldb, job.ldc = M, N, K, lda, ldb, ldc
            job.fa, job.fb, job.da, job.db = <float>alpha, <float>beta, alpha, beta
            job.a, job.b, job.c, job.share = a, b, c, <int>share
            fg_parallel_for(_gemm_parts, &job, (n + share - 1) // share, 1)
            fg_blas_end(1)
            return
    turn = fg_blas_begin(small)
    if floating is float:
        sgemm(&ta, &tb, &N, &M, &K, &al, b, &ldb, a, &lda, &be, c, &ldc)
    else:
        dgemm(&ta, &tb, &N, &M, &K, &al, b, &ldb, a, &lda, &be, c, &ldc)
    if turn:
        fg_blas_end(small)


# One dispatch per kernel: each argument list is written once, and the
# float or double kernel is chosen when the fused type is specialized.
cdef inline int _bias_act(floating *out, floating *pre, const floating *inp,
                          const floating *bias, Py_ssize_t B, Py_ssize_t O, int act,
                          double alpha, fg_act_stats *st) noexcept nogil:
    if floating is float:
        return fg_bias_act_forward_f32(out, pre, inp, bias, B, O, act, alpha, st)
    else:
        return fg_bias_act_forward_f64(out, pre, inp, bias, B, O, act, alpha, st)


cdef inline int _act_back(floating *dpre, floating *dbias, const floating *dout,
                          const floating *out, const floating *pre, Py_ssize_t B,
                          Py_ssize_t O, int act, double alpha) noexcept nogil:
    if floating is float:
        return fg_act_backward_f32(dpre, dbias, dout, out, pre, B, O, act, alpha)
    else:
        return fg_act_backward_f64(dpre, dbias, dout, out, pre, B, O, act, alpha)


cdef inline int _loss(double *loss, floating *rows, floating *dpred, floating *prob,
                      const floating *pred, const floating *target, const int64_t *labels,
                      const floating *weights, Py_ssize_t B, Py_ssize_t O, int kind,
                      int from_logits, const fg_loss_params *lp) noexcept nogil:
    if floating is float:
        return fg_loss_forward_backward_f32(loss, rows, dpred, prob, pred, target, labels,
                                            weights, B, O, kind, from_logits, lp)
    else:
        return fg_loss_forward_backward_f64(loss, rows, dpred, prob, pred, target, labels,
                                            weights, B, O, kind, from_logits, lp)


cdef inline double _sum_sq(const floating *x, Py_ssize_t N) noexcept nogil:
    if floating is float:
        return fg_sum_squares_f32(x, N)
    else:
        return fg_sum_squares_f64(x, N)


cdef inline int _any_above(const floating *x, Py_ssize_t N, double limit) noexcept nogil:
    if floating is float:
        return fg_any_abs_above_f32(x, N, limit)
    else:
        return fg_any_abs_above_f64(x, N, limit)


cdef inline Py_ssize_t _bad_row(const floating *x, Py_ssize_t B, Py_ssize_t F) noexcept nogil:
    if floating is float:
        return fg_first_nonfinite_row_f32(x, B, F)
    else:
        return fg_first_nonfinite_row_f64(x, B, F)


cdef inline void _norms(double *sumsq, double *penalty, int64_t *bad, floating *grad,
                        const floating *param, const floating *acc, double acc_steps,
                        const fg_tensors *tt) noexcept nogil:
    if floating is float: fg_grad_norms_f32(sumsq, penalty, bad, grad, param, acc, acc_steps, tt)
    else: fg_grad_norms_f64(sumsq, penalty, bad, grad, param, acc, acc_steps, tt)


cdef inline int _step(int64_t *overflow, floating *param, floating *m, floating *v,
                      floating *vmax, floating *ema, floating *acc, const floating *grad,
                      const fg_tensors *tt, const fg_opt_config *c) noexcept nogil:
    if floating is float:
        return fg_optimizer_step_f32(overflow, param, m, v, vmax, ema, acc, grad, tt, c)
    else:
        return fg_optimizer_step_f64(overflow, param, m, v, vmax, ema, acc, grad, tt, c)


cdef inline void _bn_forward(floating *out, double *mean, double *rstd,
                             floating *moving_mean, floating *moving_var,
                             const floating *inp, const floating *gamma,
                             const floating *beta, Py_ssize_t B, Py_ssize_t F,
                             double epsilon, double momentum, int training) noexcept nogil:
    if floating is float:
        fg_batchnorm_forward_f32(out, mean, rstd, moving_mean, moving_var, inp, gamma, beta,
                                 B, F, epsilon, momentum, training)
    else:
        fg_batchnorm_forward_f64(out, mean, rstd, moving_mean, moving_var, inp, gamma, beta,
                                 B, F, epsilon, momentum, training)


cdef inline void _bn_backward(floating *dinp, floating *dgamma, floating *dbeta,
                              const floating *dout, const floating *inp,
                              const double *mean, const double *rstd,
                              const floating *gamma, Py_ssize_t B,
                              Py_ssize_t F) noexcept nogil:
    if floating is float:
        fg_batchnorm_backward_f32(dinp, dgamma, dbeta, dout, inp, mean, rstd, gamma, B, F)
    else:
        fg_batchnorm_backward_f64(dinp, dgamma, dbeta, dout, inp, mean, rstd, gamma, B, F)


cdef inline void _gauss(floating *out, const floating *inp, Py_ssize_t N, double stddev,
                        int multiply, uint64_t seed, uint64_t offset) noexcept nogil:
    if floating is float: fg_gaussian_noise_f32(out, inp, N, stddev, multiply, seed, offset)
    else: fg_gaussian_noise_f64(out, inp, N, stddev, multiply, seed, offset)


cdef inline void _alpha_drop(floating *out, const floating *inp, Py_ssize_t N, double rate,
                             double a, double bk, double bd, uint64_t seed,
                             uint64_t offset) noexcept nogil:
    if floating is float: fg_alpha_dropout_f32(out, inp, N, rate, a, bk, bd, seed, offset)
    else: fg_alpha_dropout_f64(out, inp, N, rate, a, bk, bd, seed, offset)


cdef inline void _affine(floating *out, const floating *inp, const floating *shift,
                         const floating *scale, Py_ssize_t B, Py_ssize_t F,
                         int divide) noexcept nogil:
    if floating is float: fg_affine_f32(out, inp, shift, scale, B, F, divide)
    else: fg_affine_f64(out, inp, shift, scale, B, F, divide)


cdef inline void _ln_forward(floating *out, double *mean, double *rstd, const floating *inp,
                             const floating *gamma, const floating *beta, Py_ssize_t B,
                             Py_ssize_t F, double epsilon) noexcept nogil:
    if floating is float: fg_layernorm_forward_f32(out, mean, rstd, inp, gamma, beta, B, F, epsilon)
    else: fg_layernorm_forward_f64(out, mean, rstd, inp, gamma, beta, B, F, epsilon)


cdef inline void _ln_backward(floating *dinp, floating *dgamma, floating *dbeta, double *work,
                              const floating *dout, const floating *inp, const double *mean,
                              const double *rstd, const floating *gamma, Py_ssize_t B,
                              Py_ssize_t F) noexcept nogil:
    if floating is float:
        fg_layernorm_backward_f32(dinp, dgamma, dbeta, work, dout, inp, mean, rstd, gamma, B, F)
    else:
        fg_layernorm_backward_f64(dinp, dgamma, dbeta, work, dout, inp, mean, rstd, gamma, B, F)


cdef inline void _relu_fwd(floating *out, const floating *inp, Py_ssize_t N, double slope,
                           double threshold, double max_value) noexcept nogil:
    if floating is float: fg_relu_forward_f32(out, inp, N, slope, threshold, max_value)
    else: fg_relu_forward_f64(out, inp, N, slope, threshold, max_value)


cdef inline void _relu_back(floating *dinp, const floating *dout, const floating *inp,
                            Py_ssize_t N, double slope, double threshold,
                            double max_value) noexcept nogil:
    if floating is float: fg_relu_backward_f32(dinp, dout, inp, N, slope, threshold, max_value)
    else: fg_relu_backward_f64(dinp, dout, inp, N, slope, threshold, max_value)


cdef inline void _prelu_fwd(floating *out, const floating *inp, const floating *alpha,
                            Py_ssize_t B, Py_ssize_t F) noexcept nogil:
    if floating is float: fg_prelu_forward_f32(out, inp, alpha, B, F)
    else: fg_prelu_forward_f64(out, inp, alpha, B, F)


cdef inline void _prelu_back(floating *dinp, floating *dalpha, const floating *dout,
                             const floating *inp, const floating *alpha, Py_ssize_t B,
                             Py_ssize_t F) noexcept nogil:
    if floating is float: fg_prelu_backward_f32(dinp, dalpha, dout, inp, alpha, B, F)
    else: fg_prelu_backward_f64(dinp, dalpha, dout, inp, alpha, B, F)


cdef inline void _dropout(floating *out, const floating *inp, Py_ssize_t N, double rate,
                          uint64_t seed, uint64_t offset) noexcept nogil:
    if floating is float: fg_dropout_forward_f32(out, inp, N, rate, seed, offset)
    else: fg_dropout_forward_f64(out, inp, N, rate, seed, offset)


def matmul(const floating[:, ::1] a not None, const floating[:, ::1] b not None, floating[:, ::1] out not None,
           bint trans_a=False, bint trans_b=False):
    """out = op(a) @ op(b), op transposing when asked; through BLAS gemm."""
    cdef Py_ssize_t M = a.shape[1] if trans_a else a.shape[0]
    cdef Py_ssize_t K = a.shape[0] if trans_a else a.shape[1]
    cdef Py_ssize_t Kb = b.shape[1] if trans_b else b.shape[0]
    cdef Py_ssize_t N = b.shape[0] if trans_b else b.shape[1]
    if K != Kb:
        raise ValueError(f"matmul: inner sizes differ ({K} and {Kb})")
    _same2(out, M, N, "out")
    for n, s in ((M, "a"), (N, "b"), (K, "a")):
        _blas_size(n, s)
    with nogil:
        _gemm(trans_a, trans_b, <int>M, <int>N, <int>K, 1.0,
              <floating *>&a[0, 0] if a.shape[0] * a.shape[1] else NULL, <int>a.shape[1],
              <floating *>&b[0, 0] if b.shape[0] * b.shape[1] else NULL, <int>b.shape[1],
              0.0, &out[0, 0] if M * N else NULL, <int>N)
    return out


cdef inline floating *_ptr1(floating[::1] v) noexcept nogil:
    return &v[0] if v is not None and v.shape[0] > 0 else NULL


cdef inline floating *_ptr2(floating[:, ::1] v) noexcept nogil:
    return &v[0, 0] if v is not None and v.shape[0] * v.shape[1] > 0 else NULL


cdef inline const floating *_cptr1(const floating[::1] v) noexcept nogil:
    return &v[0] if v is not None and v.shape[0] > 0 else NULL


cdef inline const floating *_cptr2(const floating[:, ::1] v) noexcept nogil:
    return &v[0, 0] if v is not None and v.shape[0] * v.shape[1] > 0 else NULL


cdef int _check_act(int act) except -1:
    if not (0 <= act < FG_N_ACTIVATIONS):
        raise ValueError(f"unknown activation code {act}")
    return 0


# Checks take typed views and raise with a formatted message only on failure:
# a Python object per argument, or an f-string built for every call, would
# cost more than the kernels at small sizes.
cdef int _same2(const floating[:, ::1] v, Py_ssize_t r, Py_ssize_t c, str name) except -1:
    if v is not None and (v.shape[0] != r or v.shape[1] != c):
        raise ValueError(f"{name}: expected shape ({r}, {c}), got ({v.shape[0]}, {v.shape[1]})")
    return 0


cdef int _len1(const floating[::1] v, Py_ssize_t n, bint required, str name) except -1:
    if (v is None and required) or (v is not None and v.shape[0] != n):
        raise ValueError(f"{name}: expected shape ({n},)")
    return 0


cdef int _len2(const floating[::1] a, const floating[::1] b, Py_ssize_t n, bint required,
               str name_a, str name_b) except -1:
    """_len1 for a pair of vectors that go together (scale and shift, the
    statistics of a normalization, their gradients)."""
    _len1(a, n, required, name_a)
    _len1(b, n, required, name_b)
    return 0


cdef fg_act_stats *_stats(fg_act_stats *st, unsigned char[::1] alive, bint want,
                         Py_ssize_t O) except? NULL:
    if not want:
        return NULL
    if not (alive is None or alive.shape[0] == O):
        raise ValueError(f"alive: expected shape ({O},)")
    st.alive = &alive[0] if alive is not None and O > 0 else NULL
    st.saturated = 0
    return st


def bias_act_forward(const floating[:, ::1] inp not None, const floating[::1] bias,
                     floating[:, ::1] out not None, floating[:, ::1] pre, int act, double alpha,
                     unsigned char[::1] alive=None, bint stats=False):
    """out = act(inp + bias); pre (optional) receives inp + bias. With stats,
    alive[j] |= (unit j positive in some row) for relu, and the count of
    saturated sigmoid/tanh outputs is returned."""
    cdef Py_ssize_t B = inp.shape[0], O = inp.shape[1]
    cdef int s
    cdef fg_act_stats st
    cdef fg_act_stats *stp = _stats(&st, alive, stats, O)
    _check_act(act)
    _same2(out, B, O, "out")
    _same2(pre, B, O, "pre")
    _len1(bias, O, False, "bias")
    with nogil:
        s = _bias_act(_ptr2(out), _ptr2(pre), _cptr2(inp), _cptr1(bias), B, O, act, alpha, stp)
    if s != FG_OK:
        _raise(s)
    return st.saturated if stats else None


def act_backward(const floating[:, ::1] dout not None, const floating[:, ::1] out not None,
                 const floating[:, ::1] pre, floating[:, ::1] dpre not None,
                 floating[::1] dbias, int act, double alpha):
    """dpre = dout * act'(z); dbias (optional) = column sums of dpre."""
    cdef Py_ssize_t B = dout.shape[0], O = dout.shape[1]
    cdef int s
    _check_act(act)
    _same2(out, B, O, "out")
    _same2(pre, B, O, "pre")
    _same2(dpre, B, O, "dpre")
    _len1(dbias, O, False, "dbias")
    _check(pre is not None or not fg_activation_needs_pre(act),
           "pre: this activation's derivative needs the pre-activation")
    with nogil:
        s = _act_back(_ptr2(dpre), _ptr1(dbias), _cptr2(dout), _cptr2(out), _cptr2(pre), B, O, act, alpha)
    if s != FG_OK:
        _raise(s)
    return dpre


cdef struct _dense_link:
    int n_in, n_out, act
    double alpha
    const void *kernel
    const void *bias    # NULL without a bias
    void *out           # (rows, O)
    void *pre           # (rows, O), NULL unless the derivative needs z
    void *dkernel
    void *dbias
    void *dx            # (rows, I), NULL when the input needs no gradient


cdef int _chain_forward(_dense_link *links, int n, const floating *x, int B, int last_act,
                        fg_act_stats *stats) noexcept nogil:
    """dense_forward through links[0..n), last_act for the last layer."""
    cdef int i, s, act
    cdef _dense_link *L
    cdef floating *inp = <floating *>x
    for i in range(n):
        L = &links[i]
        act = last_act if i == n - 1 else L.act
        _gemm(False, False, B, L.n_out, L.n_in, 1.0, inp, L.n_in, <floating *>L.kernel, L.n_out, 0.0,
              <floating *>L.out, L.n_out)
        s = _bias_act(<floating *>L.out, <floating *>L.pre, <floating *>L.out,
                      <const floating *>L.bias, B, L.n_out, act, L.alpha, stats)
        if s != FG_OK:
            return s
        inp = <floating *>L.out
    return FG_OK


cdef int _chain_backward(_dense_link *links, int n, const floating *x, int B, int last_act,
                         const floating *dout, floating *dpre) noexcept nogil:
    """dense_backward from links[n-1] to links[0]: dout the gradient at the
    last layer's outputs, dpre its pre-activation's (may be dout); each
    earlier layer's pre-activation gradient overwrites the dx above it."""
    cdef int i, s, act
    cdef _dense_link *L
    cdef const floating *g = dout
    cdef floating *d = dpre
    cdef floating *inp
    for i in range(n - 1, -1, -1):
        L = &links[i]
        act = last_act if i == n - 1 else L.act
        s = _act_back(d, <floating *>L.dbias, g, <const floating *>L.out,
                      <const floating *>L.pre, B, L.n_out, act, L.alpha)
        if s != FG_OK:
            return s
        inp = <floating *>x if i == 0 else <floating *>links[i - 1].out
        _gemm(True, False, L.n_in, L.n_out, B, 1.0, inp, L.n_in, d, L.n_out, 0.0, <floating *>L.dkernel, L.n_out)
        if L.dx != NULL:
            _gemm(False, True, B, L.n_in, L.n_out, 1.0, d, L.n_out, <floating *>L.kernel, L.n_out, 0.0,
                  <floating *>L.dx, L.n_in)
            d = <floating *>L.dx
            g = d
    return FG_OK


cdef int _dense_sizes(Py_ssize_t B, Py_ssize_t I, Py_ssize_t O, Py_ssize_t kernel_rows,
                      int act) except -1:
    """What dense_forward and dense_backward check alike: the activation
    code, the kernel's rows, and sizes BLAS can take."""
    _check_act(act)
    if kernel_rows != I:
        raise ValueError(f"kernel: expected {I} rows, got {kernel_rows}")
    _blas_size(B, "x"); _blas_size(I, "x"); _blas_size(O, "kernel")
    return 0


def dense_forward(const floating[:, ::1] x not None, const floating[:, ::1] kernel not None,
                  const floating[::1] bias, floating[:, ::1] out not None,
                  floating[:, ::1] pre, int act, double alpha,
                  unsigned char[::1] alive=None, bint stats=False):
    """out = act(x @ kernel + bias): one GEMM, then one fused pass over out.
    x is (B,I), kernel (I,O), bias (O) or None, out (B,O), pre (B,O) or None.
    stats as in bias_act_forward."""
    cdef Py_ssize_t B = x.shape[0], I = x.shape[1], O = kernel.shape[1]
    cdef int s
    cdef fg_act_stats st
    cdef fg_act_stats *stp = _stats(&st, alive, stats, O)
    cdef _dense_link L
    _dense_sizes(B, I, O, kernel.shape[0], act)
    _same2(out, B, O, "out")
    _same2(pre, B, O, "pre")
    _len1(bias, O, False, "bias")
    L.n_in, L.n_out, L.act, L.alpha = <int>I, <int>O, act, alpha
    L.kernel, L.bias, L.out, L.pre = _cptr2(kernel), _cptr1(bias), _ptr2(out), _ptr2(pre)
    with nogil:
        s = _chain_forward(&L, 1, _cptr2(x), <int>B, act, stp)
    if s != FG_OK:
        _raise(s)
    return st.saturated if stats else None


def dense_backward(const floating[:, ::1] dout not None, const floating[:, ::1] x not None,
                   const floating[:, ::1] kernel not None, const floating[:, ::1] out not None,
                   const floating[:, ::1] pre, floating[:, ::1] dpre not None,
                   floating[:, ::1] dkernel not None, floating[::1] dbias,
                   floating[:, ::1] dx, int act, double alpha):
    """Backward of dense_forward, overwriting the gradients:
    dpre = dout * act'(z)     (B,O) scratch, may be dout itself
    dbias = sum_rows dpre     (O) or None
    dkernel = x^T @ dpre      (I,O)
    dx = dpre @ kernel^T      (B,I) or None when the input needs no gradient."""
    cdef Py_ssize_t B = x.shape[0], I = x.shape[1], O = kernel.shape[1]
    cdef int s
    cdef _dense_link L
    _dense_sizes(B, I, O, kernel.shape[0], act)
    _same2(dout, B, O, "dout")
    _same2(out, B, O, "out")
    _same2(pre, B, O, "pre")
    _same2(dpre, B, O, "dpre")
    _same2(dkernel, I, O, "dkernel")
    _same2(dx, B, I, "dx")
    _check(dpre is not None and dkernel is not None, "dpre and dkernel are required")
    _len1(dbias, O, False, "dbias")
    _check(pre is not None or not fg_activation_needs_pre(act),
           "pre: this activation's derivative needs the pre-activation")
    L.n_in, L.n_out, L.act, L.alpha = <int>I, <int>O, act, alpha
    L.kernel, L.out, L.pre = _cptr2(kernel), <void *>_cptr2(out), <void *>_cptr2(pre)
    L.dkernel, L.dbias, L.dx = _ptr2(dkernel), _ptr1(dbias), _ptr2(dx)
    with nogil:
        s = _chain_backward(&L, 1, _cptr2(x), <int>B, act, _cptr2(dout), _ptr2(dpre))
    if s != FG_OK:
        _raise(s)


def loss_forward_backward(const floating[:, ::1] pred not None, const floating[:, ::1] target,
                          const int64_t[::1] labels, floating[::1] rows, floating[:, ::1] dpred,
                          floating[:, ::1] prob, int kind, bint from_logits,
                          double param, double alpha=0.25, double gamma=2.0,
                          bint class_balancing=False, const floating[::1] weights=None):
    """Mean loss over the batch, sum_i w_i l_i / rows (w_i = weights[i], 1
    without weights); the unweighted per-row losses l_i into rows and the
    gradient into dpred when given. param is Huber's delta; alpha, gamma
    and class_balancing are the focal losses' settings."""
    cdef Py_ssize_t B = pred.shape[0], O = pred.shape[1]
    cdef double loss = 0.0
    cdef int s
    cdef const int64_t *lab = NULL
    cdef fg_loss_params lp
    lp.delta, lp.alpha, lp.gamma, lp.class_balancing = param, alpha, gamma, class_balancing
    if not (0 <= kind < FG_N_LOSSES):
        raise ValueError(f"unknown loss code {kind}")
    _same2(dpred, B, O, "dpred")
    _same2(prob, B, O, "prob")
    _len1(rows, B, False, "rows")
    _len1(weights, B, False, "weights")
    if kind == FG_SPARSE_CATEGORICAL_CROSSENTROPY:  # labels replace the target
        if not (labels is not None and labels.shape[0] == B):
            raise ValueError(f"y: expected {B} integer labels")
        if B > 0:
            lab = &labels[0]
    else:
        _check(target is not None, "y: a target array is required")
        _same2(target, B, O, "y")
    with nogil:
        s = _loss(&loss, _ptr1(rows), _ptr2(dpred), _ptr2(prob), _cptr2(pred), _cptr2(target),
                  lab, _cptr1(weights), B, O, kind, from_logits, &lp)
    if s != FG_OK:
        _raise(s)
    return loss


def sum_squares(const floating[::1] x not None):
    """sum(x**2) accumulated in double."""
    cdef double r
    with nogil:
        r = _sum_sq(_cptr1(x), x.shape[0])
    return r


def any_abs_above(const floating[::1] x not None, double limit):
    """Whether some |x[k]| > limit (NaN never is)."""
    cdef int r
    with nogil:
        r = _any_above(_cptr1(x), x.shape[0], limit)
    return r != 0


cdef class DenseChain:
    """A stack of Dense layers run by one compiled call each way (the model's
    fast path when every layer is Dense): forward is dense_forward layer
    after layer, backward dense_backward from the last layer to the first,
    with the same kernels in the same order, so the same bits.

    layers: one tuple per layer, (kernel (I,O), bias (O) or None, out
    (rows,O), pre (rows,O) or None, dkernel (I,O), dbias (O) or None, dx
    (rows,I) or None, act, alpha), all C-contiguous float32 or all float64,
    each layer's I the previous layer's O; dx None only for the first
    layer, pre None only when the activation does not need it, dbias given
    exactly with bias. rows is the most rows a call may take. Every array is
    checked here, once, and held: the calls use their addresses."""
    cdef _dense_link *links
    cdef int n, rows, last_act, ready
    cdef bint dbl
    cdef object keep, outs, mem
    cdef const float[:, ::1] xf
    cdef const double[:, ::1] xd

    def __init__(self, list layers, Py_ssize_t rows):
        _check(self.n == 0, "DenseChain: already built")
        cdef Py_ssize_t i, I, O, n = len(layers)
        _check(n > 0, "layers: expected at least one layer")
        _check(n <= INT_MAX, "layers: too many")
        _check(0 < rows <= INT_MAX, "rows: expected 1 to INT_MAX")
        self.rows, self.ready = <int>rows, 0
        # the links live in a buffer the object owns (no __dealloc__ needed)
        self.mem = bytearray(n * sizeof(_dense_link))
        self.links = <_dense_link *><char *>self.mem
        self.dbl = getattr(layers[0][0] if isinstance(layers[0], tuple) and layers[0] else None,
                           "dtype", None) == _np.float64
        self.keep = []
        cdef _dense_link *L
        for i, spec in enumerate(layers):
            if not isinstance(spec, tuple) or len(spec) != 9:
                raise TypeError(f"layers[{i}]: expected a tuple of 9 entries")
            kernel, bias, out, pre, dkernel, dbias, dx, act, alpha = spec
            _check_act(act)
            L = &self.links[i]
            kernel_shape = getattr(kernel, "shape", ())
            if len(kernel_shape) != 2:
                raise ValueError(f"layers[{i}]: kernel: expected a 2-D array")
            I, O = kernel_shape
            _blas_size(I, "kernel"); _blas_size(O, "kernel")
            if i > 0 and I != self.links[i - 1].n_out:
                raise ValueError(f"layers[{i}]: kernel: expected {self.links[i - 1].n_out} rows "
                                 f"(the previous layer's units), got {I}")
            _check(I > 0 and O > 0, f"layers[{i}]: kernel: expected no empty side")
            L.n_in, L.n_out, L.act, L.alpha = <int>I, <int>O, act, alpha
            L.kernel = self._addr(kernel, I, O, False, i, "kernel")
            L.out = self._addr(out, rows, O, True, i, "out", True)
            L.dkernel = self._addr(dkernel, I, O, True, i, "dkernel")
            if (bias is None) != (dbias is None):
                raise ValueError(f"layers[{i}]: bias and dbias: expected both or neither")
            if bias is not None:
                L.bias = self._addr(bias, 1, O, False, i, "bias")
                L.dbias = self._addr(dbias, 1, O, True, i, "dbias")
            if pre is not None:
                L.pre = self._addr(pre, rows, O, True, i, "pre", True)
            elif fg_activation_needs_pre(act):
                raise ValueError(f"layers[{i}]: pre: this activation's derivative needs "
                                 "the pre-activation")
            if (dx is None) != (i == 0):
                raise ValueError(f"layers[{i}]: dx: expected None for the first layer only")
            if dx is not None:
                L.dx = self._addr(dx, rows, I, True, i, "dx", True)
        self.outs = layers[n - 1][2]
        self.n = <int>n   # last: a chain refused half-way stays unusable

    cdef void *_addr(self, a, Py_ssize_t r, Py_ssize_t c, bint write, Py_ssize_t i,
                     str name, bint rows_at_least=False) except NULL:
        """a's data, checked: dtype, C order, (r, c) elements (2-D; or (c,)
        when r is 1 and a is 1-D; with rows_at_least, r rows or more, of
        which the calls use the first), writable when write. a is held."""
        cdef const float[:, ::1] f2
        cdef const double[:, ::1] d2
        cdef float[:, ::1] wf2
        cdef double[:, ::1] wd2
        if not isinstance(a, _np.ndarray):
            raise TypeError(f"layers[{i}]: {name}: expected a NumPy array, got {type(a).__name__}")
        want = _np.float64 if self.dbl else _np.float32
        if a.dtype != want:
            raise TypeError(f"layers[{i}]: {name}: expected {_np.dtype(want)}, got {a.dtype}")
        if r == 1 and a.ndim == 1:
            shape = (c,)
        else:
            shape = (r, c)
        if rows_at_least and a.ndim == 2 and a.shape[0] >= r:
            shape = (a.shape[0], c)   # a work buffer grown for a larger batch
        if a.shape != shape:
            raise ValueError(f"layers[{i}]: {name}: expected shape {shape}, got {a.shape}")
        a2 = a.reshape(1, c) if a.ndim == 1 else a
        if write and not a.flags.writeable:
            raise ValueError(f"layers[{i}]: {name}: expected a writable array")
        self.keep.append(a2)
        if self.dbl:
            if write:
                wd2 = a2
                return &wd2[0, 0]
            d2 = a2
            return <void *>&d2[0, 0]
        if write:
            wf2 = a2
            return &wf2[0, 0]
        f2 = a2
        return <void *>&f2[0, 0]

    def forward(self, x, bint logits=False):
        """The last layer's outputs for x (rows, I of the first layer), a view
        of its out buffer; with logits the last activation is left out (the
        loss applies it). The input is held for backward."""
        cdef Py_ssize_t B, I0
        cdef int s
        _check(self.n > 0, "DenseChain: not built")
        I0 = self.links[0].n_in
        self.ready = 0
        if self.dbl:
            self.xd = x
            B, c = self.xd.shape[0], self.xd.shape[1]
        else:
            self.xf = x
            B, c = self.xf.shape[0], self.xf.shape[1]
        if c != I0:
            raise ValueError(f"x: expected {I0} features per row, got {c}")
        if not 0 < B <= self.rows:
            raise ValueError(f"x: expected 1 to {self.rows} rows, got {B}")
        self.last_act = 0 if logits else self.links[self.n - 1].act
        with nogil:
            if self.dbl:
                s = _chain_forward(self.links, self.n, &self.xd[0, 0], <int>B, self.last_act, NULL)
            else:
                s = _chain_forward(self.links, self.n, &self.xf[0, 0], <int>B, self.last_act, NULL)
        if s != FG_OK:
            _raise(s)
        self.ready = <int>B
        return self.outs[:B]

    def backward(self, d):
        """Gradients of every layer from d, the gradient at the last forward's
        outputs (its rows, the last layer's units), which is overwritten (as
        are the layers' dx buffers): dkernel, dbias as in dense_backward."""
        cdef float[:, ::1] df
        cdef double[:, ::1] dd
        cdef int s, B = self.ready, O
        _check(B > 0, "backward: no forward to go back through")
        O = self.links[self.n - 1].n_out
        if self.dbl:
            dd = d
            _same2(dd, B, O, "d")
        else:
            df = d
            _same2(df, B, O, "d")
        with nogil:
            if self.dbl:
                s = _chain_backward(self.links, self.n, &self.xd[0, 0], B, self.last_act,
                                    &dd[0, 0], &dd[0, 0])
            else:
                s = _chain_backward(self.links, self.n, &self.xf[0, 0], B, self.last_act,
                                    &df[0, 0], &df[0, 0])
        if s != FG_OK:
            _raise(s)


cdef class TensorTable:
    """The per-tensor table of a flat parameter buffer, checked once.

    offset (T+1,) int64 bounds tensor t to [offset[t], offset[t+1]); l1, l2,
    scale, cvalue (T,) float64; constraint (T,) int32 codes
    (CONSTRAINT_CODES); cols (T,) int64. ``scale`` receives the clip
    factors of each step (grad_norms writes it). frozen (T,) uint8 or None:
    a tensor marked 1 is left alone by both passes (no penalty, norm 0, no
    update of its weights or moments); the array is read at every step, so
    writing into it freezes or thaws a tensor without a new table."""
    cdef fg_tensors tt
    cdef readonly object offset, l1, l2, scale, constraint, cvalue, cols, frozen
    cdef readonly object upd_sumsq, w_sumsq, ratio
    cdef double *ratio_ptr
    cdef double *scale_ptr
    cdef readonly Py_ssize_t size

    def __init__(self, const int64_t[::1] offset not None, const double[::1] l1 not None,
                 const double[::1] l2 not None, double[::1] scale not None,
                 const int[::1] constraint not None, const double[::1] cvalue not None,
                 const int64_t[::1] cols not None, const unsigned char[::1] frozen=None):
        cdef Py_ssize_t T = offset.shape[0] - 1, t
        _check(T >= 0, "offset: expected at least one entry")
        for name, arr in (("l1", l1), ("l2", l2), ("scale", scale), ("constraint", constraint),
                          ("cvalue", cvalue), ("cols", cols)):
            if arr.shape[0] != T:
                raise ValueError(f"{name}: expected {T} entries")
        if frozen is not None and frozen.shape[0] != T:
            raise ValueError(f"frozen: expected {T} entries")
        _check(offset[0] == 0, "offset: must start at 0")
        for t in range(T):
            _check(offset[t + 1] >= offset[t], "offset: must not decrease")
            _check(0 <= constraint[t] < FG_N_CONSTRAINTS, "constraint: unknown code")
            if constraint[t] == FG_MAX_NORM:
                _check(cols[t] >= 0 and (cols[t] == 0 or (offset[t + 1] - offset[t]) % cols[t] == 0),
                       "cols: must divide the tensor's size")
        # keep the arrays alive: the C table points into them
        self.offset, self.l1, self.l2, self.scale = offset.base, l1.base, l2.base, scale.base
        self.constraint, self.cvalue, self.cols = constraint.base, cvalue.base, cols.base
        self.size = offset[T]
        self.tt.n_tensors = T
        self.tt.offset = &offset[0]
        self.tt.l1 = &l1[0] if T else NULL
        self.tt.l2 = &l2[0] if T else NULL
        self.scale_ptr = &scale[0] if T else NULL
        self.tt.scale = self.scale_ptr
        self.tt.constraint = &constraint[0] if T else NULL
        self.tt.cvalue = &cvalue[0] if T else NULL
        self.tt.cols = &cols[0] if T else NULL
        self.frozen = None if frozen is None else frozen.base
        self.tt.frozen = &frozen[0] if frozen is not None and T else NULL
        self.track_updates(None, None, None)

    def track_updates(self, double[::1] upd_sumsq, double[::1] w_sumsq, double[::1] ratio):
        """Have each step write every tensor's sum of squared updates and of
        squared new weights into upd_sumsq and w_sumsq, and its
        update-to-weight ratio ||w_new - w_old|| / ||w_new|| into ratio
        (||w_new - w_old|| where w_new is all zeros); None for all stops it."""
        cdef Py_ssize_t T = self.tt.n_tensors
        if upd_sumsq is None or w_sumsq is None or ratio is None:
            self.tt.upd_sumsq = self.tt.w_sumsq = self.ratio_ptr = NULL
            self.upd_sumsq = self.w_sumsq = self.ratio = None
            return
        if upd_sumsq.shape[0] != T or w_sumsq.shape[0] != T or ratio.shape[0] != T:
            raise ValueError(f"upd_sumsq, w_sumsq, ratio: expected {T} entries")
        self.upd_sumsq, self.w_sumsq, self.ratio = upd_sumsq.base, w_sumsq.base, ratio.base
        self.tt.upd_sumsq = &upd_sumsq[0] if T else NULL
        self.tt.w_sumsq = &w_sumsq[0] if T else NULL
        self.ratio_ptr = &ratio[0] if T else NULL


cdef double _hyper(str name, double value) except? -1.0:
    # NaN fails the comparison too
    if not (0.0 <= value <= DBL_MAX):
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return value


cdef double _fraction(str name, double value) except? -1.0:
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name}: expected a value in [0, 1), got {value!r}")
    return value


cdef class StepConfig:
    """The settings of an optimizer's compiled step, checked once when the
    optimizer is built; each step passes only its learning rate and count.

    kind is an OPTIMIZER_CODES value. Clipping: clipnorm > 0 scales each
    tensor's gradient to a norm of at most clipnorm, global_clipnorm > 0 all
    of them together, clipvalue > 0 clips each element; 0 turns each off.
    The other fields are the update formulas' (csrc/fastgrad_impl.h); the
    ones an optimizer does not use are ignored."""
    cdef fg_opt_config c
    cdef readonly double clipnorm, global_clipnorm
    cdef readonly bint needs_m, needs_v, needs_vmax

    def __init__(self, int kind, *, double momentum=0.0, double rho=0.0, double beta_1=0.0,
                 double beta_2=0.0, double epsilon=0.0, double weight_decay=0.0,
                 double clipvalue=0.0, double clipnorm=0.0, double global_clipnorm=0.0,
                 bint nesterov=False, bint centered=False, bint amsgrad=False):
        if not (0 <= kind < FG_N_OPTIMIZERS):
            raise ValueError(f"kind: unknown optimizer code {kind}")
        self.c.kind = kind
        self.c.momentum, self.c.rho = _fraction("momentum", momentum), _fraction("rho", rho)
        if kind == FG_LION:   # Lion takes beta_1 in (0, 1], as Keras
            if not (0.0 < beta_1 <= 1.0):
                raise ValueError(f"beta_1: expected a value in (0, 1], got {beta_1!r}")
            self.c.beta_1 = beta_1
        else:
            self.c.beta_1 = _fraction("beta_1", beta_1)
        self.c.beta_2 = _fraction("beta_2", beta_2)
        self.c.epsilon = _hyper("epsilon", epsilon)
        if kind != FG_SGD and kind != FG_LION and not epsilon > 0:
            raise ValueError(f"epsilon: expected a positive number, got {epsilon!r}")
        self.c.weight_decay = _hyper("weight_decay", weight_decay)
        self.c.clipvalue = _hyper("clipvalue", clipvalue)
        self.clipnorm = _hyper("clipnorm", clipnorm)
        self.global_clipnorm = _hyper("global_clipnorm", global_clipnorm)
        if (clipvalue > 0) + (clipnorm > 0) + (global_clipnorm > 0) > 1:
            raise ValueError("clipnorm, clipvalue, global_clipnorm: only one of them can be set")
        self.c.nesterov, self.c.centered, self.c.amsgrad = nesterov, centered, amsgrad
        self.c.lr, self.c.step = 0.0, 1
        # the moment buffers these settings read and write
        self.c.u_product, self.c.ema_momentum = 1.0, 0.0
        self.c.ema_overwrite = self.c.accumulate_only = 0
        self.needs_m = (kind in (FG_ADAM, FG_NADAM, FG_ADAMAX, FG_ADADELTA, FG_LION)
                        or (kind == FG_RMSPROP and centered))
        self.needs_v = (kind != FG_SGD and kind != FG_LION) or (kind == FG_SGD and momentum != 0)
        self.needs_vmax = (kind == FG_ADAM and amsgrad) or (kind == FG_RMSPROP and momentum != 0)

    @property
    def kind(self):
        return self.c.kind

    def __repr__(self):
        c = self.c
        return (f"StepConfig(kind={c.kind}, momentum={c.momentum!r}, rho={c.rho!r}, "
                f"beta_1={c.beta_1!r}, beta_2={c.beta_2!r}, epsilon={c.epsilon!r}, "
                f"weight_decay={c.weight_decay!r}, clipvalue={c.clipvalue!r}, "
                f"clipnorm={self.clipnorm!r}, global_clipnorm={self.global_clipnorm!r}, "
                f"nesterov={bool(c.nesterov)}, centered={bool(c.centered)}, "
                f"amsgrad={bool(c.amsgrad)})")


def grad_norms(double[::1] sumsq not None, double[::1] norms not None, floating[::1] grad not None,
               const floating[::1] param not None, TensorTable table not None,
               StepConfig config not None, const floating[::1] acc=None, double acc_steps=1.0):
    """Pass 1 of a step: adds regularizer gradients into grad (with acc,
    the gradients accumulated over the previous micro-steps, makes grad
    (grad + acc) / acc_steps, the average to apply), writes each
    tensor's sum of squared gradients into sumsq and its square root into
    norms, and the clip factor config asks for into table.scale (all 1 when
    a gradient is not finite). Returns (index of the first tensor with a
    non-finite gradient or -1, the regularization penalty, the global norm
    sqrt(sum(sumsq)), whether clipping changes a gradient)."""
    cdef int64_t bad = -1
    cdef double penalty = 0.0, total = 0.0, cap
    cdef Py_ssize_t t, T = table.tt.n_tensors
    cdef double *scale = table.scale_ptr
    cdef bint clipped = False
    if sumsq.shape[0] != T or norms.shape[0] != T:
        raise ValueError(f"sumsq, norms: expected {T} entries")
    if not (grad.shape[0] == table.size and param.shape[0] == table.size):
        raise ValueError(f"grads and params: expected {table.size} elements")
    _len1(acc, table.size, False, "acc")
    _check(acc is None or acc_steps >= 1, "acc_steps: expected a count >= 1")
    with nogil:
        _norms(&sumsq[0] if T else NULL, &penalty, &bad, _ptr1(grad), _cptr1(param),
               _cptr1(acc), acc_steps, &table.tt)
        for t in range(T):
            norms[t] = sqrt(sumsq[t])
            total += sumsq[t]
            scale[t] = 1.0
        total = sqrt(total)
        if bad < 0:
            if config.clipnorm > 0:
                for t in range(T):
                    if norms[t] > config.clipnorm:
                        scale[t] = config.clipnorm / norms[t]
                        clipped = True
            elif config.global_clipnorm > 0:
                if total > config.global_clipnorm:
                    cap = config.global_clipnorm / total
                    for t in range(T):
                        scale[t] = cap
                    clipped = True
            elif config.c.clipvalue > 0 and T > 0:
                # only for the record: a read of the gradients, no temporary
                clipped = _any_above(_ptr1(grad), grad.shape[0], config.c.clipvalue) != 0
    return bad, penalty, total, clipped


def optimizer_step(floating[::1] param not None, floating[::1] m, floating[::1] v,
                   floating[::1] vmax, const floating[::1] grad not None,
                   TensorTable table not None, StepConfig config not None, double lr,
                   int64_t step, floating[::1] ema=None, floating[::1] acc=None,
                   bint accumulate=False, double ema_momentum=0.0, bint ema_overwrite=False,
                   double u_product=1.0):
    """Pass 2 of a step: the fused update of every parameter with learning
    rate lr and 1-based step count step (formulas in csrc/fastgrad_impl.h),
    scaling each tensor's gradient by table.scale; with the table tracking
    updates, also the update-to-weight ratios. m, v, vmax are the moment
    buffers config.needs_m, needs_v, needs_vmax ask for (None otherwise).
    With ema, the moving average ema = ema_momentum ema + (1 - ema_momentum) w
    follows each update (then w = ema when ema_overwrite). With acc and
    accumulate, the call is a micro-step of gradient accumulation (acc +=
    grad, no update); with acc alone it is the update, and acc is cleared.
    u_product is Nadam's prod_{i<=step} beta_1 (1 - 0.96^i / 2).
    Returns the first tensor whose weights are not all finite after the
    step (an update that overflowed), or -1."""
    cdef int64_t overflow = -1
    cdef Py_ssize_t t
    cdef double du, ww
    cdef int s
    cdef Py_ssize_t N = table.size
    if not (param.shape[0] == N and grad.shape[0] == N):
        raise ValueError(f"params and grads: expected {N} elements")
    if config.needs_m: _len1(m, N, True, "m")
    if config.needs_v: _len1(v, N, True, "v")
    if config.needs_vmax: _len1(vmax, N, True, "vmax")
    _len1(ema, N, False, "ema")
    _len1(acc, N, accumulate, "acc")
    _check(step >= 1, "step: expected a count >= 1")
    _hyper("learning_rate", lr)
    _check(0.0 <= ema_momentum <= 1.0, "ema_momentum: expected a value in [0, 1]")
    _check(0.0 <= u_product <= 1.0, "u_product: expected a value in [0, 1]")
    config.c.lr, config.c.step = lr, step
    config.c.ema_momentum, config.c.ema_overwrite = ema_momentum, ema_overwrite
    config.c.accumulate_only, config.c.u_product = accumulate, u_product
    with nogil:
        s = _step(&overflow, _ptr1(param), _ptr1(m) if config.needs_m else NULL,
                  _ptr1(v) if config.needs_v else NULL, _ptr1(vmax) if config.needs_vmax else NULL,
                  _ptr1(ema), _ptr1(acc), _cptr1(grad), &table.tt, &config.c)
        if s == FG_OK and table.ratio_ptr != NULL:
            for t in range(table.tt.n_tensors):
                du = sqrt(table.tt.upd_sumsq[t])
                ww = table.tt.w_sumsq[t]
                table.ratio_ptr[t] = du / sqrt(ww) if ww > 0 else du
    if s != FG_OK:
        _raise(s)
    return overflow


def batchnorm_forward(const floating[:, ::1] inp not None, const floating[::1] gamma,
                      const floating[::1] beta, floating[::1] moving_mean not None,
                      floating[::1] moving_var not None, floating[:, ::1] out not None, double[::1] mean not None,
                      double[::1] rstd not None, double epsilon, double momentum, bint training):
    """out = gamma (inp - mu) / sqrt(var + epsilon) + beta, with batch
    statistics (training; the moving ones are updated) or the moving ones.
    mean and rstd (float64) receive mu and 1 / sqrt(var + epsilon)."""
    cdef Py_ssize_t B = inp.shape[0], F = inp.shape[1]
    _same2(out, B, F, "out")
    _len2(gamma, beta, F, False, "gamma", "beta")
    _len2(moving_mean, moving_var, F, True, "moving_mean", "moving_variance")
    _len2(mean, rstd, F, True, "mean", "rstd")
    _check(not training or B > 0, "x: training needs at least one row")
    _check(epsilon > 0, "epsilon: expected a positive number")
    with nogil:
        _bn_forward(_ptr2(out), _ptr1(mean), _ptr1(rstd), _ptr1(moving_mean), _ptr1(moving_var),
                    _cptr2(inp), _cptr1(gamma), _cptr1(beta), B, F, epsilon, momentum, training)
    return out


def batchnorm_backward(const floating[:, ::1] dout not None, const floating[:, ::1] inp not None,
                       const double[::1] mean not None, const double[::1] rstd not None,
                       const floating[::1] gamma, floating[:, ::1] dinp not None,
                       floating[::1] dgamma, floating[::1] dbeta):
    """Backward of batchnorm_forward in training mode (closed form)."""
    cdef Py_ssize_t B = inp.shape[0], F = inp.shape[1]
    _same2(dout, B, F, "dout")
    _same2(dinp, B, F, "dinp")
    _check(dinp is not None, "dinp is required")
    _len1(gamma, F, False, "gamma")
    _len2(dgamma, dbeta, F, False, "dgamma", "dbeta")
    _len2(mean, rstd, F, True, "mean", "rstd")
    with nogil:
        _bn_backward(_ptr2(dinp), _ptr1(dgamma), _ptr1(dbeta), _cptr2(dout), _cptr2(inp),
                     _cptr1(mean), _cptr1(rstd), _cptr1(gamma), B, F)
    return dinp


def dropout(const floating[:, ::1] inp not None, floating[:, ::1] out not None, double rate,
            uint64_t seed, uint64_t offset):
    """Inverted dropout of inp into out with the mask of (seed, offset);
    applying it to a gradient with the same seed and offset is the backward."""
    cdef Py_ssize_t B = inp.shape[0], F = inp.shape[1]
    _same2(out, B, F, "out")
    _check(0.0 <= rate < 1.0, "rate: expected a value in [0, 1)")
    with nogil:
        _dropout(_ptr2(out), _cptr2(inp), B * F, rate, seed, offset)
    return out


def gaussian_noise(const floating[:, ::1] inp not None, floating[:, ::1] out not None,
                   double stddev, bint multiply, uint64_t seed, uint64_t offset):
    """out = inp + stddev z, or inp (1 + stddev z) when multiply, z normal
    numbers from (seed, offset); the multiplicative call on a gradient with
    the same seed and offset is its backward."""
    cdef Py_ssize_t B = inp.shape[0], F = inp.shape[1]
    _same2(out, B, F, "out")
    _hyper("stddev", stddev)
    with nogil:
        _gauss(_ptr2(out), _cptr2(inp), B * F, stddev, multiply, seed, offset)
    return out


def alpha_dropout(const floating[:, ::1] inp not None, floating[:, ::1] out not None,
                  double rate, double a, double b_keep, double b_drop, uint64_t seed,
                  uint64_t offset):
    """out = a inp + b_keep where dropout's mask of (seed, offset) keeps,
    b_drop elsewhere."""
    cdef Py_ssize_t B = inp.shape[0], F = inp.shape[1]
    _same2(out, B, F, "out")
    _check(0.0 <= rate < 1.0, "rate: expected a value in [0, 1)")
    with nogil:
        _alpha_drop(_ptr2(out), _cptr2(inp), B * F, rate, a, b_keep, b_drop, seed, offset)
    return out


def affine(const floating[:, ::1] inp not None, const floating[::1] shift,
           const floating[::1] scale not None, floating[:, ::1] out not None, bint divide):
    """Per feature: out = (inp - shift) / scale when divide, else
    inp * scale + shift; shift None is zeros."""
    cdef Py_ssize_t B = inp.shape[0], F = inp.shape[1]
    _same2(out, B, F, "out")
    _len1(shift, F, False, "shift")
    _len1(scale, F, True, "scale")
    with nogil:
        _affine(_ptr2(out), _cptr2(inp), _cptr1(shift), _cptr1(scale), B, F, divide)
    return out


def set_kernel_threads(int n):
    """Threads of the kernels that split their work (activations,
    LayerNormalization, the optimizer's update, products split in shares),
    the calling thread included:
    n >= 1, or 0 for one per online CPU (the default). Results do not
    depend on it."""
    _check(0 <= n <= 64, "n: expected 0 (one per CPU) or a thread count from 1 to 64")
    fg_set_threads(n)


def get_kernel_threads():
    """The kernel thread count in effect (set_kernel_threads' n, or the
    online CPUs for 0)."""
    return fg_get_threads()


def layernorm_forward(const floating[:, ::1] inp not None, const floating[::1] gamma,
                      const floating[::1] beta, floating[:, ::1] out not None,
                      double[::1] mean not None, double[::1] rstd not None, double epsilon):
    """out = gamma (inp - mu) / sqrt(var + epsilon) + beta per row, mu and
    var the row's mean and biased variance; mean and rstd (float64, one per
    row) receive mu and 1 / sqrt(var + epsilon)."""
    cdef Py_ssize_t B = inp.shape[0], F = inp.shape[1]
    _check(F > 0, "x: expected at least one feature")
    _same2(out, B, F, "out")
    _len2(gamma, beta, F, False, "gamma", "beta")
    _len2(mean, rstd, B, True, "mean", "rstd")
    _check(epsilon > 0, "epsilon: expected a positive number")
    with nogil:
        _ln_forward(_ptr2(out), _ptr1(mean), _ptr1(rstd), _cptr2(inp), _cptr1(gamma),
                    _cptr1(beta), B, F, epsilon)
    return out


def layernorm_backward(const floating[:, ::1] dout not None, const floating[:, ::1] inp not None,
                       const double[::1] mean not None, const double[::1] rstd not None,
                       const floating[::1] gamma, floating[:, ::1] dinp not None,
                       floating[::1] dgamma, floating[::1] dbeta, double[::1] work):
    """Backward of layernorm_forward; work (LAYERNORM_WORK * F float64) holds
    the column sums and is required when dgamma or dbeta is given."""
    cdef Py_ssize_t B = inp.shape[0], F = inp.shape[1]
    _same2(dout, B, F, "dout")
    _same2(dinp, B, F, "dinp")
    _len1(gamma, F, False, "gamma")
    _len2(dgamma, dbeta, F, False, "dgamma", "dbeta")
    _len2(mean, rstd, B, True, "mean", "rstd")
    _len1(work, 2 * FG_LN_PARTS * F, dgamma is not None or dbeta is not None, "work")
    with nogil:
        _ln_backward(_ptr2(dinp), _ptr1(dgamma), _ptr1(dbeta),
                     &work[0] if work is not None and F > 0 else NULL, _cptr2(dout),
                     _cptr2(inp), _cptr1(mean), _cptr1(rstd), _cptr1(gamma), B, F)
    return dinp


cdef int _relu_settings(double slope, double threshold, double max_value) except -1:
    # NaN fails the comparisons too; max_value may be inf (no cap)
    _check(0.0 <= slope <= DBL_MAX, "negative_slope: expected a finite number >= 0")
    _check(0.0 <= threshold <= DBL_MAX, "threshold: expected a finite number >= 0")
    _check(max_value >= 0.0, "max_value: expected a number >= 0")
    return 0


def relu_forward(const floating[:, ::1] inp not None, floating[:, ::1] out not None,
                 double negative_slope, double threshold, double max_value):
    """out = inp > threshold ? min(inp, max_value) : negative_slope (inp - threshold)."""
    cdef Py_ssize_t B = inp.shape[0], F = inp.shape[1]
    _same2(out, B, F, "out")
    _relu_settings(negative_slope, threshold, max_value)
    with nogil:
        _relu_fwd(_ptr2(out), _cptr2(inp), B * F, negative_slope, threshold, max_value)
    return out


def relu_backward(const floating[:, ::1] dout not None, const floating[:, ::1] inp not None,
                  floating[:, ::1] dinp not None, double negative_slope, double threshold,
                  double max_value):
    """dinp = dout * relu_forward's slope at inp."""
    cdef Py_ssize_t B = inp.shape[0], F = inp.shape[1]
    _same2(dout, B, F, "dout")
    _same2(dinp, B, F, "dinp")
    _relu_settings(negative_slope, threshold, max_value)
    with nogil:
        _relu_back(_ptr2(dinp), _cptr2(dout), _cptr2(inp), B * F, negative_slope, threshold,
                   max_value)
    return dinp


def prelu_forward(const floating[:, ::1] inp not None, const floating[::1] alpha not None,
                  floating[:, ::1] out not None):
    """out = inp > 0 ? inp : alpha * inp, alpha one slope per feature."""
    cdef Py_ssize_t B = inp.shape[0], F = inp.shape[1]
    _same2(out, B, F, "out")
    _len1(alpha, F, True, "alpha")
    with nogil:
        _prelu_fwd(_ptr2(out), _cptr2(inp), _cptr1(alpha), B, F)
    return out


def prelu_backward(const floating[:, ::1] dout not None, const floating[:, ::1] inp not None,
                   const floating[::1] alpha not None, floating[:, ::1] dinp not None,
                   floating[::1] dalpha):
    """dinp = dout * (inp > 0 ? 1 : alpha); dalpha (optional) = column sums
    of dout * min(inp, 0)."""
    cdef Py_ssize_t B = inp.shape[0], F = inp.shape[1]
    _same2(dout, B, F, "dout")
    _same2(dinp, B, F, "dinp")
    _len1(alpha, F, True, "alpha")
    _len1(dalpha, F, False, "dalpha")
    with nogil:
        _prelu_back(_ptr2(dinp), _ptr1(dalpha), _cptr2(dout), _cptr2(inp), _cptr1(alpha), B, F)
    return dinp


def label_range(const int64_t[::1] y not None):
    """(min, max) of y in one pass; (0, -1) when empty."""
    cdef Py_ssize_t k, n = y.shape[0]
    cdef int64_t lo = 0, hi = -1
    if n and (<size_t>&y[0]) % sizeof(int64_t):
        raise ValueError("y: expected an aligned array")
    if n:
        lo = hi = y[0]
        with nogil:
            for k in range(1, n):
                if y[k] < lo: lo = y[k]
                if y[k] > hi: hi = y[k]
    return lo, hi


def first_nonfinite_row(const floating[:, ::1] x not None):
    """Index of the first row holding inf or NaN, or -1."""
    cdef Py_ssize_t r
    with nogil:
        r = _bad_row(_cptr2(x), x.shape[0], x.shape[1])
    return r


# -- metric accumulation -----------------------------------------------------
# Streaming metrics add each batch into a small float64 state: no
# temporaries sized by the batch, one pass over the predictions.
cdef enum:   # the streaming mean metrics' kinds (METRIC_CODES)
    M_CATEGORICAL_ACCURACY, M_SPARSE_CATEGORICAL_ACCURACY, M_BINARY_ACCURACY
    M_MSE, M_MAE, M_MAPE, M_TOP_K, M_SPARSE_TOP_K, M_N_KINDS

METRIC_CODES = {"categorical_accuracy": M_CATEGORICAL_ACCURACY,
                "sparse_categorical_accuracy": M_SPARSE_CATEGORICAL_ACCURACY,
                "binary_accuracy": M_BINARY_ACCURACY, "mean_squared_error": M_MSE,
                "mean_absolute_error": M_MAE, "mean_absolute_percentage_error": M_MAPE,
                "top_k_categorical_accuracy": M_TOP_K,
                "sparse_top_k_categorical_accuracy": M_SPARSE_TOP_K}
cdef double _EPS = 1e-7   # Keras's backend.epsilon()


cdef inline Py_ssize_t _argmax(const floating *p, Py_ssize_t O) noexcept nogil:
    cdef Py_ssize_t j, best = 0
    for j in range(1, O):
        if p[j] > p[best]:
            best = j
    return best


cdef inline double _metric_row(int kind, const floating *p, const floating *t, Py_ssize_t lab,
                               Py_ssize_t O, double param) noexcept nogil:
    """One row's value for metric_update (lab: the sparse kinds' class, -1
    when invalid)."""
    cdef Py_ssize_t j, above = 0
    cdef double v = 0.0, e, y
    if kind == M_CATEGORICAL_ACCURACY:
        return _argmax(p, O) == _argmax(t, O)
    if kind == M_SPARSE_CATEGORICAL_ACCURACY:
        return _argmax(p, O) == lab
    if kind == M_BINARY_ACCURACY:
        for j in range(O):   # as Keras: a target of 0.7 never matches
            v += (1.0 if p[j] > <floating>param else 0.0) == <double>t[j]
        return v / O
    if kind == M_MSE or kind == M_MAE:
        for j in range(O):
            e = <double>t[j] - <double>p[j]
            v += e * e if kind == M_MSE else fabs(e)
        return v / O
    if kind == M_MAPE:
        for j in range(O):
            y = fabs(<double>t[j])
            v += fabs(<double>t[j] - <double>p[j]) / (y if y > _EPS else _EPS)
        return 100.0 * v / O
    if kind == M_TOP_K:
        lab = _argmax(t, O)
    if not 0 <= lab < O:
        return 0.0
    for j in range(O):
        above += p[j] > p[lab]
    return above < <Py_ssize_t>param


def metric_update(int kind, const floating[:, ::1] pred not None, const floating[:, ::1] target,
                  const int64_t[::1] labels, const floating[::1] weights,
                  double[::1] state not None, double param):
    """Add a batch to a mean metric's state: state[0] += sum_i w_i v_i and
    state[1] += sum_i w_i, with v_i row i's value (kinds: METRIC_CODES;
    w_i = weights[i], 1 without weights). Row values: accuracies 1 or 0
    (binary: the row's share of (p > param) == y); squared, absolute and
    absolute percentage errors 100 |y - p| / max(|y|, 1e-7) averaged over
    the row; top-k: 1 when fewer than k = param entries exceed the true
    class's. Sparse kinds take labels, or target of one column."""
    cdef Py_ssize_t B = pred.shape[0], O = pred.shape[1], i, lab = -1
    cdef double total = 0.0, count = 0.0, w
    cdef const floating *t
    cdef bint sparse = kind == M_SPARSE_CATEGORICAL_ACCURACY or kind == M_SPARSE_TOP_K
    if not 0 <= kind < M_N_KINDS:
        raise ValueError(f"unknown metric code {kind}")
    _check(state.shape[0] >= 2, "state: expected 2 entries")
    _len1(weights, B, False, "weights")
    if sparse and labels is not None:
        _check(labels.shape[0] == B, f"y: expected {B} integer labels")
    else:
        _check(target is not None, "y: a target array is required")
        _same2(target, B, 1 if sparse else O, "y")
    if O == 0 or B == 0:
        return
    with nogil:
        for i in range(B):
            t = &target[i, 0] if target is not None else NULL
            if sparse:
                if labels is not None:
                    lab = labels[i]
                elif t[0] >= 0 and t[0] < O:   # also refuses NaN before the cast
                    lab = <Py_ssize_t>t[0]
                else:
                    lab = -1
            w = <double>weights[i] if weights is not None else 1.0
            total += w * _metric_row(kind, &pred[i, 0], t, lab, O, param)
            count += w
        state[0] += total
        state[1] += count


def confusion_update(const floating[:, ::1] pred not None, const floating[:, ::1] target not None,
                     const floating[::1] weights, const double[::1] thresholds not None,
                     double[:, ::1] state not None):
    """Add a batch to confusion counts at each threshold t_k (compared in the
    predictions' precision, as Keras does), over every entry (rows weighted
    by w_i): state[0, k] true positives (p > t_k, y !=
    0), state[1, k] false positives, state[2, k] true negatives, state[3, k]
    false negatives."""
    cdef Py_ssize_t B = pred.shape[0], O = pred.shape[1], T = thresholds.shape[0], i, j, q
    cdef double w
    cdef floating p
    cdef bint pos
    _same2(target, B, O, "y")
    _len1(weights, B, False, "weights")
    _check(state.shape[0] == 4 and state.shape[1] == T, "state: expected shape (4, thresholds)")
    with nogil:
        for i in range(B):
            w = <double>weights[i] if weights is not None else 1.0
            for j in range(O):
                p = pred[i, j]
                pos = target[i, j] != 0.0
                for q in range(T):
                    if p > <floating>thresholds[q]:
                        state[0 if pos else 1, q] += w
                    else:
                        state[3 if pos else 2, q] += w


def bucket_update(const floating[:, ::1] pred not None, const floating[:, ::1] target not None,
                  const floating[::1] weights, double[:, ::1] hist not None):
    """Add a batch to the histograms of evenly spaced thresholds t_k =
    k / (T - 1) (T = hist.shape[1]): an entry p, clipped to [0, 1], falls in
    bucket max(ceil(p (T - 1)) - 1, 0), so that it exceeds exactly the
    thresholds up to its bucket (the first one taken as -epsilon, the last
    as 1 + epsilon). hist[0] sums the weights of positive entries (y != 0),
    hist[1] of negative ones; reversed cumulative sums give the counts."""
    cdef Py_ssize_t B = pred.shape[0], O = pred.shape[1], T = hist.shape[1], i, j, b
    cdef floating p, top
    cdef double w
    _same2(target, B, O, "y")
    _len1(weights, B, False, "weights")
    _check(hist.shape[0] == 2 and T >= 2, "hist: expected shape (2, thresholds >= 2)")
    top = <floating>(T - 1)
    with nogil:
        for i in range(B):
            w = <double>weights[i] if weights is not None else 1.0
            for j in range(O):
                p = pred[i, j]
                p = p if p > 0 else 0   # NaN too, before the cast
                p = 1 if p > 1 else p
                b = <Py_ssize_t>ceil(p * top) - 1
                b = 0 if b < 0 else b
                hist[0 if target[i, j] != 0.0 else 1, b] += w


cdef inline double _div0(double a, double b) noexcept nogil:
    return a / b if b != 0.0 else 0.0   # Keras's divide_no_nan


def auc_result(double[:, ::1] conf not None, const double[:, ::1] hist, bint pr,
               int method):
    """Area under the curve from confusion counts conf (4, T): rows TP, FP,
    TN, FN at thresholds in increasing order. With hist (2, T) (bucket_update's
    histograms) the counts are first made from it into conf: TP_k = sum of
    positives in buckets >= k, FP_k likewise, TN_k = negatives - FP_k, FN_k =
    positives - TP_k. pr: precision-recall curve, else ROC. method: 0
    interpolation (for PR, Davis and Goadrich's: each interval adds
    slope (dTP + intercept log(P_A / P_B)) / (TP_B + FN_B) with P = TP + FP
    linear in between), 1 minoring, 2 majoring (Riemann sums of the lower or
    upper ends). Keras 3's formulas, in float64."""
    cdef Py_ssize_t T = conf.shape[1], i
    cdef double pos = 0.0, neg = 0.0, tp, fp, total = 0.0, x0, x1, y0, y1, h
    cdef double dtp, p0, p1, dp, slope, ratio
    _check(conf.shape[0] == 4 and T >= 2, "conf: expected shape (4, thresholds >= 2)")
    _check(0 <= method <= 2, "method: expected 0, 1 or 2")
    if hist is not None:
        _check(hist.shape[0] == 2 and hist.shape[1] == T, "hist: expected shape (2, T)")
    with nogil:
        if hist is not None:
            tp = fp = 0.0
            for i in range(T - 1, -1, -1):
                tp += hist[0, i]
                fp += hist[1, i]
                conf[0, i], conf[1, i] = tp, fp
            pos, neg = tp, fp
            for i in range(T):
                conf[2, i] = neg - conf[1, i]
                conf[3, i] = pos - conf[0, i]
        for i in range(T - 1):
            if pr and method == 0:
                dtp = conf[0, i] - conf[0, i + 1]
                p0 = conf[0, i] + conf[1, i]
                p1 = conf[0, i + 1] + conf[1, i + 1]
                dp = p0 - p1
                slope = _div0(dtp, dp if dp > 0 else 0.0)
                ratio = _div0(p0, p1 if p1 > 0 else 0.0) if p0 > 0 and p1 > 0 else 1.0
                total += _div0(slope * (dtp + (conf[0, i + 1] - slope * p1) * log(ratio)),
                               max(conf[0, i + 1] + conf[3, i + 1], 0.0))
                continue
            y0 = _div0(conf[0, i], conf[0, i] + conf[3, i])          # recall
            y1 = _div0(conf[0, i + 1], conf[0, i + 1] + conf[3, i + 1])
            if pr:   # x = recall, y = precision
                x0, x1 = y0, y1
                y0 = _div0(conf[0, i], conf[0, i] + conf[1, i])
                y1 = _div0(conf[0, i + 1], conf[0, i + 1] + conf[1, i + 1])
            else:    # x = false positive rate, y = recall
                x0 = _div0(conf[1, i], conf[1, i] + conf[2, i])
                x1 = _div0(conf[1, i + 1], conf[1, i + 1] + conf[2, i + 1])
            h = (y0 + y1) / 2 if method == 0 else (min(y0, y1) if method == 1 else max(y0, y1))
            total += (x0 - x1) * h
    return total
