/* string.h for freestanding guests (the gcc fallback of `supervisor build`, no C
 * library): the functions a compiler may call by itself, implemented by the
 * runtime (runtime/freestanding.c, runtime/strings.c). */
#ifndef LGUEST_FREESTANDING_STRING_H
#define LGUEST_FREESTANDING_STRING_H
#include <stddef.h>

void *memcpy(void *restrict dst, const void *restrict src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
void *memchr(const void *s, int c, size_t n);

#endif
