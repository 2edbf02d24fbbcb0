/* ticker: the C version of ticker.S.  Prints "tick N" every period_ms
 * milliseconds (nanosleep: the clock event and a halt), then "done".
 * Command line: ticks=N period_ms=M (defaults 5 and 10; unknown words ignored). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int main(int argc, char **argv)
{
    unsigned long ticks = 5, period_ms = 10;
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "ticks=", 6) == 0) ticks = strtoul(argv[i] + 6, NULL, 10);
        else if (strncmp(argv[i], "period_ms=", 10) == 0)
            period_ms = strtoul(argv[i] + 10, NULL, 10);
    }
    struct timespec period = {(time_t)(period_ms / 1000), (long)(period_ms % 1000) * 1000000L};
    for (unsigned long t = 1; t <= ticks; t++) {
        nanosleep(&period, NULL);
        printf("tick %lu\n", t);
    }
    printf("done\n");
    return 0;
}
