/* vclock: prints what the guest's clocks read (tests/test_determinism.py).
 * "real S" (CLOCK_REALTIME seconds), then "mono N" (CLOCK_MONOTONIC ns) before and
 * after each of `sleeps` nanosleeps of one second (default 2), then the first
 * bytes of AT_RANDOM as seen through getauxval. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <time.h>

static unsigned long long mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    int sleeps = argc > 1 ? atoi(argv[1]) : 2;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    printf("real %lld\n", (long long)now.tv_sec);
    printf("mono %llu\n", mono());
    for (int i = 0; i < sleeps; i++) {
        struct timespec second = {1, 0};
        nanosleep(&second, NULL);
        printf("mono %llu\n", mono());
    }
    const unsigned char *r = (const unsigned char *)getauxval(AT_RANDOM);
    printf("random %02x%02x%02x%02x\n", r[0], r[1], r[2], r[3]);
    return 0;
}
