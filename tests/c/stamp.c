/* stamp: for each line of input, prints it with the CLOCK_MONOTONIC time (ns) at
 * which the guest read it (tests/test_determinism.py: record and replay). */
#include <stdio.h>
#include <string.h>
#include <time.h>

int main(void)
{
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        line[strcspn(line, "\n")] = 0;
        printf("%s at %lld\n", line, (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
        fflush(stdout);
    }
    puts("eof");
    return 0;
}
