/* threads.c - POSIX threads: a work queue.  The main thread queues the
 * numbers 1..N; `threads=T` workers take them from the queue (a mutex and two
 * condition variables), count the primes among them into their own
 * _Thread_local tally, and return it through pthread_join.  Threads run on
 * the guest's CPUs; more threads than CPUs share them.
 *
 *   python -m supervisor run guests/c/threads.elf --cpus 2 --cmdline "threads=4 n=20000"
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QUEUE 16

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t not_empty = PTHREAD_COND_INITIALIZER;
static pthread_cond_t not_full = PTHREAD_COND_INITIALIZER;
static long queue[QUEUE];
static int head, count, closed;
static _Thread_local long primes; /* each worker's own tally */

static int is_prime(long n)
{
    if (n < 2) return 0;
    for (long d = 2; d * d <= n; d++)
        if (n % d == 0) return 0;
    return 1;
}

static void *worker(void *arg)
{
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&lock);
        while (!count && !closed) pthread_cond_wait(&not_empty, &lock);
        if (!count) { /* closed and drained */
            pthread_mutex_unlock(&lock);
            return (void *)primes;
        }
        long n = queue[head];
        head = (head + 1) % QUEUE, count--;
        pthread_cond_signal(&not_full);
        pthread_mutex_unlock(&lock);
        primes += is_prime(n);
    }
}

int main(int argc, char **argv)
{
    int threads = 4;
    long n = 20000;
    for (int i = 1; i < argc; i++) {
        if (!strncmp(argv[i], "threads=", 8)) threads = atoi(argv[i] + 8);
        if (!strncmp(argv[i], "n=", 2)) n = atol(argv[i] + 2);
    }
    if (threads < 1 || threads > 64) threads = 4;
    pthread_t t[64];
    for (int i = 0; i < threads; i++) {
        int err = pthread_create(&t[i], 0, worker, 0);
        if (err) {
            printf("pthread_create: %s\n", strerror(err));
            return 1;
        }
    }
    for (long k = 1; k <= n; k++) {
        pthread_mutex_lock(&lock);
        while (count == QUEUE) pthread_cond_wait(&not_full, &lock);
        queue[(head + count) % QUEUE] = k, count++;
        pthread_cond_signal(&not_empty);
        pthread_mutex_unlock(&lock);
    }
    pthread_mutex_lock(&lock);
    closed = 1;
    pthread_cond_broadcast(&not_empty);
    pthread_mutex_unlock(&lock);
    long total = 0;
    for (int i = 0; i < threads; i++) {
        void *r;
        pthread_join(t[i], &r);
        total += (long)r;
    }
    printf("%d threads: %ld primes up to %ld\n", threads, total, n);
    return 0;
}
