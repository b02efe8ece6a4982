/* Exponential template, included by fastgrad.c once per floating type.
 * Before inclusion: ET is the type, E(name) appends the suffix, EU the
 * unsigned integer of ET's width, E_MANT its mantissa bits, E_BIAS its
 * exponent bias, E_MAGIC 1.5 * 2^E_MANT, E_LOG2E 1 / ln 2 and
 * E_LN2_HI + E_LN2_LO ln 2 (the high part with trailing zero bits),
 * E_LO, E_HI the clamp bounds, E_EXPM1_LO the argument below which e^x - 1
 * rounds to -1, and E_SELECT the type's branch-free select (all undefined
 * at the end); and the functions E(fg_exp_poly)(r) = e^r and
 * E(fg_expm1_poly)(r) = e^r - 1 for |r| <= 0.36, truncated below half an
 * ulp. The includer writes the literals in ET: a float constant rounded
 * through double could differ from the float literal in its last bit.
 *
 * e^x in arithmetic only, so that the loops calling it vectorize (a libm
 * call would not) and every instruction set rounds alike. x = n ln2 + r
 * with |r| <= ln2/2 (Cody-Waite: n ln2_hi is exact), e^r by its polynomial,
 * then times 2^n as 2^n1 2^n2 with n1 + n2 = n, each built in the exponent
 * bits: p 2^n1 is exact, and the second factor rounds once, to the right
 * subnormal where the result is one, or to inf past the range. The callers
 * clamp x (a comparison with a constant: a max or min instruction, not a
 * branch): below E_LO the result is 0, above E_HI inf; NaN stays NaN (the
 * comparisons are false). Error: a few ulp. */
static inline ET E(fg_exp_core)(ET x)
{
    ET t = x * E_LOG2E + E_MAGIC;                  /* round(x / ln2) in its low bits */
    ET n = t - E_MAGIC;
    ET r = (x - n * E_LN2_HI) - n * E_LN2_LO;
    ET p = E(fg_exp_poly)(r);
    /* n1 = floor(n / 2) and n2 = n - n1, both within the exponent range,
     * in integers from t's bits (those of magic + n): n + 2048 is positive,
     * so a logical shift halves it (vectors have no 64-bit arithmetic shift
     * before AVX-512). p 2^n1 is exact whichever way n is split. */
    static const union { ET f; EU i; } magic = {.f = E_MAGIC};
    union { ET f; EU i; } ut = {.f = t}, u1, u2;
    EU k = ut.i - magic.i + (EU)2048;              /* n + 2048 > 0 */
    EU k1 = k >> 1, k2 = k - k1;                   /* n1 + 1024, n2 + 1024 */
    u1.i = (k1 + (E_BIAS - (EU)1024)) << E_MANT;   /* 2^n1 */
    u2.i = (k2 + (E_BIAS - (EU)1024)) << E_MANT;   /* 2^n2 */
    return p * u1.f * u2.f;
}

/* e^x for x <= 0 (or NaN) */
static inline ET E(fg_exp_nonpos)(ET x)
{
    return E(fg_exp_core)(E_LO > x ? E_LO : x);
}

/* e^x for any x */
static inline ET E(fg_exp)(ET x)
{
    x = E_LO > x ? E_LO : x;
    return E(fg_exp_core)(E_HI < x ? E_HI : x);
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
 * subnormals). x is first raised to E_EXPM1_LO, where
 * the result is already -1 in the type, so that 2^n stays normal. NaN stays
 * NaN. Error: about an ulp; one polynomial where fg_expm1_nonpos takes two. */
static inline ET E(fg_expm1_reduced)(ET x)
{
    x = E_EXPM1_LO > x ? E_EXPM1_LO : x;
    ET t = x * E_LOG2E + E_MAGIC;                  /* round(x / ln2) in its low bits */
    ET n = t - E_MAGIC;
    ET r = (x - n * E_LN2_HI) - n * E_LN2_LO;
    union { ET f; EU i; } u = {.f = t};
    u.i = (u.i + E_BIAS) << E_MANT;                /* 2^n */
    return u.f * E(fg_expm1_poly)(r) + (u.f - (ET)1);
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
