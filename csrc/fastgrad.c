/* Instantiates the kernels of fastgrad_impl.h for float and double. */
#include <math.h>
#include "fastgrad.h"

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

/* splitmix64 (Steele, Lea, Flood 2014): state seed + (position + 1) * gamma,
 * then its finalizer. Static inline so the dropout loop has no call in it. */
static inline uint64_t fg_splitmix64(uint64_t seed, uint64_t position)
{
    uint64_t z = seed + (position + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

uint64_t fg_random_u64(uint64_t seed, uint64_t position)
{
    return fg_splitmix64(seed, position);
}

#define T float
#define S(name) name##_f32
#define EXP expf
#define ERF erff
#define TANH tanhf
#define SQRT sqrtf
#define FABS fabsf
#define EXPM1 expm1f
#include "fastgrad_impl.h"
#undef T
#undef S
#undef EXP
#undef ERF
#undef TANH
#undef SQRT
#undef FABS
#undef EXPM1

#define T double
#define S(name) name##_f64
#define EXP exp
#define ERF erf
#define TANH tanh
#define SQRT sqrt
#define FABS fabs
#define EXPM1 expm1
#include "fastgrad_impl.h"
