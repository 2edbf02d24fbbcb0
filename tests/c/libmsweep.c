/* libmsweep.c - the libm functions whose musl i386 versions are x87 assembly, and the
 * common ones beside them, each over N arguments (default 4000): special values, then
 * pseudo-random ones in [-1,1], [-16,16], [-1000,1000] and over all finite doubles.
 *
 * One line per function: its name, its type (d double, f float, ld long double), N
 * and a hash of the results' bits (and remquo's quotient bits).  Two builds compute a
 * function bit for bit alike on these arguments when their lines for it are the same.
 *   libmsweep [N] [NAME] [-v]   (NAME: only that function; -v: a line per argument) */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t state;
static uint64_t next(void)
{
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return state;
}

static const double specials[] = {
    0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.1, -0.1, 1e-300, -1e-300, 1e300, -1e300,
    4.9406564584124654e-324, 2.2250738585072014e-308, 0.7071067811865476, 1.5707963267948966,
    3.141592653589793, 6.283185307179586, 1e-8, 1e8, 709.78, -745.2, 1024.0, -1075.0,
    0.9999999999999999, 1.0000000000000002, INFINITY, -INFINITY, NAN,
};
#define NSPECIAL (sizeof specials / sizeof specials[0])

/* The i-th of n arguments. */
static double arg(unsigned i, unsigned n)
{
    if (i < NSPECIAL) return specials[i];
    double u = (double)(next() >> 11) * 0x1p-53 * 2 - 1;
    switch (i * 4 / n) {
    case 0: return u;
    case 1: return u * 16;
    case 2: return u * 1000;
    default: {
        uint64_t b;
        do b = next(); while (((b >> 52) & 0x7ff) == 0x7ff);
        double d;
        memcpy(&d, &b, sizeof d);
        return d;
    }
    }
}

static int verbose;
static uint64_t hash;
static int quo; /* remquo's quotient bits, 0 for the other functions */

static void take(const char *name, const void *p, size_t size, double a, double b)
{
    const unsigned char *c = p;
    for (size_t k = 0; k < size; k++) hash = (hash ^ c[k]) * 0x100000001b3ull;
    hash = (hash ^ (unsigned)quo) * 0x100000001b3ull;
    if (verbose) {
        uint64_t lo = 0;
        unsigned hi = 0;
        memcpy(&lo, c, size < 8 ? size : 8);
        if (size > 8) hi = c[8] | c[9] << 8;
        printf("%s %.17g %.17g -> %04x%016llx %d\n", name, a, b, hi, (unsigned long long)lo, quo);
    }
    quo = 0;
}

/* remquo's quotient: its sign and low 3 bits are what C specifies. */
static int low3(int q) { return q < 0 ? -(-q & 7) : q & 7; }
static double remquo_(double x, double y) { int q; double r = remquo(x, y, &q); quo = low3(q); return r; }
static float remquof_(float x, float y) { int q; float r = remquof(x, y, &q); quo = low3(q); return r; }
static long double remquol_(long double x, long double y) { int q; long double r = remquol(x, y, &q); quo = low3(q); return r; }
/* The exponent arguments of ldexp and scalbn: the second argument mapped to an int. */
static double ldexp_(double x, double y) { return ldexp(x, (int)fmod(y * 1000, 2200)); }
static float ldexpf_(float x, float y) { return ldexpf(x, (int)fmodf(y * 1000, 300)); }
static long double ldexpl_(long double x, long double y) { return ldexpl(x, (int)fmodl(y * 1000, 33000)); }
static double scalbn_(double x, double y) { return scalbn(x, (int)fmod(y * 1000, 2200)); }
static double scalbln_(double x, double y) { return scalbln(x, (long)fmod(y * 1000, 2200)); }
static float scalbnf_(float x, float y) { return scalbnf(x, (int)fmodf(y * 1000, 300)); }
static long double scalbnl_(long double x, long double y) { return scalbnl(x, (int)fmodl(y * 1000, 33000)); }
/* llrint where the result fits (beyond, the result is unspecified). */
static double llrint_(double x) { return fabs(x) < 9e18 ? (double)llrint(x) : 0; }
static float llrintf_(float x) { return fabsf(x) < 9e18f ? (float)llrintf(x) : 0; }
static long double llrintl_(long double x) { return fabsl(x) < 9e18L ? (long double)llrintl(x) : 0; }

enum kind { D1, D2, F1, F2, L1, L2 };
struct fn {
    const char *name;
    enum kind kind;
    void (*f)(void);
};
#define FN(kind, f) {#f, kind, (void (*)(void))f}

static const struct fn fns[] = {
    /* musl i386 assembly (x87) */
    FN(D2, atan2), FN(F2, atan2f), FN(F1, asinf), FN(D2, remquo_), FN(F2, remquof_),
    FN(D2, remainder), FN(F2, remainderf), FN(D2, ldexp_), FN(F2, ldexpf_), FN(D2, scalbn_),
    FN(D2, scalbln_), FN(F2, scalbnf_), FN(D1, llrint_), FN(F1, llrintf_),
    FN(L1, acosl), FN(L1, asinl), FN(L2, atan2l), FN(L1, exp2l), FN(L1, expl), FN(L1, expm1l),
    FN(L1, log10l), FN(L1, log1pl), FN(L1, log2l), FN(L1, logl), FN(L2, remquol_),
    FN(L2, remainderl), FN(L2, ldexpl_), FN(L2, scalbnl_), FN(L1, llrintl_),
    /* the common ones */
    FN(D1, sin), FN(D1, cos), FN(D1, tan), FN(D1, asin), FN(D1, acos), FN(D1, atan),
    FN(D1, sinh), FN(D1, cosh), FN(D1, tanh), FN(D1, asinh), FN(D1, acosh), FN(D1, atanh),
    FN(D1, exp), FN(D1, exp2), FN(D1, expm1), FN(D1, log), FN(D1, log2), FN(D1, log10),
    FN(D1, log1p), FN(D1, cbrt), FN(D1, sqrt), FN(D1, erf), FN(D1, erfc), FN(D1, lgamma),
    FN(D1, tgamma), FN(D2, hypot), FN(D2, pow), FN(D2, fmod),
    FN(F1, sinf), FN(F1, cosf), FN(F1, tanf), FN(F1, acosf), FN(F1, atanf), FN(F1, expf),
    FN(F1, logf), FN(F1, exp2f), FN(F1, log2f), FN(F1, log10f), FN(F1, log1pf),
    FN(F1, expm1f), FN(F1, cbrtf), FN(F1, sinhf), FN(F1, tanhf), FN(F2, hypotf), FN(F2, powf),
    FN(L1, sinl), FN(L1, cosl), FN(L1, tanl), FN(L1, atanl), FN(L1, sqrtl), FN(L1, cbrtl),
    FN(L1, sinhl), FN(L1, coshl), FN(L1, tanhl), FN(L1, erfl), FN(L1, lgammal),
    FN(L1, tgammal), FN(L2, powl), FN(L2, hypotl), FN(L2, fmodl),
};

int main(int argc, char **argv)
{
    unsigned n = 4000;
    const char *only = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-v")) verbose = 1;
        else if (argv[i][0] >= '0' && argv[i][0] <= '9') n = (unsigned)atoi(argv[i]);
        else only = argv[i];
    }
    if (n < NSPECIAL) n = NSPECIAL;
    for (unsigned k = 0; k < sizeof fns / sizeof fns[0]; k++) {
        const struct fn *p = &fns[k];
        if (only && strcmp(only, p->name)) continue;
        state = 0x9e3779b97f4a7c15ull;
        hash = 0xcbf29ce484222325ull;
        for (unsigned i = 0; i < n; i++) {
            /* a: the i-th argument; b: a special value (the first ones), else another
             * random argument of the same range */
            double a = arg(i, n), b = i < NSPECIAL ? specials[(i * 7 + 3) % NSPECIAL] : arg(i, n);
            switch (p->kind) {
            case D1: { double r = ((double (*)(double))p->f)(a); take(p->name, &r, 8, a, 0); break; }
            case D2: { double r = ((double (*)(double, double))p->f)(a, b); take(p->name, &r, 8, a, b); break; }
            case F1: { float r = ((float (*)(float))p->f)((float)a); take(p->name, &r, 4, a, 0); break; }
            case F2: { float r = ((float (*)(float, float))p->f)((float)a, (float)b); take(p->name, &r, 4, a, b); break; }
            case L1: { long double r = ((long double (*)(long double))p->f)(a); take(p->name, &r, 10, a, 0); break; }
            case L2: { long double r = ((long double (*)(long double, long double))p->f)(a, b); take(p->name, &r, 10, a, b); break; }
            }
        }
        static const char *const types[] = {"d", "d", "f", "f", "ld", "ld"};
        if (!verbose) printf("%s %s %u %016llx\n", p->name, types[p->kind], n, (unsigned long long)hash);
    }
    return 0;
}
