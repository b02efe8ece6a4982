# Declarations of csrc/fastgrad.h, mirrored for Cython.
from libc.stdint cimport int64_t, uint64_t
from libc.stddef cimport ptrdiff_t

cdef extern from "fastgrad.h" nogil:
    # every code, by name, as fastgrad.h declares it
    enum fg_status:
        FG_OK, FG_EACTIVATION, FG_ELOSS, FG_ELABEL, FG_EOPTIMIZER, FG_ENEEDS_PRE
    enum fg_activation:
        FG_LINEAR, FG_RELU, FG_LEAKY_RELU, FG_ELU, FG_SELU, FG_GELU, FG_SILU,
        FG_SIGMOID, FG_TANH, FG_SOFTMAX, FG_SOFTPLUS, FG_SOFTSIGN, FG_RELU6,
        FG_HARD_SIGMOID, FG_HARD_SILU, FG_MISH, FG_EXPONENTIAL, FG_LOG_SOFTMAX,
        FG_N_ACTIVATIONS
    enum fg_loss:
        FG_MSE, FG_MAE, FG_HUBER, FG_BINARY_CROSSENTROPY, FG_CATEGORICAL_CROSSENTROPY,
        FG_SPARSE_CATEGORICAL_CROSSENTROPY, FG_LOG_COSH, FG_KL_DIVERGENCE, FG_POISSON,
        FG_HINGE, FG_SQUARED_HINGE, FG_CATEGORICAL_HINGE, FG_MAPE, FG_MSLE,
        FG_BINARY_FOCAL_CROSSENTROPY, FG_CATEGORICAL_FOCAL_CROSSENTROPY,
        FG_COSINE_SIMILARITY, FG_N_LOSSES
    enum fg_optimizer:
        FG_SGD, FG_RMSPROP, FG_ADAM, FG_ADAGRAD, FG_NADAM, FG_ADAMAX, FG_ADADELTA,
        FG_LION, FG_N_OPTIMIZERS
    enum fg_constraint:
        FG_NO_CONSTRAINT, FG_MAX_NORM, FG_NON_NEG, FG_CLIP_VALUE, FG_N_CONSTRAINTS
    int fg_activation_needs_pre(int act)
    enum: FG_LN_PARTS
    void fg_set_threads(int n) nogil
    int fg_get_threads() nogil
    ctypedef void (*fg_range_fn)(void *ctx, ptrdiff_t lo, ptrdiff_t hi) noexcept nogil
    void fg_parallel_for(fg_range_fn fn, void *ctx, ptrdiff_t n, ptrdiff_t chunk) nogil
    int fg_blas_bind(const char *loaded)
    int fg_blas_begin(int small) nogil
    void fg_blas_end(int small) nogil

    ctypedef struct fg_loss_params:
        double delta, alpha, gamma
        int class_balancing

    ctypedef struct fg_act_stats:
        unsigned char *alive
        int64_t saturated

    int fg_bias_act_forward_f32(float *out, float *pre, const float *inp, const float *bias,
                                Py_ssize_t B, Py_ssize_t O, int act, double alpha,
                                fg_act_stats *stats)
    int fg_bias_act_forward_f64(double *out, double *pre, const double *inp, const double *bias,
                                Py_ssize_t B, Py_ssize_t O, int act, double alpha,
                                fg_act_stats *stats)
    int fg_act_backward_f32(float *dpre, float *dbias, const float *dout,
                            const float *out, const float *pre, Py_ssize_t B,
                            Py_ssize_t O, int act, double alpha)
    int fg_act_backward_f64(double *dpre, double *dbias, const double *dout,
                            const double *out, const double *pre, Py_ssize_t B,
                            Py_ssize_t O, int act, double alpha)
    int fg_loss_forward_backward_f32(double *loss, float *rows, float *dpred, float *prob,
                                     const float *pred, const float *target,
                                     const int64_t *labels, const float *weights, Py_ssize_t B,
                                     Py_ssize_t O, int kind, int from_logits,
                                     const fg_loss_params *lp)
    int fg_loss_forward_backward_f64(double *loss, double *rows, double *dpred, double *prob,
                                     const double *pred, const double *target,
                                     const int64_t *labels, const double *weights, Py_ssize_t B,
                                     Py_ssize_t O, int kind, int from_logits,
                                     const fg_loss_params *lp)
    Py_ssize_t fg_first_nonfinite_row_f32(const float *x, Py_ssize_t B, Py_ssize_t F)
    Py_ssize_t fg_first_nonfinite_row_f64(const double *x, Py_ssize_t B, Py_ssize_t F)
    double fg_sum_squares_f32(const float *x, Py_ssize_t N)
    double fg_sum_squares_f64(const double *x, Py_ssize_t N)
    int fg_any_abs_above_f32(const float *x, Py_ssize_t N, double limit)
    int fg_any_abs_above_f64(const double *x, Py_ssize_t N, double limit)

    ctypedef struct fg_opt_config:
        int kind
        double lr, momentum, rho, beta_1, beta_2, epsilon, weight_decay
        double clipvalue
        int nesterov, centered, amsgrad
        int64_t step
        double u_product, ema_momentum
        int ema_overwrite, accumulate_only

    ctypedef struct fg_tensors:
        const int64_t *offset
        const double *l1
        const double *l2
        const double *scale
        const int *constraint
        const double *cvalue
        const int64_t *cols
        const unsigned char *frozen
        double *upd_sumsq
        double *w_sumsq
        Py_ssize_t n_tensors

    void fg_grad_norms_f32(double *sumsq, double *penalty, int64_t *first_bad, float *grad,
                          const float *param, const float *acc, double acc_steps,
                          const fg_tensors *tt)
    void fg_grad_norms_f64(double *sumsq, double *penalty, int64_t *first_bad, double *grad,
                          const double *param, const double *acc, double acc_steps,
                          const fg_tensors *tt)
    int fg_optimizer_step_f32(int64_t *first_overflow, float *param, float *m, float *v, float *vmax,
                              float *ema, float *acc, const float *grad, const fg_tensors *tt,
                              const fg_opt_config *c)
    int fg_optimizer_step_f64(int64_t *first_overflow, double *param, double *m, double *v, double *vmax,
                              double *ema, double *acc, const double *grad, const fg_tensors *tt,
                              const fg_opt_config *c)

    void fg_batchnorm_forward_f32(float *out, double *mean, double *rstd,
                                 float *moving_mean, float *moving_var, const float *inp,
                                 const float *gamma, const float *beta, Py_ssize_t B,
                                 Py_ssize_t F, double epsilon, double momentum, int training)
    void fg_batchnorm_forward_f64(double *out, double *mean, double *rstd,
                                 double *moving_mean, double *moving_var, const double *inp,
                                 const double *gamma, const double *beta, Py_ssize_t B,
                                 Py_ssize_t F, double epsilon, double momentum, int training)
    void fg_batchnorm_backward_f32(float *dinp, float *dgamma, float *dbeta, const float *dout,
                                  const float *inp, const double *mean, const double *rstd,
                                  const float *gamma, Py_ssize_t B, Py_ssize_t F)
    void fg_batchnorm_backward_f64(double *dinp, double *dgamma, double *dbeta, const double *dout,
                                  const double *inp, const double *mean, const double *rstd,
                                  const double *gamma, Py_ssize_t B, Py_ssize_t F)
    void fg_dropout_forward_f32(float *out, const float *inp, Py_ssize_t N, double rate,
                                uint64_t seed, uint64_t offset)
    void fg_dropout_forward_f64(double *out, const double *inp, Py_ssize_t N, double rate,
                                uint64_t seed, uint64_t offset)
    void fg_gaussian_noise_f32(float *out, const float *inp, Py_ssize_t N, double stddev,
                               int multiply, uint64_t seed, uint64_t offset)
    void fg_gaussian_noise_f64(double *out, const double *inp, Py_ssize_t N, double stddev,
                               int multiply, uint64_t seed, uint64_t offset)
    void fg_alpha_dropout_f32(float *out, const float *inp, Py_ssize_t N, double rate, double a,
                              double b_keep, double b_drop, uint64_t seed, uint64_t offset)
    void fg_alpha_dropout_f64(double *out, const double *inp, Py_ssize_t N, double rate, double a,
                              double b_keep, double b_drop, uint64_t seed, uint64_t offset)
    void fg_affine_f32(float *out, const float *inp, const float *shift, const float *scale,
                       Py_ssize_t B, Py_ssize_t F, int divide)
    void fg_affine_f64(double *out, const double *inp, const double *shift, const double *scale,
                       Py_ssize_t B, Py_ssize_t F, int divide)
    void fg_layernorm_forward_f32(float *out, double *mean, double *rstd, const float *inp,
                                  const float *gamma, const float *beta, Py_ssize_t B,
                                  Py_ssize_t F, double epsilon)
    void fg_layernorm_forward_f64(double *out, double *mean, double *rstd, const double *inp,
                                  const double *gamma, const double *beta, Py_ssize_t B,
                                  Py_ssize_t F, double epsilon)
    void fg_layernorm_backward_f32(float *dinp, float *dgamma, float *dbeta, double *work,
                                   const float *dout, const float *inp, const double *mean,
                                   const double *rstd, const float *gamma, Py_ssize_t B,
                                   Py_ssize_t F)
    void fg_layernorm_backward_f64(double *dinp, double *dgamma, double *dbeta, double *work,
                                   const double *dout, const double *inp, const double *mean,
                                   const double *rstd, const double *gamma, Py_ssize_t B,
                                   Py_ssize_t F)
    void fg_relu_forward_f32(float *out, const float *inp, Py_ssize_t N, double negative_slope,
                             double threshold, double max_value)
    void fg_relu_forward_f64(double *out, const double *inp, Py_ssize_t N, double negative_slope,
                             double threshold, double max_value)
    void fg_relu_backward_f32(float *dinp, const float *dout, const float *inp, Py_ssize_t N,
                              double negative_slope, double threshold, double max_value)
    void fg_relu_backward_f64(double *dinp, const double *dout, const double *inp, Py_ssize_t N,
                              double negative_slope, double threshold, double max_value)
    void fg_prelu_forward_f32(float *out, const float *inp, const float *alpha, Py_ssize_t B,
                              Py_ssize_t F)
    void fg_prelu_forward_f64(double *out, const double *inp, const double *alpha, Py_ssize_t B,
                              Py_ssize_t F)
    void fg_prelu_backward_f32(float *dinp, float *dalpha, const float *dout, const float *inp,
                               const float *alpha, Py_ssize_t B, Py_ssize_t F)
    void fg_prelu_backward_f64(double *dinp, double *dalpha, const double *dout,
                               const double *inp, const double *alpha, Py_ssize_t B,
                               Py_ssize_t F)
