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
#endif
#endif
#ifndef FG_TARGETS
#define FG_TARGETS
#endif

/* Helpers inlined into each clone, so they get its instruction set. */
#if defined(__GNUC__)
#define FG_INLINE static inline __attribute__((always_inline))
#else
#define FG_INLINE static inline
#endif

/* Subnormal numbers flushed to zero (FTZ) and read as zero (DAZ) for the
 * span of an optimizer step, as TensorFlow runs Keras on the CPU. A moment
 * decaying through the subnormal range (Adam's v under a gradient that has
 * gone to zero stays there for thousands of steps) would otherwise cost a
 * microcode assist, about a hundred cycles, per element. MXCSR is per
 * thread and restored on the way out. */
#if defined(__SSE2__)
#include <xmmintrin.h>
static inline unsigned fg_flush_begin(void)
{
    unsigned old = _mm_getcsr();
    _mm_setcsr(old | 0x8040u);   /* FTZ (bit 15) | DAZ (bit 6) */
    return old;
}
static inline void fg_flush_end(unsigned old) { _mm_setcsr(old); }
#else
static inline unsigned fg_flush_begin(void) { return 0; }
static inline void fg_flush_end(unsigned old) { (void)old; }
#endif

int fg_activation_needs_pre(int act)
{
    return act == FG_GELU || act == FG_SILU;
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
 * dropout loop has no call in it. */
FG_INLINE uint64_t fg_splitmix64(uint64_t seed, uint64_t position)
{
    uint64_t z = seed + fg_mul64(position + 1, 0x9E3779B97F4A7C15ULL);
    z = fg_mul64(z ^ (z >> 30), 0xBF58476D1CE4E5B9ULL);
    z = fg_mul64(z ^ (z >> 27), 0x94D049BB133111EBULL);
    return z ^ (z >> 31);
}

/* e^x for x <= 0 (or NaN), in arithmetic only, so that the loops calling
 * it vectorize (a libm call would not) and every instruction set rounds
 * alike. x = n ln2 + r with |r| <= ln2/2 (Cody-Waite: n ln2_hi is exact),
 * e^r by its Taylor series (degree 7 in float, 13 in double: truncation
 * below half an ulp), then times 2^n as 2^n1 2^n2 with n1 + n2 = n, each
 * built in the exponent bits: p 2^n1 is exact, and the second factor
 * rounds once, to the right subnormal where the result is one. Below -104
 * (float) or -746 (double) the result is 0; NaN stays NaN. No branch:
 * the clamp is a mask, the split plain arithmetic. Error: a few ulp. */
static inline float fg_exp_nonpos_f32(float x)
{
    const float magic = 12582912.0f;               /* 1.5 * 2^23 */
    x = fg_select_f32(x < -104.0f, -104.0f, x);
    float t = x * 1.44269504088896341f + magic;    /* round(x / ln2) in its low bits */
    float n = t - magic;
    float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120
              + r * (1.0f / 720 + r * (1.0f / 5040)))))));
    float t1 = n * 0.5f + magic, n1 = t1 - magic;  /* n1, n - n1 >= -75 */
    union { float f; uint32_t i; } u1 = {.f = t1}, u2 = {.f = (n - n1) + magic};
    u1.i = (u1.i + 127u) << 23;                     /* 2^n1 */
    u2.i = (u2.i + 127u) << 23;                     /* 2^(n - n1) */
    return p * u1.f * u2.f;
}

static inline double fg_exp_nonpos_f64(double x)
{
    const double magic = 6755399441055744.0;        /* 1.5 * 2^52 */
    x = fg_select_f64(x < -746.0, -746.0, x);
    double t = x * 1.4426950408889634074 + magic;
    double n = t - magic;
    double r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;                  /* 1/13! */
    static const double inv_fact[13] = {
        1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
        1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
    for (int i = 0; i < 13; i++) p = inv_fact[i] + r * p;
    double t1 = n * 0.5 + magic, n1 = t1 - magic;   /* n1, n - n1 >= -539 */
    union { double f; uint64_t i; } u1 = {.f = t1}, u2 = {.f = (n - n1) + magic};
    u1.i = (u1.i + 1023u) << 52;
    u2.i = (u2.i + 1023u) << 52;
    return p * u1.f * u2.f;
}

/* e^x - 1 for x <= 0 (or NaN): the Taylor series where e^x - 1 would
 * cancel (x > -0.35, truncation below half an ulp), e^x - 1 below, where
 * the subtraction amplifies the error of e^x at most 2.4-fold. */
static inline float fg_expm1_nonpos_f32(float x)
{
    float p = x * (1.0f + x * (0.5f + x * (1.0f / 6 + x * (1.0f / 24 + x * (1.0f / 120
              + x * (1.0f / 720 + x * (1.0f / 5040 + x * (1.0f / 40320))))))));
    return fg_select_f32(x > -0.35f, p, fg_exp_nonpos_f32(x) - 1.0f);
}

static inline double fg_expm1_nonpos_f64(double x)
{
    static const double inv_fact[15] = {
        1.0 / 1307674368000.0, 1.0 / 87178291200.0, 1.0 / 6227020800.0,
        1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
        1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
        1.0 / 6.0, 0.5, 1.0};
    double p = 1.0 / 20922789888000.0;              /* 1/16! */
    for (int i = 0; i < 15; i++) p = inv_fact[i] + x * p;
    return fg_select_f64(x > -0.35, x * p, fg_exp_nonpos_f64(x) - 1.0);
}

/* tanh x = -E / (2 + E) with E = e^(-2|x|) - 1, signed like x (-0 stays -0) */
static inline float fg_tanh_f32(float x)
{
    float e = fg_expm1_nonpos_f32(-2.0f * fabsf(x));
    return copysignf(-e / (2.0f + e), x);
}

static inline double fg_tanh_f64(double x)
{
    double e = fg_expm1_nonpos_f64(-2.0 * fabs(x));
    return copysign(-e / (2.0 + e), x);
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

/* In double, the C library's erfc keeps Phi(z) = erfc(-z / sqrt 2) / 2
 * accurate relative to its size in the left tail too. */
static inline double fg_gelu_f64(double z)
{
    return 0.5 * z * erfc(-z * FG_SQRT1_2);
}

static inline double fg_gelu_grad_f64(double z)
{
    return 0.5 * erfc(-z * FG_SQRT1_2) + z * FG_INV_SQRT_2PI * exp(-0.5 * z * z);
}

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
#include "fastgrad_impl.h"
