/* sieve: a compute guest.  Sieve of Eratosthenes up to N (default 2,000,000),
 * `rounds` times (default 1); prints the count of primes and a checksum (the
 * sum of the primes modulo 2^32) and powers off with status 0.
 * Command line: n=N rounds=R.  Known answer: n=2000000 -> 148933 primes,
 * checksum 1179908154 (the sum 142913828922 mod 2^32). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    unsigned long count = 0;
    uint32_t checksum = 0;
    for (unsigned long r = 0; r < rounds; r++) {
        memset(composite, 0, n + 1);
        count = 0;
        checksum = 0;
        for (unsigned long i = 2; i <= n; i++) {
            if (composite[i]) continue;
            count++;
            checksum += (uint32_t)i;
            for (unsigned long j = i * i; i <= n / i && j <= n; j += i) composite[j] = 1;
        }
    }
    printf("primes up to %lu: %lu, checksum %lu\n", n, count, (unsigned long)checksum);
    free(composite);
    return 0;
}
