/* net.c - sockets, poll and select for C guests, served by the file device's
 * socket requests (supervisor/launcher/sockets.py; docs/abi.md, "Sockets").
 *
 * Guarantees (docs/sdk.md, "Network"):
 *  - sockets and files share one descriptor table (the device's): dup, close
 *    and fcntl are files.c's calls and work on both.  The device keeps a bitmap
 *    of the descriptors that are sockets in this file's sock_map, so read and
 *    write reach a socket without asking first.
 *  - a blocking call that cannot complete gets NET_WAIT from the device and
 *    waits until the device's events counter moves (it raises its irq with
 *    it), then asks again.  Without threads a send or receive is asked with
 *    OP_PARK: the device finishes it itself once it can, before it moves the
 *    counter, and the result in the descriptor is then no longer NET_WAIT.  A
 *    receive after one that waited goes with its halt (notify_and_halt): one
 *    exit where a request answered "wait" and the halt after it were two.  Without threads the CPU halts (costing the Host
 *    nothing); interrupts stay off from the request to the halt, so a change
 *    in between is never missed: its irq is pending and ends the halt at once.
 *    With threads the thread blocks in the scheduler on the counter (a futex
 *    wait on its last value, so a change in between is seen), having released
 *    the device's lock: other threads keep the CPU and the device, and the
 *    irq, on whichever CPU takes it, wakes the waiters (__lguest_net_irq).
 *  - poll and select cover the console (fds 0-2, asked of runtime.c), files
 *    (always ready) and sockets (the device's answer), with a timeout on the
 *    clock event.
 *  - epoll: an epoll instance is a descriptor of the device, holding its
 *    interest list (supervisor/launcher/epoll.py); epoll_wait asks it for the
 *    events ready now and waits as poll does.  The request carries whether
 *    fd 0 is readable (the console is the runtime's) and says back whether the
 *    instance watches fd 0 for input (then the wait is on this CPU, as poll's).
 *  - one CPU at a time: every call holds the file device's lock, except while
 *    a thread waits for the network.
 */
#include <lguest.h>

#include <stdint.h>
#include <string.h>

#define LGUEST_DEVICE_FILES 3
#define EBADF 9
#define EFAULT 14
#define EINVAL 22
#define ENOSYS 38
#define ENOTSOCK 88

enum {
    OP_SOCKET = 22, OP_BIND, OP_LISTEN, OP_ACCEPT, OP_CONNECT, OP_SENDTO, OP_RECVFROM,
    OP_SHUTDOWN, OP_SOCKNAME, OP_SETSOCKOPT, OP_GETSOCKOPT, OP_POLL,
    OP_EPOLL_CREATE = 35, OP_EPOLL_CTL, OP_EPOLL_WAIT,
};
#define EPOLL_CLOEXEC 02000000
#define NET_WAIT (-(1L << 20))
#define OP_PARK (1u << 16)
#define OP_HALTS (1u << 17)
#define MSG_WAITALL 0x100
#define POLLIN 1
#define POLLPRI 2
#define POLLOUT 4
#define POLLERR 8
#define POLLHUP 16
#define POLLNVAL 32

struct files_desc { /* the fields of the file device this file uses */
    uint32_t type, irq, op;
    int32_t fd;
    uint32_t a[7];
    uint32_t result_lo, result_hi, max_io;
    uint32_t sockmap; /* guest: address of sock_map */
    uint32_t events;  /* Launcher: socket state changes so far */
};
_Static_assert(sizeof(struct files_desc) == LGUEST_DESC_SIZE, "files layout");

struct pollfd32 {
    int32_t fd;
    int16_t events, revents;
};
struct iovec32 {
    uint32_t base, len;
};

extern lg_spinlock_t __lguest_files_lock;                  /* files.c */
int __lguest_console_readable(void);                     /* runtime.c */
int lg_thread_active(void);                              /* threads.c */
int lg_thread_wait_word(volatile uint32_t *word, uint32_t val, uint64_t deadline);
void lg_thread_wake_word(volatile uint32_t *word);

static volatile struct files_desc *dev;
static int looked;
static uint8_t sock_map[(65536 + 64) / 8];

static int is_socket(int fd)
{
    return fd >= 3 && fd < (int)(8 * sizeof sock_map) && (sock_map[fd >> 3] >> (fd & 7) & 1);
}

/* The interrupt state __lguest_net_syscall saved when it took the lock; only
 * the lock's holder reads or writes it. */
static uint32_t lock_was;

/* With threads: release the device, block this thread until the events
 * counter leaves `seen` (or `deadline`, monotonic ns; 0: none), take the
 * device again; 1.  Without threads: 0 (the caller halts its CPU). */
static int thread_wait(uint32_t seen, uint64_t deadline)
{
    if (!dev || !lg_thread_active()) return 0;
    lg_spin_unlock_irqrestore(&__lguest_files_lock, lock_was);
    lg_thread_wait_word(&dev->events, seen, deadline);
    uint32_t was = lg_spin_lock_irqsave(&__lguest_files_lock);
    lock_was = was;
    return 1;
}

/* runtime.c's irq dispatch, on any CPU, interrupts off: the device's irq
 * wakes the threads waiting for its events counter. */
void __lguest_net_irq(unsigned irq)
{
    if (dev && irq == dev->irq) lg_thread_wake_word(&dev->events);
}

/* The request in the device's descriptor, then a halt, in one exit: the notify
 * goes through this CPU's hypercall ring, which the Host runs before the halt
 * trapped with it, and the device raises its irq unless it parked the request
 * (OP_HALTS), so the halt ends at once when there is an answer.  This file is the
 * runtime's only user of the ring: ring_at is the Host's next slot. */
static uint8_t ring_at[LG_MAX_CPUS];
static int recv_waited; /* the last receive (without threads) had to wait */

static void notify_and_halt(void)
{
    struct lguest_data *d = lg_cpu_data();
    unsigned cpu = lg_cpu_id();
    unsigned n = ring_at[cpu];
    d->hcalls[n].arg0 = LHCALL_NOTIFY;
    d->hcalls[n].arg1 = (uint32_t)dev;
    d->hcalls[n].arg2 = d->hcalls[n].arg3 = 0;
    __atomic_store_n(&d->hcall_status[n], 0, __ATOMIC_RELEASE); /* queued */
    ring_at[cpu] = (uint8_t)((n + 1) % LHCALL_RING_SIZE);
    lguest_halt();
}

static long call(uint32_t op, int fd, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                 uint32_t a4)
{
    if (!looked) {
        dev = (volatile struct files_desc *)lguest_find_device(LGUEST_DEVICE_FILES, 0);
        looked = 1;
    }
    if (!dev) return -ENOSYS;
    dev->sockmap = (uint32_t)sock_map;
    /* Without threads nobody else makes a request while this one waits: the device
     * may finish it itself (see the top). */
    uint32_t park = (op == OP_SENDTO || op == OP_RECVFROM) && !lg_thread_active() ? OP_PARK : 0;
    /* A receive after one that had to wait likely waits too: halt with the request
     * (on CPU 0, which the device's irq goes to). */
    uint32_t halts = park && op == OP_RECVFROM && recv_waited && !lg_cpu_id() ? OP_HALTS : 0;
    for (;;) {
        uint32_t seen = dev->events;
        dev->op = op | park | halts;
        dev->fd = fd;
        dev->a[0] = a0, dev->a[1] = a1, dev->a[2] = a2, dev->a[3] = a3, dev->a[4] = a4;
        dev->a[5] = dev->a[6] = 0;
        if (halts)
            notify_and_halt();
        else
            lguest_notify((const void *)dev);
        halts = 0;
        long r = (long)(int32_t)dev->result_lo;
        if (op == OP_RECVFROM && park) recv_waited = r == NET_WAIT || dev->events != seen;
        if (r != NET_WAIT) return r;
        if (thread_wait(seen, 0)) continue;
        while (dev->events == seen) lguest_halt(); /* interrupts are off: see the top */
        r = (long)(int32_t)dev->result_lo; /* a parked request the device finished */
        if (r != NET_WAIT) return r;
    }
}

static uint32_t max_io(void)
{
    uint32_t m = dev ? dev->max_io : 0;
    return m ? m : 65536;
}

static long send_all(int fd, const char *buf, uint32_t len, uint32_t flags, uint32_t to,
                     uint32_t tolen)
{
    uint32_t done = 0;
    if (!len) return call(OP_SENDTO, fd, (uint32_t)buf, 0, flags, to, tolen);
    while (done < len) {
        uint32_t n = len - done < max_io() ? len - done : max_io();
        long r = call(OP_SENDTO, fd, (uint32_t)(buf + done), n, flags, to, tolen);
        if (r < 0) return done ? (long)done : r;
        done += (uint32_t)r;
        if (to) break; /* a datagram goes whole or not at all */
    }
    return (long)done;
}

static long recv_some(int fd, char *buf, uint32_t len, uint32_t flags, uint32_t from,
                      uint32_t fromlen)
{
    uint32_t done = 0;
    do {
        uint32_t n = len - done < max_io() ? len - done : max_io();
        long r = call(OP_RECVFROM, fd, (uint32_t)(buf + done), n, flags & ~MSG_WAITALL, from,
                      fromlen);
        if (r < 0) return done ? (long)done : r;
        if (r == 0) break;
        done += (uint32_t)r;
    } while ((flags & MSG_WAITALL) && done < len);
    return (long)done;
}

/* ---- sendmsg and recvmsg (musl's resolver uses them) ---- */
struct msghdr32 {
    uint32_t name, namelen, iov, iovlen, control, controllen;
    int32_t flags;
};
#define MSG_TRUNC 0x20
#define MSG_CTRUNC 0x08
static char bounce[65536];

static long do_sendmsg(int fd, const struct msghdr32 *m, uint32_t flags)
{
    if (!m) return -EFAULT;
    const struct iovec32 *iov = (const struct iovec32 *)m->iov;
    if (m->iovlen > 1024 || (m->iovlen && !iov)) return -EINVAL;
    uint32_t total = 0;
    for (uint32_t i = 0; i < m->iovlen; i++) total += iov[i].len;
    if (m->iovlen == 1 || total <= sizeof bounce) { /* gathered: a datagram goes whole */
        const char *buf = m->iovlen == 1 ? (const char *)iov[0].base : bounce;
        if (m->iovlen != 1)
            for (uint32_t i = 0, at = 0; i < m->iovlen; at += iov[i].len, i++)
                memcpy(bounce + at, (const void *)iov[i].base, iov[i].len);
        return send_all(fd, buf, total, flags, m->name, m->namelen);
    }
    long done = 0;
    for (uint32_t i = 0; i < m->iovlen; i++) {
        long r = send_all(fd, (const char *)iov[i].base, iov[i].len, flags, m->name, m->namelen);
        if (r < 0) return done ? done : r;
        done += r;
        if ((uint32_t)r < iov[i].len) break;
    }
    return done;
}

static long do_recvmsg(int fd, struct msghdr32 *m, uint32_t flags)
{
    if (!m) return -EFAULT;
    struct iovec32 *iov = (struct iovec32 *)m->iov;
    if (m->iovlen > 1024 || (m->iovlen && !iov)) return -EINVAL;
    uint32_t total = 0;
    for (uint32_t i = 0; i < m->iovlen; i++) total += iov[i].len;
    uint32_t namelen = m->namelen;
    uint32_t want = total < sizeof bounce ? total : sizeof bounce;
    char *buf = m->iovlen == 1 ? (char *)iov[0].base : bounce;
    if (m->iovlen == 1) want = total;
    long r = call(OP_RECVFROM, fd, (uint32_t)buf, want, flags | MSG_TRUNC,
                  m->name, m->name ? (uint32_t)&namelen : 0);
    if (r < 0) return r;
    m->namelen = m->name ? namelen : 0;
    m->controllen = 0;
    m->flags = 0;
    uint32_t got = (uint32_t)r;
    if (got > want) { /* a datagram longer than the buffers */
        if (!(flags & MSG_TRUNC)) r = (long)want;
        got = want;
        m->flags |= MSG_TRUNC;
    }
    if (m->iovlen != 1)
        for (uint32_t i = 0, at = 0; i < m->iovlen && at < got; at += iov[i].len, i++)
            memcpy((void *)iov[i].base, bounce + at, got - at < iov[i].len ? got - at : iov[i].len);
    return r;
}

/* ---- poll and select ---- */
static uint64_t now_ns(void) { return lguest_monotonic_ns(); }

/* timeout_ns < 0: no timeout. */
static long do_poll(struct pollfd32 *fds, uint32_t n, int64_t timeout_ns)
{
    if (n > 65536 + 64) return -EINVAL;
    if (n && !fds) return -EFAULT;
    uint64_t deadline = timeout_ns > 0 ? now_ns() + (uint64_t)timeout_ns : 0;
    int any_device = 0, console = 0;
    for (uint32_t i = 0; i < n; i++) {
        any_device |= fds[i].fd >= 3;
        console |= fds[i].fd == 0 && (fds[i].events & POLLIN);
    }
    for (;;) {
        if (!looked) call(OP_POLL, 0, 0, 0, 0, 0, 0);
        uint32_t seen = dev ? dev->events : 0;
        long ready = 0;
        for (uint32_t i = 0; i < n; i++) fds[i].revents = 0;
        if (any_device) {
            ready = call(OP_POLL, 0, (uint32_t)fds, n, 0, 0, 0);
            if (ready < 0) return ready;
        }
        for (uint32_t i = 0; i < n; i++) {
            int fd = fds[i].fd;
            if (fd < 0 || fd > 2) continue;
            int16_t bits = 0;
            if (fd == 0 && (fds[i].events & POLLIN) && __lguest_console_readable()) bits |= POLLIN;
            if (fd > 0) bits |= fds[i].events & POLLOUT;
            fds[i].revents = bits;
            ready += bits != 0;
        }
        if (ready || timeout_ns == 0) return ready;
        if (timeout_ns > 0 && now_ns() >= deadline) return 0;
        /* A thread waits in the scheduler for the network or the timeout;
         * console input is the console irq's news, on CPU 0: a poll on
         * stdin waits on its CPU, as a read of it does. */
        if (!console && thread_wait(seen, timeout_ns > 0 ? deadline : 0)) continue;
        if (timeout_ns > 0) {
            uint64_t t = now_ns();
            if (t >= deadline) return 0;
            uint64_t left = deadline - t;
            lguest_set_clockevent((unsigned long)(left > 0x7fffffffu ? 0x7fffffffu : left));
        }
        if (!dev || dev->events == seen) lguest_halt(); /* any irq: look again */
    }
}

/* timeout_ns < 0: no timeout. */
static long do_epoll_wait(int epfd, void *events, int maxevents, int64_t timeout_ns)
{
    if (maxevents <= 0 || maxevents > 0x7fffffff / 12) return -EINVAL;
    if (!events) return -EFAULT;
    uint64_t deadline = timeout_ns > 0 ? now_ns() + (uint64_t)timeout_ns : 0;
    for (;;) {
        if (!looked) call(OP_POLL, 0, 0, 0, 0, 0, 0);
        uint32_t seen = dev ? dev->events : 0;
        uint32_t console = 0;
        long ready = call(OP_EPOLL_WAIT, epfd, (uint32_t)events, (uint32_t)maxevents,
                          (uint32_t)__lguest_console_readable(), (uint32_t)&console, 0);
        if (ready != 0 || timeout_ns == 0) return ready;
        if (timeout_ns > 0 && now_ns() >= deadline) return 0;
        if (!console && thread_wait(seen, timeout_ns > 0 ? deadline : 0)) continue;
        if (timeout_ns > 0) {
            uint64_t t = now_ns();
            if (t >= deadline) return 0;
            uint64_t left = deadline - t;
            lguest_set_clockevent((unsigned long)(left > 0x7fffffffu ? 0x7fffffffu : left));
        }
        if (!dev || dev->events == seen) lguest_halt(); /* any irq: look again */
    }
}

static int64_t ts_ns(const void *ts, int wide)
{
    if (!ts) return -1;
    int64_t s, ns;
    if (wide) s = ((const int64_t *)ts)[0], ns = ((const int64_t *)ts)[1];
    else s = ((const int32_t *)ts)[0], ns = ((const int32_t *)ts)[1];
    if (s < 0 || ns < 0 || ns >= 1000000000) return -2;
    return s * 1000000000 + ns;
}

static struct pollfd32 select_fds[1024];

static long do_select(int n, uint32_t *r, uint32_t *w, uint32_t *e, int64_t timeout_ns)
{
    if (n < 0 || timeout_ns == -2) return -EINVAL;
    if (n > 1024) n = 1024;
    uint32_t count = 0;
    for (int fd = 0; fd < n; fd++) {
        uint32_t bit = 1u << (fd & 31);
        int16_t ev = 0;
        if (r && (r[fd >> 5] & bit)) ev |= POLLIN;
        if (w && (w[fd >> 5] & bit)) ev |= POLLOUT;
        if (e && (e[fd >> 5] & bit)) ev |= POLLPRI;
        if (!ev) continue;
        select_fds[count].fd = fd;
        select_fds[count].events = ev;
        count++;
    }
    long got = do_poll(select_fds, count, timeout_ns);
    if (got < 0) return got;
    for (uint32_t i = 0; i < count; i++)
        if (select_fds[i].revents & POLLNVAL) return -EBADF;
    uint32_t words = ((uint32_t)n + 31) / 32;
    if (r) memset(r, 0, words * 4);
    if (w) memset(w, 0, words * 4);
    if (e) memset(e, 0, words * 4);
    long total = 0;
    for (uint32_t i = 0; i < count; i++) {
        int fd = select_fds[i].fd;
        int16_t ev = select_fds[i].events, re = select_fds[i].revents;
        uint32_t bit = 1u << (fd & 31);
        if ((ev & POLLIN) && (re & (POLLIN | POLLHUP | POLLERR))) r[fd >> 5] |= bit, total++;
        if ((ev & POLLOUT) && (re & (POLLOUT | POLLERR))) w[fd >> 5] |= bit, total++;
        if ((ev & POLLPRI) && (re & POLLPRI)) e[fd >> 5] |= bit, total++;
    }
    return total;
}

/* ---- the calls ---- */
static long socket_call(int which, const uint32_t *a)
{
    int fd = (int)a[0];
    switch (which) {
    case 1: return call(OP_SOCKET, 0, a[0], a[1], a[2], 0, 0);                      /* socket */
    case 2: return call(OP_BIND, fd, a[1], a[2], 0, 0, 0);                           /* bind */
    case 3: return call(OP_CONNECT, fd, a[1], a[2], 0, 0, 0);                        /* connect */
    case 4: return call(OP_LISTEN, fd, a[1], 0, 0, 0, 0);                            /* listen */
    case 5: return call(OP_ACCEPT, fd, a[1], a[2], 0, 0, 0);                         /* accept */
    case 6: return call(OP_SOCKNAME, fd, a[1], a[2], 0, 0, 0);                       /* getsockname */
    case 7: return call(OP_SOCKNAME, fd, a[1], a[2], 1, 0, 0);                       /* getpeername */
    case 9: return send_all(fd, (const char *)a[1], a[2], a[3], 0, 0);               /* send */
    case 10: return recv_some(fd, (char *)a[1], a[2], a[3], 0, 0);                   /* recv */
    case 11: return send_all(fd, (const char *)a[1], a[2], a[3], a[4], a[5]);        /* sendto */
    case 12: return recv_some(fd, (char *)a[1], a[2], a[3], a[4], a[5]);             /* recvfrom */
    case 13: return call(OP_SHUTDOWN, fd, a[1], 0, 0, 0, 0);                         /* shutdown */
    case 14: return call(OP_SETSOCKOPT, fd, a[1], a[2], a[3], a[4], 0);              /* setsockopt */
    case 15: return call(OP_GETSOCKOPT, fd, a[1], a[2], a[3], a[4], 0);              /* getsockopt */
    case 16: return do_sendmsg(fd, (const struct msghdr32 *)a[1], a[2]);             /* sendmsg */
    case 17: return do_recvmsg(fd, (struct msghdr32 *)a[1], a[2]);                   /* recvmsg */
    case 18: return call(OP_ACCEPT, fd, a[1], a[2], a[3], 0, 0);                     /* accept4 */
    }
    return -ENOSYS; /* socketpair, sendmmsg, recvmmsg...: not offered */
}

static long net_call(long nr, long a1, long a2, long a3, long a4, long a5, long a6, int *handled)
{
    uint32_t a[6] = {(uint32_t)a1, (uint32_t)a2, (uint32_t)a3, (uint32_t)a4, (uint32_t)a5,
                     (uint32_t)a6};
    int fd = (int)a1;
    switch (nr) {
    case 3: /* read */
        if (!is_socket(fd)) break;
        return recv_some(fd, (char *)a2, (uint32_t)a3, 0, 0, 0);
    case 4: /* write */
        if (!is_socket(fd)) break;
        return send_all(fd, (const char *)a2, (uint32_t)a3, 0, 0, 0);
    case 145: /* readv */
    case 146: { /* writev */
        if (!is_socket(fd)) break;
        const struct iovec32 *iov = (const struct iovec32 *)a2;
        long total = 0;
        if ((int)a3 < 0 || (int)a3 > 1024) return -EINVAL;
        for (int i = 0; i < (int)a3; i++) {
            long r = nr == 145 ? recv_some(fd, (char *)iov[i].base, iov[i].len, 0, 0, 0)
                               : send_all(fd, (const char *)iov[i].base, iov[i].len, 0, 0, 0);
            if (r < 0) return total ? total : r;
            total += r;
            if ((uint32_t)r < iov[i].len) break;
        }
        return total;
    }
    case 102: /* socketcall(which, args) */
        if (!a2) return -EFAULT;
        return socket_call((int)a1, (const uint32_t *)a2);
    case 359: return socket_call(1, a);
    case 361: return socket_call(2, a);
    case 362: return socket_call(3, a);
    case 363: return socket_call(4, a);
    case 364: return socket_call(18, a);
    case 365: return socket_call(15, a);
    case 366: return socket_call(14, a);
    case 367: return socket_call(6, a);
    case 368: return socket_call(7, a);
    case 369: return socket_call(11, a);
    case 371: return socket_call(12, a);
    case 373: return socket_call(13, a);
    case 370: return socket_call(16, a);
    case 372: return socket_call(17, a);
    case 360: return -ENOSYS; /* socketpair */
    case 168: /* poll(fds, n, ms) */
        return do_poll((struct pollfd32 *)a1, (uint32_t)a2,
                       (int)a3 < 0 ? -1 : (int64_t)(int)a3 * 1000000);
    case 309: /* ppoll */
    case 414: { /* ppoll_time64 */
        int64_t t = ts_ns((const void *)a3, nr == 414);
        if (t == -2) return -EINVAL;
        return do_poll((struct pollfd32 *)a1, (uint32_t)a2, t);
    }
    case 142: { /* _newselect: struct timeval */
        int64_t t = -1;
        if (a5) {
            const int32_t *tv = (const int32_t *)a5;
            t = (tv[0] < 0 || tv[1] < 0 || tv[1] >= 1000000) ? -2
                                                             : (int64_t)tv[0] * 1000000000 +
                                                                   (int64_t)tv[1] * 1000;
        }
        return do_select((int)a1, (uint32_t *)a2, (uint32_t *)a3, (uint32_t *)a4, t);
    }
    case 308: /* pselect6 */
    case 413: /* pselect6_time64 */
        return do_select((int)a1, (uint32_t *)a2, (uint32_t *)a3, (uint32_t *)a4,
                         ts_ns((const void *)a5, nr == 413));
    case 254: /* epoll_create(size) */
        if ((int)a1 <= 0) return -EINVAL;
        return call(OP_EPOLL_CREATE, 0, 0, 0, 0, 0, 0);
    case 329: /* epoll_create1(flags) */
        if (a1 & ~EPOLL_CLOEXEC) return -EINVAL;
        return call(OP_EPOLL_CREATE, 0, (a1 & EPOLL_CLOEXEC) != 0, 0, 0, 0, 0);
    case 255: /* epoll_ctl(epfd, op, fd, event) */
        if (!a4 && (a2 == 1 || a2 == 3)) return -EFAULT; /* ADD, MOD need an event */
        return call(OP_EPOLL_CTL, fd, a[1], a[2], a[3], 0, 0);
    case 256: /* epoll_wait(epfd, events, maxevents, ms) */
    case 319: /* epoll_pwait: the same, with a signal mask (no signals are delivered) */
        return do_epoll_wait(fd, (void *)a2, (int)a3,
                             (int)a4 < 0 ? -1 : (int64_t)(int)a4 * 1000000);
    case 441: { /* epoll_pwait2: a struct timespec (64-bit), NULL: none */
        int64_t t = ts_ns((const void *)a4, 1);
        if (t == -2) return -EINVAL;
        return do_epoll_wait(fd, (void *)a2, (int)a3, t);
    }
    }
    *handled = 0;
    return 0;
}

/* runtime.c's hook: 1 (and *result) if the call was a socket's, poll or select. */
int __lguest_net_syscall(long nr, long a1, long a2, long a3, long a4, long a5, long a6,
                         long *result)
{
    switch (nr) {
    case 3: case 4: case 145: case 146:
        if (!is_socket((int)a1)) return 0;
        break;
    case 102: case 142: case 168: case 308: case 309: case 413: case 414:
    case 254: case 255: case 256: case 319: case 329: case 441:
        break;
    default:
        if (nr < 359 || nr > 373) return 0;
    }
    int handled = 1;
    uint32_t was = lg_spin_lock_irqsave(&__lguest_files_lock);
    lock_was = was;
    long r = net_call(nr, a1, a2, a3, a4, a5, a6, &handled);
    lg_spin_unlock_irqrestore(&__lguest_files_lock, lock_was);
    *result = r;
    return handled;
}
