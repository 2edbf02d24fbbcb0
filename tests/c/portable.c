/* An ordinary portable C program: test_sdk.py builds it as a guest and with
 * the host's gcc, runs both with the same arguments and input, and expects
 * the same output and exit status. */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int cmp_long(const void *a, const void *b)
{
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

static double elapsed_ms(struct timespec a, struct timespec b)
{
    return (b.tv_sec - a.tv_sec) * 1e3 + (b.tv_nsec - a.tv_nsec) / 1e6;
}

int main(int argc, char **argv)
{
    printf("argc=%d argv0=%s\n", argc, argv[0]);
    for (int i = 1; i < argc; i++) {
        char *end;
        long v = strtol(argv[i], &end, 0);
        if (*end == '\0')
            printf("arg %d: number %ld (hex %#x)\n", i, v, (unsigned)v);
        else
            printf("arg %d: word \"%s\" of %zu chars\n", i, argv[i], strlen(argv[i]));
    }

    printf("floats: %f %.3f %e %g %10.4f|%-8.2f|\n", 3.14159265, -2.5, 12345.678, 0.0001,
           sqrt(2.0), 1.0 / 3.0);
    char buf[64];
    int n = snprintf(buf, sizeof buf, "%05d|%x|%s|%c|%5.1f", 42, 0xbeef, "str", 'z', 9.75);
    printf("snprintf: %s (%d)\n", buf, n);
    size_t small = argc > 0 ? 8 : 64; /* truncation the compiler cannot predict */
    n = snprintf(buf, small, "truncated %d", 123456);
    printf("snprintf truncated: '%s' wanted %d\n", buf, n);

    /* stdin: numbers are collected, words are upper-cased */
    long *nums = NULL;
    size_t count = 0, cap = 0, lines = 0, words = 0;
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        lines++;
        line[strcspn(line, "\r\n")] = '\0';
        for (char *tok = strtok(line, " \t"); tok; tok = strtok(NULL, " \t")) {
            char *end;
            long v = strtol(tok, &end, 10);
            if (*end == '\0') {
                if (count == cap) {
                    cap = cap ? 2 * cap : 4;
                    nums = realloc(nums, cap * sizeof *nums);
                }
                nums[count++] = v;
            } else {
                for (char *p = tok; *p; p++) *p = (char)toupper((unsigned char)*p);
                printf("word: %s%s\n", tok, isdigit((unsigned char)tok[0]) ? " (digit first)" : "");
                words++;
            }
        }
    }
    qsort(nums, count, sizeof *nums, cmp_long);
    printf("%zu lines, %zu words, %zu numbers sorted:", lines, words, count);
    long sum = 0;
    for (size_t i = 0; i < count; i++) {
        printf(" %ld", nums[i]);
        sum += nums[i];
    }
    printf("\nsum %ld mean %.2f\n", sum, count ? (double)sum / count : 0.0);
    free(nums);

    /* the heap: many blocks, freed in a different order */
    char *blocks[200];
    size_t total = 0;
    for (int i = 0; i < 200; i++) {
        size_t size = (size_t)(i * 37 % 1000 + 1) * (i % 7 == 0 ? 300 : 1);
        blocks[i] = malloc(size);
        memset(blocks[i], i & 0xff, size);
        total += size;
    }
    int ok = 1;
    for (int i = 199; i >= 0; i -= 2) {
        if ((unsigned char)blocks[i][0] != (i & 0xff)) ok = 0;
        free(blocks[i]);
    }
    for (int i = 0; i < 200; i += 2) free(blocks[i]);
    printf("heap: %zu bytes in 200 blocks, contents %s\n", total, ok ? "intact" : "CORRUPT");

    /* time.h */
    struct timespec t0, t1, req = {0, 30 * 1000 * 1000};
    clock_gettime(CLOCK_MONOTONIC, &t0);
    nanosleep(&req, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = elapsed_ms(t0, t1);
    printf("nanosleep 30 ms: %s\n", ms >= 30.0 && ms < 2000.0 ? "ok" : "WRONG");
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    time_t now = time(NULL);
    printf("realtime after 2020: %s, time() agrees: %s\n", rt.tv_sec > 1577836800 ? "yes" : "no",
           (now - rt.tv_sec) <= 1 && (rt.tv_sec - now) <= 1 ? "yes" : "no");
    struct tm tm;
    time_t fixed = 1000000000;
    gmtime_r(&fixed, &tm);
    strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
    printf("gmtime(1e9) = %s\n", buf);
    printf("clock() >= 0: %s\n", clock() >= 0 ? "yes" : "no");

    fputs("done\n", stdout);
    return (int)(count % 256) + 3;
}
