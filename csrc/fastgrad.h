/* fastgrad C99 kernels.
 *
 * Size letters used in the shape comments:
 *   B  batch rows           I  input features      O  output features (units)
 *   F  features (BatchNormalization, Dropout)
 *   N  elements of a flat buffer
 * Every matrix is row-major and contiguous. Each kernel exists for float
 * (suffix _f32) and double (suffix _f64), generated from fastgrad_impl.h.
 * Argument order: outputs, then saved state, then inputs, then sizes, then
 * options. Gradients carry the forward name prefixed with d.
 * Kernels that can fail return FG_OK or a negative status naming the
 * failure; the others return nothing. None aborts the process.
 * Reductions accumulate in double. Matrix products are not here: the Cython
 * layer calls an optimized BLAS and these kernels do what surrounds it. */
#ifndef FASTGRAD_H
#define FASTGRAD_H

#include <stdint.h>
#include <stddef.h>

/* The one declaration of every code: _kernels.pxd mirrors these enums by
 * name and _core.pyx builds the Python tables from them. */
enum fg_status {
    FG_OK = 0,
    FG_EACTIVATION = -1,  /* unknown activation code */
    FG_ELOSS = -2,        /* unknown loss code */
    FG_ELABEL = -3,       /* a sparse label outside [0, O) */
    FG_EOPTIMIZER = -4,   /* unknown optimizer code */
    FG_ENEEDS_PRE = -5    /* the activation's derivative needs pre, not given */
};

/* Activation codes. */
enum fg_activation {
    FG_LINEAR = 0, FG_RELU, FG_LEAKY_RELU, FG_ELU, FG_SELU, FG_GELU,
    FG_SILU, FG_SIGMOID, FG_TANH, FG_SOFTMAX,
    FG_SOFTPLUS, FG_SOFTSIGN, FG_RELU6, FG_HARD_SIGMOID, FG_HARD_SILU, FG_MISH,
    FG_EXPONENTIAL, FG_LOG_SOFTMAX, FG_N_ACTIVATIONS
};

/* Loss codes. */
enum fg_loss {
    FG_MSE = 0, FG_MAE, FG_HUBER, FG_BINARY_CROSSENTROPY,
    FG_CATEGORICAL_CROSSENTROPY, FG_SPARSE_CATEGORICAL_CROSSENTROPY,
    FG_LOG_COSH, FG_KL_DIVERGENCE, FG_POISSON, FG_HINGE, FG_SQUARED_HINGE,
    FG_CATEGORICAL_HINGE, FG_MAPE, FG_MSLE, FG_BINARY_FOCAL_CROSSENTROPY,
    FG_CATEGORICAL_FOCAL_CROSSENTROPY, FG_COSINE_SIMILARITY,
    FG_N_LOSSES
};

/* Settings of a loss; unused fields are ignored. */
typedef struct {
    double delta;              /* Huber's delta */
    double alpha, gamma;       /* focal losses' weight and focusing exponent */
    int class_balancing;       /* binary focal: weight alpha for t = 1, 1 - alpha for t = 0 */
} fg_loss_params;

/* Optimizer codes. */
enum fg_optimizer {
    FG_SGD = 0, FG_RMSPROP, FG_ADAM, FG_ADAGRAD, FG_NADAM, FG_ADAMAX, FG_ADADELTA,
    FG_LION, FG_N_OPTIMIZERS
};

/* Constraint codes, applied to a tensor right after its update. */
enum fg_constraint {
    FG_NO_CONSTRAINT = 0, FG_MAX_NORM, FG_NON_NEG, FG_CLIP_VALUE, FG_N_CONSTRAINTS
};

/* Hyperparameters of one optimizer step; unused fields are ignored.
 * lr is this step's learning rate (schedules are evaluated by the caller),
 * step the 1-based count including this step (bias corrections). */
typedef struct {
    int kind;
    double lr, momentum, rho, beta_1, beta_2, epsilon, weight_decay;
    double clipvalue;          /* element-wise gradient clip; 0 = off */
    int nesterov, centered, amsgrad;
    int64_t step;
    double u_product;          /* Nadam: prod_{i<=step} beta_1 (1 - 0.96^i / 2) */
    double ema_momentum;       /* with an ema buffer: avg = mom avg + (1-mom) w */
    int ema_overwrite;         /* with an ema buffer: then w = avg */
    int accumulate_only;       /* with an acc buffer: acc += grad, no update */
} fg_opt_config;

/* Per-tensor table of a flat buffer: tensor t is [offset[t], offset[t+1]). */
typedef struct {
    const int64_t *offset;     /* n_tensors + 1 entries */
    const double *l1, *l2;     /* regularizer factors, n_tensors entries each */
    const double *scale;       /* gradient scale from clipnorm / global_clipnorm */
    const int *constraint;     /* fg_constraint codes */
    const double *cvalue;      /* MaxNorm max_value or ClipValue clip_value */
    const int64_t *cols;       /* MaxNorm: columns of the (rows, cols) kernel; 0 = 1-D */
    const unsigned char *frozen; /* NULL, or 1 for a tensor the step leaves alone
                                  * (no penalty, norm 0, no update, no moments) */
    double *upd_sumsq;         /* NULL, or receives sum (w_new - w_old)^2 per tensor */
    double *w_sumsq;           /* NULL, or receives sum w_new^2 per tensor */
    ptrdiff_t n_tensors;
} fg_tensors;

/* Activation statistics, gathered by the dense epilogue when asked for:
 * alive[j] is set to 1 when unit j is positive in some row (relu), and
 * saturated counts outputs with sigmoid outside [0.01, 0.99] or |tanh| > 0.99. */
typedef struct {
    unsigned char *alive;      /* O entries, cleared by the caller */
    int64_t saturated;
} fg_act_stats;

/* Threads for the kernels that split their work (activations and
 * LayerNormalization from FG_PARALLEL_MIN = 131072 elements, the
 * optimizer's update from 32768 parameters, and the bindings' BLAS
 * products in shares): at most n,
 * the calling thread included; 0 (the default) means one per online CPU,
 * 1 keeps everything on the calling thread. Results do not depend on it. */
void fg_set_threads(int n);
int fg_get_threads(void);

/* Runs fn(ctx, lo, hi) over [0, n) in chunks of `chunk` on those threads,
 * the caller's included (the bindings split BLAS products with it), in the
 * caller's floating-point mode. fn must give the same result whichever
 * thread runs a chunk. */
typedef void (*fg_range_fn)(void *ctx, ptrdiff_t lo, ptrdiff_t hi);
void fg_parallel_for(fg_range_fn fn, void *ctx, ptrdiff_t n, ptrdiff_t chunk);

/* Small products run on one BLAS thread, where a second one does not pay
 * and its spinning after the call slows what follows. fg_blas_bind(path)
 * finds OpenBLAS's thread setting among the libraries used by the loaded
 * shared object at path (1 when found). Each product goes between
 * fg_blas_begin(small) (1 when it took effect: call fg_blas_end(small)
 * after the product) and fg_blas_end: small ones run on one thread, the
 * others at the count set before, and the two kinds take turns. */
int fg_blas_bind(const char *loaded);
int fg_blas_begin(int small);
void fg_blas_end(int small);

/* LayerNormalization's backward takes its column sums over this many fixed
 * shares of the rows: its work buffer holds 2 F FG_LN_PARTS doubles. */
#define FG_LN_PARTS 8

/* 1 when the activation's derivative needs the pre-activation z, not just y. */
int fg_activation_needs_pre(int act);

#define FG_DECLARE(T, S)                                                       \
    int fg_bias_act_forward##S(T *out, T *pre, const T *inp, const T *bias,    \
                               ptrdiff_t B, ptrdiff_t O, int act, double alpha,\
                               fg_act_stats *stats);                           \
    int fg_act_backward##S(T *dpre, T *dbias, const T *dout, const T *out,     \
                           const T *pre, ptrdiff_t B, ptrdiff_t O, int act,    \
                           double alpha);                                      \
    int fg_loss_forward_backward##S(double *loss, T *rows, T *dpred, T *prob,  \
                                    const T *pred, const T *target,            \
                                    const int64_t *labels, const T *weights,   \
                                    ptrdiff_t B, ptrdiff_t O, int kind,        \
                                    int from_logits, const fg_loss_params *lp); \
    double fg_sum_squares##S(const T *x, ptrdiff_t N);                         \
    int fg_any_abs_above##S(const T *x, ptrdiff_t N, double limit);            \
    ptrdiff_t fg_first_nonfinite_row##S(const T *x, ptrdiff_t B, ptrdiff_t F);  \
    void fg_grad_norms##S(double *sumsq, double *penalty, int64_t *first_bad,   \
                         T *grad,                                              \
                         const T *param, const T *acc, double acc_steps,       \
                         const fg_tensors *tt);                                \
    int fg_optimizer_step##S(int64_t *first_overflow, T *param, T *m, T *v,    \
                             T *vmax, T *ema, T *acc, const T *grad,           \
                             const fg_tensors *tt, const fg_opt_config *c);    \
    void fg_batchnorm_forward##S(T *out, double *mean, double *rstd,            \
                                T *moving_mean, T *moving_var, const T *inp,    \
                                const T *gamma, const T *beta, ptrdiff_t B,     \
                                ptrdiff_t F, double epsilon, double momentum,   \
                                int training);                                  \
    void fg_batchnorm_backward##S(T *dinp, T *dgamma, T *dbeta, const T *dout,  \
                                 const T *inp, const double *mean,              \
                                 const double *rstd, const T *gamma,            \
                                 ptrdiff_t B, ptrdiff_t F);                     \
    void fg_dropout_forward##S(T *out, const T *inp, ptrdiff_t N, double rate,  \
                               uint64_t seed, uint64_t offset);                \
    void fg_gaussian_noise##S(T *out, const T *inp, ptrdiff_t N, double stddev, \
                              int multiply, uint64_t seed, uint64_t offset);   \
    void fg_alpha_dropout##S(T *out, const T *inp, ptrdiff_t N, double rate,    \
                             double a, double b_keep, double b_drop,           \
                             uint64_t seed, uint64_t offset);                  \
    void fg_affine##S(T *out, const T *inp, const T *shift, const T *scale,     \
                      ptrdiff_t B, ptrdiff_t F, int divide);                 \
    void fg_layernorm_forward##S(T *out, double *mean, double *rstd,            \
                                const T *inp, const T *gamma, const T *beta,    \
                                ptrdiff_t B, ptrdiff_t F, double epsilon);      \
    void fg_layernorm_backward##S(T *dinp, T *dgamma, T *dbeta, double *work,   \
                                 const T *dout, const T *inp,                   \
                                 const double *mean, const double *rstd,        \
                                 const T *gamma, ptrdiff_t B, ptrdiff_t F);     \
    void fg_relu_forward##S(T *out, const T *inp, ptrdiff_t N,                  \
                            double negative_slope, double threshold,            \
                            double max_value);                                  \
    void fg_relu_backward##S(T *dinp, const T *dout, const T *inp, ptrdiff_t N, \
                             double negative_slope, double threshold,           \
                             double max_value);                                 \
    void fg_prelu_forward##S(T *out, const T *inp, const T *alpha, ptrdiff_t B, \
                             ptrdiff_t F);                                      \
    void fg_prelu_backward##S(T *dinp, T *dalpha, const T *dout, const T *inp,  \
                              const T *alpha, ptrdiff_t B, ptrdiff_t F);

FG_DECLARE(float, _f32)
FG_DECLARE(double, _f64)
#undef FG_DECLARE

#endif
