/* strings.c - strlen and memchr for C guests, 16 bytes a step (SSE2).
 *
 * The C library's versions compare one byte a loop iteration; an emulated CPU
 * pays per basic block, so these compare 16 bytes a block (pcmpeqb, pmovmskb).
 * stdio's fgets and getline look for '\n' with memchr, and most programs call
 * strlen on every string they handle.  They replace the library's (weak)
 * definitions at link time.
 *
 * Guarantees: the results are the C standard's.  strlen reads only aligned
 * 16-byte blocks that hold at least one byte of the string, so it never
 * touches a page the string does not reach; memchr reads only [s, s + n).
 */
#include <stddef.h>
#include <stdint.h>

typedef char v16 __attribute__((vector_size(16)));
typedef char v16u __attribute__((vector_size(16), aligned(1)));

static inline unsigned mask_eq(v16 block, v16 with)
{
    return (unsigned)__builtin_ia32_pmovmskb128((v16)(block == with));
}

size_t strlen(const char *str)
{
    uintptr_t skew = (uintptr_t)str & 15;
    const v16 *p = (const v16 *)(str - skew);
    const v16 zero = {0};
    unsigned m = mask_eq(*p, zero) >> skew;
    if (m) return (size_t)__builtin_ctz(m);
    for (;;) {
        m = mask_eq(*++p, zero);
        if (m) return (size_t)((const char *)p - str) + (size_t)__builtin_ctz(m);
    }
}

void *memchr(const void *src, int c, size_t n)
{
    const char *s = src;
    const char ch = (char)c;
    const v16 want = {ch, ch, ch, ch, ch, ch, ch, ch, ch, ch, ch, ch, ch, ch, ch, ch};
    for (; n >= 16; s += 16, n -= 16) {
        unsigned m = mask_eq(*(const v16u *)s, want);
        if (m) return (void *)(s + __builtin_ctz(m));
    }
    for (; n; s++, n--)
        if (*s == ch) return (void *)s;
    return NULL;
}
