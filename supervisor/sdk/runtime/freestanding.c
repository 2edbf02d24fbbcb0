/* freestanding.c - what musl gives the runtime, for guests built without a C
 * library (the gcc fallback of `supervisor build`): the string functions a
 * compiler may emit calls to (strlen and memchr are strings.c's), 64-bit
 * division, and __libc_start_main, which runs main(argc, argv) and powers off
 * with its return value.  No stdio, no malloc: a
 * freestanding guest talks to the Host through lguest.h. */
#include <lguest.h>

#include <stdint.h>
#include <string.h>

void *memcpy(void *restrict dst, const void *restrict src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--) *d++ = *s++;
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d < s) {
        while (n--) *d++ = *s++;
    } else {
        while (n--) d[n] = s[n];
    }
    return dst;
}

void *memset(void *dst, int c, size_t n)
{
    unsigned char *d = dst;
    while (n--) *d++ = (unsigned char)c;
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y) return *x - *y;
    return 0;
}

/* 64-bit division, which a 32-bit compiler calls libgcc for (the runtime's clocks
 * need it; gcc-multilib's 32-bit libgcc may be missing).  Shift and subtract;
 * dividing by zero raises the divide error a hardware div would. */
static int clz64(uint64_t x)
{
    uint32_t hi = (uint32_t)(x >> 32);
    return hi ? __builtin_clz(hi) : 32 + __builtin_clz((uint32_t)x);
}

uint64_t __udivmoddi4(uint64_t n, uint64_t d, uint64_t *rem)
{
    uint64_t q = 0;
    if (d == 0) {
        volatile uint32_t zero = 0;
        return 1u / zero;
    }
    if (n >= d) {
        int shift = clz64(d) - clz64(n);
        d <<= shift;
        for (; shift >= 0; shift--) {
            q <<= 1;
            if (n >= d) {
                n -= d;
                q |= 1;
            }
            d >>= 1;
        }
    }
    if (rem) *rem = n;
    return q;
}

uint64_t __udivdi3(uint64_t n, uint64_t d) { return __udivmoddi4(n, d, 0); }

uint64_t __umoddi3(uint64_t n, uint64_t d)
{
    uint64_t r;
    __udivmoddi4(n, d, &r);
    return r;
}

int64_t __divmoddi4(int64_t n, int64_t d, int64_t *rem)
{
    uint64_t un = n < 0 ? -(uint64_t)n : (uint64_t)n;
    uint64_t ud = d < 0 ? -(uint64_t)d : (uint64_t)d;
    uint64_t ur;
    uint64_t uq = __udivmoddi4(un, ud, &ur);
    if (rem) *rem = n < 0 ? -(int64_t)ur : (int64_t)ur;
    return (n < 0) != (d < 0) ? -(int64_t)uq : (int64_t)uq;
}

int64_t __divdi3(int64_t n, int64_t d) { return __divmoddi4(n, d, 0); }

int64_t __moddi3(int64_t n, int64_t d)
{
    int64_t r;
    __divmoddi4(n, d, &r);
    return r;
}

int __libc_start_main(int (*main)(), int argc, char **argv, void (*init)(void),
                      void (*fini)(void), void (*ldso)(void))
{
    (void)init, (void)fini, (void)ldso;
    lguest_poweroff(main(argc, argv, argv + argc + 1));
    return 0;
}
