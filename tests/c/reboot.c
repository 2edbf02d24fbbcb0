/* reboot: prints the virtual time it booted at, then asks for a reboot, for ever
 * (tests/test_determinism_net.py: the Launcher's max_restarts ends it). */
#include <lguest.h>
#include <stdio.h>
#include <time.h>

int main(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    printf("boot at %lld.%09ld\n", (long long)ts.tv_sec, ts.tv_nsec);
    fflush(stdout);
    static const char why[] = "again";
    lguest_hcall(LHCALL_SHUTDOWN, (unsigned long)why, LGUEST_SHUTDOWN_RESTART, 0);
    return 0;
}
