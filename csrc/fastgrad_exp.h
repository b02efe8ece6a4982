/* Exponential template, included by fastgrad.c once per floating type.
 * Before inclusion: ET is the type, E(name) appends the suffix, EU the
 * unsigned integer of ET's width, E_MANT its mantissa bits, E_BIAS its
 * exponent bias, E_MAGIC 1.5 * 2^E_MANT, E_LOG2E 1 / ln 2 and
 * E_LN2_HI + E_LN2_LO ln 2 (the high part with trailing zero bits),
 * E_LO, E_HI the bounds outside which e^x is 0 or inf, E_EXPM1_LO the
 * argument below which e^x - 1 rounds to -1, and E_SELECT the type's
 * branch-free select (all undefined at the end); and the functions
 * E(fg_exp_poly)(r) = e^r and E(fg_expm1_poly)(r) = e^r - 1 for
 * |r| <= 0.36, truncated below half an ulp. The includer writes the
 * literals in ET: a float constant rounded through double could differ
 * from the float literal in its last bit.
 *
 * e^x in arithmetic only, so that the loops calling it vectorize (a libm
 * call would not) and every instruction set rounds alike. x = n ln2 + r
 * with |r| <= ln2/2 (Cody-Waite: n ln2_hi is exact), e^r by its polynomial,
 * then times 2^n as 2^n1 2^n2 with n1 + n2 = n, each built in the exponent
 * bits: p 2^n1 is exact, and the second factor rounds once, to the right
 * subnormal where the result is one, or to inf past the range. It is within
 * about an ulp for x in [E_LO, E_HI] and NaN for NaN; outside, its value is
 * meaningless (2^n wraps) and the callers replace it by the limit, 0 below
 * E_LO and inf above E_HI, selected on x. Clamping x first would cost more:
 * GCC keeps a NaN-safe clamp as compares and masks (not max/min
 * instructions) and then selects the clamped ends' results anyway. */
static inline ET E(fg_exp_core)(ET x)
{
    ET t = x * E_LOG2E + E_MAGIC;                  /* round(x / ln2) in its low bits */
    ET n = t - E_MAGIC;
    ET r = (x - n * E_LN2_HI) - n * E_LN2_LO;
    ET p = E(fg_exp_poly)(r);
    /* n1 = floor(n / 2) and n2 = n - n1, both within the exponent range,
     * built from t's bits, those of magic + n. magic's bits all shift out
     * of N = n 2^(E_MANT - 1) (wrapping arithmetic); h = N's lowest bit is
     * set when n is odd, and N - h = n1 2^E_MANT, N + h = n2 2^E_MANT. One
     * shift and no arithmetic shift (vectors have no 64-bit one before
     * AVX-512). p 2^n1 is exact whichever way n is split. */
    union { ET f; EU i; } ut = {.f = t}, u1, u2;
    EU N = ut.i << (E_MANT - 1);
    EU h = N & ((EU)1 << (E_MANT - 1));
    u1.i = (N - h) + ((EU)E_BIAS << E_MANT);       /* 2^n1 */
    u2.i = (N + h) + ((EU)E_BIAS << E_MANT);       /* 2^n2 */
    return p * u1.f * u2.f;
}

/* e^x for x <= 0 (or NaN) */
static inline ET E(fg_exp_nonpos)(ET x)
{
    ET y = E(fg_exp_core)(x);
    return x < E_LO ? (ET)0 : y;
}

/* e^x for any x */
static inline ET E(fg_exp)(ET x)
{
    ET y = E(fg_exp_core)(x);
    y = x < E_LO ? (ET)0 : y;
    return x > E_HI ? (ET)INFINITY : y;
}

/* e^x - 1 for x <= 0 (or NaN): the polynomial where e^x - 1 would
 * cancel (x > -0.35), e^x - 1 below, where the subtraction amplifies the
 * error of e^x at most 2.4-fold. */
static inline ET E(fg_expm1_nonpos)(ET x)
{
    return E_SELECT(x > (ET)-0.35, E(fg_expm1_poly)(x), E(fg_exp_nonpos)(x) - (ET)1);
}

/* e^x - 1 for x <= 0 (or NaN) in one range reduction, for tanh: with
 * x = n ln2 + r as in fg_exp_core, e^x - 1 = 2^n (e^r - 1) + (2^n - 1),
 * where e^r - 1 is the polynomial of fg_expm1_nonpos, 2^n - 1 is exact
 * and 2^n (e^r - 1) too: the sum rounds once, without the cancellation of
 * e^x - 1 (n = 0 leaves the polynomial, exact digits down to the
 * subnormals). Below E_EXPM1_LO the result is -1 in the type, and it is
 * selected: there 2^n would leave the normal range. NaN stays NaN.
 * Error: about an ulp; one polynomial where fg_expm1_nonpos takes two. */
static inline ET E(fg_expm1_reduced)(ET x)
{
    ET t = x * E_LOG2E + E_MAGIC;                  /* round(x / ln2) in its low bits */
    ET n = t - E_MAGIC;
    ET r = (x - n * E_LN2_HI) - n * E_LN2_LO;
    union { ET f; EU i; } u = {.f = t};
    u.i = (u.i + E_BIAS) << E_MANT;                /* 2^n */
    ET y = u.f * E(fg_expm1_poly)(r) + (u.f - (ET)1);
    return x < E_EXPM1_LO ? (ET)-1 : y;
}

#undef ET
#undef E
#undef EU
#undef E_MANT
#undef E_BIAS
#undef E_MAGIC
#undef E_LOG2E
#undef E_LN2_HI
#undef E_LN2_LO
#undef E_LO
#undef E_HI
#undef E_EXPM1_LO
#undef E_SELECT
