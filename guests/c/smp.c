/* smp.c - several CPUs: every CPU adds LOOPS to one counter with
 * __atomic_fetch_add and LOOPS to another under an lg_spinlock (a plain
 * increment: only the lock makes it exact).  CPU 0 starts the others with
 * lg_start_cpu (all the guest has, or cpus=N from the command line), works
 * too, waits for them, prints the totals and exits 0 when both are exact.
 *
 *   python -m supervisor run guests/c/smp.elf --cpus 4 --cmdline "loops=1000000"
 */
#include <lguest.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned long loops = 1000000;
static unsigned long atomic_counter;
static unsigned long locked_counter;
static lg_spinlock_t lock = LG_SPINLOCK_INIT;
static unsigned done;
static unsigned seen_ids; /* bit n: CPU n ran work() and found lg_cpu_id() == n */

static void work(void *arg)
{
    unsigned expected = (unsigned)(unsigned long)arg;
    if (lg_cpu_id() == expected) __atomic_fetch_or(&seen_ids, 1u << expected, __ATOMIC_RELAXED);
    for (unsigned long i = 0; i < loops; i++) {
        __atomic_fetch_add(&atomic_counter, 1, __ATOMIC_RELAXED);
        lg_spin_lock(&lock);
        locked_counter++;
        lg_spin_unlock(&lock);
    }
    __atomic_fetch_add(&done, 1, __ATOMIC_RELEASE);
}

int main(int argc, char **argv)
{
    unsigned want = LG_MAX_CPUS;
    for (int i = 1; i < argc; i++) {
        if (!strncmp(argv[i], "cpus=", 5)) want = (unsigned)strtoul(argv[i] + 5, 0, 0);
        else if (!strncmp(argv[i], "loops=", 6)) loops = strtoul(argv[i] + 6, 0, 0);
    }
    unsigned cpus = 1;
    while (cpus < want) {
        int n = lg_start_cpu(work, (void *)(unsigned long)cpus);
        if (n < 0) break;
        if ((unsigned)n != cpus) {
            printf("lg_start_cpu returned %d, expected %u\n", n, cpus);
            return 1;
        }
        cpus++;
    }
    work((void *)0);
    while (__atomic_load_n(&done, __ATOMIC_ACQUIRE) != cpus) __builtin_ia32_pause();
    unsigned long want_total = cpus * loops;
    printf("cpus %u, ids %s\n", cpus, seen_ids == (1u << cpus) - 1 ? "distinct" : "WRONG");
    printf("atomic %lu, locked %lu, expected %lu\n", atomic_counter, locked_counter, want_total);
    int ok = atomic_counter == want_total && locked_counter == want_total &&
             seen_ids == (1u << cpus) - 1;
    puts(ok ? "exact" : "NOT EXACT");
    return ok ? 0 : 1;
}
