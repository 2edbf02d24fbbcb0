/* fptable.c - libm and printf over ordinary and special doubles (and floats), one line per
 * case: the function, its arguments and result as bit patterns, and the result
 * as printf("%.17g") prints it.  Its output must be the same bytes wherever
 * double arithmetic is exact (IEEE 754 double precision, round to nearest). */
#include <fenv.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static uint64_t bits(double x)
{
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static void show(const char *name, double a, double b, double r)
{
    printf("%-9s %016llx %016llx -> %016llx %.17g\n", name, (unsigned long long)bits(a),
           (unsigned long long)bits(b), (unsigned long long)bits(r), r);
}

/* Functions of one double, and of one float (their results widen to double exactly). */
static const struct {
    const char *name;
    double (*f)(double);
} unary[] = {
    {"exp", exp},     {"log", log},     {"sqrt", sqrt},   {"sin", sin},       {"cos", cos},
    {"tan", tan},     {"asin", asin},   {"acos", acos},   {"atan", atan},     {"sinh", sinh},
    {"cosh", cosh},   {"tanh", tanh},   {"asinh", asinh}, {"acosh", acosh},   {"atanh", atanh},
    {"exp2", exp2},   {"expm1", expm1}, {"log2", log2},   {"log10", log10},   {"log1p", log1p},
    {"cbrt", cbrt},   {"erf", erf},     {"erfc", erfc},   {"lgamma", lgamma}, {"tgamma", tgamma},
};
static const struct {
    const char *name;
    float (*f)(float);
} unaryf[] = {
    {"sinf", sinf},   {"cosf", cosf},   {"tanf", tanf},     {"asinf", asinf}, {"acosf", acosf},
    {"atanf", atanf}, {"expf", expf},   {"logf", logf},     {"exp2f", exp2f}, {"log2f", log2f},
    {"log10f", log10f}, {"log1pf", log1pf}, {"expm1f", expm1f}, {"cbrtf", cbrtf},
    {"sinhf", sinhf}, {"tanhf", tanhf}, {"sqrtf", sqrtf},
};

int main(void)
{
    volatile double values[] = {
        0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 3.5, -3.5, 0.49999999999999994,
        4503599627370495.5, 4503599627370496.0, -4503599627370497.0, 9007199254740993.0,
        1e300, -1e300, 1e-300, 4.9406564584124654e-324, -2.2250738585072009e-308,
        2.2250738585072014e-308, 0.1, 1.0 / 3.0, 2.718281828459045, 3.141592653589793, 100.0,
        -123.456, 709.78, -745.2, 1e22, INFINITY, -INFINITY, NAN,
    };
    volatile double seconds[] = {0.5, -2.0, 3.0, 0.1, 1e-3, INFINITY, NAN, 7.25};
    unsigned n = sizeof values / sizeof values[0], m = sizeof seconds / sizeof seconds[0];
    for (unsigned i = 0; i < n; i++) {
        double x = values[i], ip;
        show("floor", x, 0, floor(x));
        show("ceil", x, 0, ceil(x));
        show("trunc", x, 0, trunc(x));
        show("round", x, 0, round(x));
        show("rint", x, 0, rint(x));
        show("nearbyint", x, 0, nearbyint(x));
        /* lrint where a 32-bit long holds the result, llrint where a 64-bit one does
         * (long is 64 bits on x86-64); beyond both, lrint's LONG_MIN of either width. */
        double mag = fabs(x);
        long long ll = mag < 2147483647.0 ? (long long)lrint(x)
                       : mag < 9.2e18     ? llrint(x)
                       : lrint(x) == LONG_MIN ? 0
                                              : 1;
        printf("lrint     %016llx -> %lld%s\n", (unsigned long long)bits(x), ll,
               mag < 9.2e18 ? "" : " (LONG_MIN: 0)");
        double f = modf(x, &ip);
        show("modf", x, ip, f);
        for (unsigned k = 0; k < sizeof unary / sizeof unary[0]; k++)
            show(unary[k].name, x, 0, unary[k].f(x));
        for (unsigned k = 0; k < sizeof unaryf / sizeof unaryf[0]; k++)
            show(unaryf[k].name, x, 0, unaryf[k].f((float)x));
        show("mul3", x, 3, x * 3.0);
        show("div7", x, 7, x / 7.0);
        for (unsigned j = 0; j < m; j++) {
            double y = seconds[j];
            show("fmod", x, y, fmod(x, y));
            show("pow", x, y, pow(x, y));
            show("add", x, y, x + y);
            show("fma", x, y, fma(x, y, 1.0));
            show("atan2", x, y, atan2(x, y));
            show("atan2-yx", y, x, atan2(y, x));
            show("hypot", x, y, hypot(x, y));
            show("remainder", x, y, remainder(x, y));
            int q;
            double r = remquo(x, y, &q);
            show("remquo", x, y, r);
            printf("remquo-q  %d\n", q < 0 ? -(-q & 7) : q & 7);
            float xf = (float)x, yf = (float)y;
            show("atan2f", xf, yf, atan2f(xf, yf));
            show("hypotf", xf, yf, hypotf(xf, yf));
            show("powf", xf, yf, powf(xf, yf));
            show("remaindf", xf, yf, remainderf(xf, yf));
            float rf = remquof(xf, yf, &q);
            show("remquof", xf, yf, rf);
            printf("remquof-q %d\n", q < 0 ? -(-q & 7) : q & 7);
        }
        printf("%%g       %g %e %.3f %a\n", x, x, x, x);
    }
    static const int modes[] = {FE_TONEAREST, FE_UPWARD, FE_DOWNWARD, FE_TOWARDZERO};
    for (unsigned i = 0; i < 4; i++) { /* fesetround reaches SSE (musl asks AT_HWCAP) */
        fesetround(modes[i]);
        show("round-div", values[24], 3, values[2] / 3.0);
        show("round-rint", values[9], 0, rint(values[9]));
        show("round-sqrt", 2, 0, sqrt(values[2] * 2));
    }
    fesetround(FE_TONEAREST);
    float third = 1.0f / 3.0f;
    volatile float ff = third;
    printf("float     %.9g %.17g\n", ff, (double)ff * ff);
    long double ld = 1.0L / 3.0L;
    printf("ldouble   %.21Lg\n", ld);
    return 0;
}
