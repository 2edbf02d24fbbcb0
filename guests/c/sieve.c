/* sieve: a compute guest.  Sieve of Eratosthenes up to N (default 2,000,000),
 * `rounds` times (default 1): prints "sieve n=N rounds=R" before it starts,
 * then the count of primes and a checksum (the sum of the primes modulo
 * 2^32), and powers off with status 0.  Command line: n=N rounds=R.
 * Known answers: n=2000000 -> 148933 primes, checksum 1179908154;
 * n=100000 -> 9592, 454396537.
 * benchmarks/ calls sieve_rounds() directly in a bare Unicorn as the baseline. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((noinline)) unsigned long sieve_rounds(unsigned char *composite, unsigned long n,
                                                     unsigned long rounds, uint32_t *checksum)
{
    unsigned long count = 0;
    for (unsigned long r = 0; r < rounds; r++) {
        memset(composite, 0, n + 1);
        count = 0;
        *checksum = 0;
        for (unsigned long i = 2; i <= n; i++) {
            if (composite[i]) continue;
            count++;
            *checksum += (uint32_t)i;
            if (i <= n / i)
                for (unsigned long j = i * i; j <= n; j += i) composite[j] = 1;
        }
    }
    return count;
}

int main(int argc, char **argv)
{
    unsigned long n = 2000000, rounds = 1;
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "n=", 2) == 0) n = strtoul(argv[i] + 2, NULL, 10);
        else if (strncmp(argv[i], "rounds=", 7) == 0) rounds = strtoul(argv[i] + 7, NULL, 10);
    }
    unsigned char *composite = malloc(n + 1);
    if (!composite) {
        printf("out of memory for n=%lu\n", n);
        return 1;
    }
    printf("sieve n=%lu rounds=%lu\n", n, rounds);
    uint32_t checksum = 0;
    unsigned long count = sieve_rounds(composite, n, rounds, &checksum);
    printf("primes up to %lu: %lu, checksum %lu\n", n, count, (unsigned long)checksum);
    free(composite);
    return 0;
}
