/* epollprobe: epoll behaviours for tests/test_epoll.py, one mode per run (argv[1]). */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static const char *ename(int e)
{
    switch (e) {
    case 0: return "OK";
    case EBADF: return "EBADF";
    case EINVAL: return "EINVAL";
    case EEXIST: return "EEXIST";
    case ENOENT: return "ENOENT";
    case EPERM: return "EPERM";
    case ELOOP: return "ELOOP";
    case EMFILE: return "EMFILE";
    case EFAULT: return "EFAULT";
    case EAGAIN: return "EAGAIN";
    case ENOSPC: return "ENOSPC";
    }
    return "E?";
}

/* "name result errno" for a call returning -1 on error. */
static void show(const char *name, int r) { printf("%s %d %s\n", name, r, ename(r < 0 ? errno : 0)); }

static int ctl(int ep, int op, int fd, uint32_t events, uint64_t data)
{
    struct epoll_event ev = {.events = events, .data.u64 = data};
    return epoll_ctl(ep, op, fd, &ev);
}

/* epoll_wait(ep, 8 events, ms): "name count [events:data]..." */
static void wait_show(const char *name, int ep, int ms)
{
    struct epoll_event ev[8];
    int n = epoll_wait(ep, ev, 8, ms);
    printf("%s %d", name, n);
    if (n < 0) printf(" %s", ename(errno));
    for (int i = 0; i < n; i++) printf(" %x:%llx", ev[i].events, (unsigned long long)ev[i].data.u64);
    printf("\n");
}

static int udp(void)
{
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    bind(fd, (struct sockaddr *)&a, sizeof a);
    return fd;
}

static void errors(void)
{
    show("create0", epoll_create(0));
    show("create1-flags", epoll_create1(1));
    int ep = epoll_create1(EPOLL_CLOEXEC);
    show("cloexec", fcntl(ep, F_GETFD));
    int plain = epoll_create(1);
    show("plain", fcntl(plain, F_GETFD));
    int u = udp(), v = udp();
    show("add-badep", ctl(99, EPOLL_CTL_ADD, u, EPOLLOUT, 0));
    show("add-badfd", ctl(ep, EPOLL_CTL_ADD, 99, EPOLLOUT, 0));
    show("add-negfd", ctl(ep, EPOLL_CTL_ADD, -1, EPOLLOUT, 0));
    show("add-notep", ctl(u, EPOLL_CTL_ADD, v, EPOLLOUT, 0));
    show("add-self", ctl(ep, EPOLL_CTL_ADD, ep, EPOLLIN, 0));
    show("add-null", epoll_ctl(ep, EPOLL_CTL_ADD, u, NULL));
    show("op-bad", ctl(ep, 7, u, EPOLLOUT, 0));
    show("mod-absent", ctl(ep, EPOLL_CTL_MOD, u, EPOLLOUT, 0));
    show("del-absent", epoll_ctl(ep, EPOLL_CTL_DEL, u, NULL));
    show("add", ctl(ep, EPOLL_CTL_ADD, u, EPOLLOUT, 0x1122334455667788ull));
    show("add-again", ctl(ep, EPOLL_CTL_ADD, u, EPOLLIN, 0));
    int f = open("/tmp/f", O_CREAT | O_RDWR, 0600);
    show("add-file", ctl(ep, EPOLL_CTL_ADD, f, EPOLLIN, 0));
    /* nesting: plain watches ep; ep watching plain would be a loop */
    show("nest", ctl(plain, EPOLL_CTL_ADD, ep, EPOLLIN, 7));
    show("loop", ctl(ep, EPOLL_CTL_ADD, plain, EPOLLIN, 0));
    wait_show("nested", plain, 0);
    /* chains: at most 5 instances, however they are built */
    int chain[6];
    chain[0] = epoll_create1(0);
    for (int i = 1; i < 6; i++) {
        chain[i] = epoll_create1(0);
        int r = ctl(chain[i], EPOLL_CTL_ADD, chain[i - 1], EPOLLIN, 0);
        printf("chain %d %s\n", i + 1, ename(r ? errno : 0));
    }
    int below = epoll_create1(0);
    show("below", ctl(chain[0], EPOLL_CTL_ADD, below, EPOLLIN, 0));
    show("below-short", ctl(chain[1], EPOLL_CTL_ADD, below, EPOLLIN, 0)); /* 5 from chain[4] */
    for (int i = 0; i < 6; i++) close(chain[i]);
    close(below);
    struct epoll_event ev[2];
    show("wait-badep", epoll_wait(99, ev, 2, 0));
    show("wait-notep", epoll_wait(u, ev, 2, 0));
    show("wait-zero", epoll_wait(ep, ev, 0, 0));
    show("wait-null", epoll_wait(ep, NULL, 2, 0));
    char c;
    show("read-ep", (int)read(ep, &c, 1));
    wait_show("ready", ep, -1);
    /* a dup keeps the watched description: the interest stays until both close */
    int d = dup(u);
    close(u);
    wait_show("after-close", ep, 0);
    close(d);
    wait_show("after-last", ep, 0);
    show("del-closed", epoll_ctl(ep, EPOLL_CTL_DEL, u, NULL));
    /* EPOLLONESHOT: one report, then none until MOD */
    show("oneshot", ctl(ep, EPOLL_CTL_ADD, v, EPOLLOUT | EPOLLONESHOT, 2));
    wait_show("oneshot-1", ep, 0);
    wait_show("oneshot-2", ep, 0);
    show("rearm", ctl(ep, EPOLL_CTL_MOD, v, EPOLLOUT | EPOLLONESHOT, 3));
    wait_show("oneshot-3", ep, 0);
    /* EPOLLET: writable stays true, so one report only */
    show("mod-et", ctl(ep, EPOLL_CTL_MOD, v, EPOLLOUT | EPOLLET, 4));
    wait_show("et-1", ep, 0);
    wait_show("et-2", ep, 0);
    show("del", epoll_ctl(ep, EPOLL_CTL_DEL, v, NULL));
    /* two ready, one event a call: each is served in turn */
    int w = udp(), x = udp();
    ctl(ep, EPOLL_CTL_ADD, w, EPOLLOUT, 5);
    ctl(ep, EPOLL_CTL_ADD, x, EPOLLOUT, 6);
    for (int i = 0; i < 3; i++) {
        int k = epoll_wait(ep, ev, 1, 0);
        printf("turn %d %llx\n", k, (unsigned long long)ev[0].data.u64);
    }
    close(w);
    close(x);
    wait_show("timeout", ep, 30); /* nothing watched: the timeout ends it */
    /* the console: fd 1 is writable */
    show("add-stdout", ctl(ep, EPOLL_CTL_ADD, 1, EPOLLOUT, 9));
    wait_show("stdout", ep, 0);
    /* an epoll descriptor duplicates and closes like any other */
    int e2 = dup(ep);
    close(ep);
    wait_show("dup", e2, 0);
    close(e2);
    show("wait-closed", epoll_wait(e2, ev, 2, 0));
    int n = 0, r;
    while ((r = epoll_create1(0)) >= 0) n++;
    printf("emfile %d %s\n", n > 0, ename(errno));
}

/* All of buf to the non-blocking fd, waiting for room with poll. */
static void write_all(int fd, const char *buf, size_t len)
{
    while (len) {
        ssize_t r = write(fd, buf, len);
        if (r > 0) buf += r, len -= (size_t)r;
        else if (r < 0 && errno == EAGAIN) poll(&(struct pollfd){.fd = fd, .events = POLLOUT}, 1, -1);
        else return;
    }
}

static void *nothing(void *arg) { return arg; }

/* serve PORT N [et] [threads]: echo for N clients over one epoll, then "served N";
 * with "threads", after a thread has run (waits are then the thread scheduler's). */
static void serve(int port, int clients, int et, int threads)
{
    if (threads) {
        pthread_t t;
        pthread_create(&t, NULL, nothing, NULL);
        pthread_join(t, NULL);
    }
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    bind(ls, (struct sockaddr *)&a, sizeof a);
    listen(ls, 16);
    int ep = epoll_create1(0);
    const uint64_t tag = 0xabcd00000000ull; /* data.u64 comes back whole */
    ctl(ep, EPOLL_CTL_ADD, ls, EPOLLIN | (et ? EPOLLET : 0), tag | (uint32_t)ls);
    printf("listening %d\n", port), fflush(stdout);
    int done = 0, accepted = 0;
    long bytes = 0;
    char buf[4096];
    while (done < clients) {
        struct epoll_event ev[4];
        int n = epoll_wait(ep, ev, 4, -1);
        if (n <= 0) { printf("wait %d %s\n", n, ename(errno)); return; }
        for (int i = 0; i < n; i++) {
            if (ev[i].data.u64 >> 32 != tag >> 32) { printf("bad data\n"); return; }
            int fd = (int)(uint32_t)ev[i].data.u64;
            if (fd == ls) {
                for (;;) {
                    int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    accepted++;
                    ctl(ep, EPOLL_CTL_ADD, c, EPOLLIN | EPOLLRDHUP | (et ? EPOLLET : 0),
                        tag | (uint32_t)c);
                    if (!et) break; /* level-triggered: the next wait reports the rest */
                }
                continue;
            }
            for (;;) {
                ssize_t got = read(fd, buf, sizeof buf);
                if (got > 0) {
                    bytes += got;
                    write_all(fd, buf, (size_t)got);
                    if (!et) break; /* level-triggered: reported again while unread */
                    continue;
                }
                if (got == 0) {
                    close(fd); /* closing drops its interest */
                    done++;
                }
                break; /* EAGAIN: edge-triggered waits for the next arrival */
            }
        }
    }
    printf("served %d accepted %d bytes %ld\n", done, accepted, bytes);
    wait_show("left", ep, 0);
}

/* console PORT [threads]: epoll over the console's input and a listener, two
 * events, then a timeout; with "threads", after a thread has run (the runtime's
 * thread scheduler then owns the waits). */
static void console(int port, int threads)
{
    if (threads) {
        pthread_t t;
        pthread_create(&t, NULL, nothing, NULL);
        pthread_join(t, NULL);
    }
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    bind(ls, (struct sockaddr *)&a, sizeof a);
    listen(ls, 4);
    int ep = epoll_create1(0);
    ctl(ep, EPOLL_CTL_ADD, 0, EPOLLIN, 100);
    ctl(ep, EPOLL_CTL_ADD, ls, EPOLLIN, 200);
    printf("ready\n"), fflush(stdout);
    char buf[256];
    for (int round = 0; round < 2; round++) {
        struct epoll_event ev[2];
        int n = epoll_wait(ep, ev, 2, -1);
        for (int i = 0; i < n; i++) {
            printf("event %llu\n", (unsigned long long)ev[i].data.u64);
            if (ev[i].data.u64 == 100) {
                ssize_t k = read(0, buf, sizeof buf);
                printf("stdin %.*s", (int)k, buf);
            } else {
                int c = accept(ls, 0, 0);
                ssize_t k = recv(c, buf, sizeof buf, MSG_WAITALL);
                printf("client %ld\n", (long)k);
                close(c);
            }
        }
        fflush(stdout);
    }
    struct epoll_event ev[2];
    printf("timeout %d\n", epoll_pwait(ep, ev, 2, 5, NULL));
}

/* budget (max_files 64): the guest's interests are bounded; closed ones are swept. */
static void budget(void)
{
    int fds[31], eps[32], ok = 0, err = 0;
    fds[0] = udp();
    for (int i = 1; i < 31; i++) fds[i] = dup(fds[0]);
    for (int i = 0; i < 32; i++) eps[i] = epoll_create1(0);
    for (int e = 0; e < 32; e++)
        for (int f = 0; f < 31; f++) {
            if (!ctl(eps[e], EPOLL_CTL_ADD, fds[f], EPOLLIN, 0)) ok++;
            else if (!err) err = errno;
        }
    printf("budget %d %s\n", ok, ename(err));
    for (int i = 0; i < 32; i++) close(eps[i]);
    for (int i = 0; i < 31; i++) close(fds[i]);
    int ep = epoll_create1(0), i;
    for (i = 0; i < 2000; i++) {
        int u = udp();
        int r = ctl(ep, EPOLL_CTL_ADD, u, EPOLLIN, 0);
        close(u);
        if (r) break;
    }
    printf("churn %d %s\n", i, ename(i < 2000 ? errno : 0));
}

/* etrace PORT: edge-triggered, data that arrives after a drain to EAGAIN and
 * before the next epoll_wait is still reported. */
static void etrace(int port)
{
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    bind(ls, (struct sockaddr *)&a, sizeof a);
    listen(ls, 4);
    printf("listening\n"), fflush(stdout);
    int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK), ep = epoll_create1(0);
    ctl(ep, EPOLL_CTL_ADD, c, EPOLLIN | EPOLLET, 1);
    wait_show("first", ep, -1);
    char buf[64];
    ssize_t got;
    while ((got = read(c, buf, sizeof buf)) > 0) printf("read %.*s\n", (int)got, buf);
    printf("drained %s\n", ename(errno)), fflush(stdout);
    fgets(buf, sizeof buf, stdin); /* the host sends more, then this line */
    wait_show("second", ep, 1000);
    wait_show("third", ep, 0); /* nothing new */
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "errors")) errors();
    else if (!strcmp(mode, "serve"))
        serve(atoi(argv[2]), atoi(argv[3]), argc > 4 && !strcmp(argv[4], "et"),
              argc > 4 && !strcmp(argv[argc - 1], "threads"));
    else if (!strcmp(mode, "budget")) budget();
    else if (!strcmp(mode, "etrace")) etrace(atoi(argv[2]));
    else if (!strcmp(mode, "console")) console(atoi(argv[2]), argc > 3 && !strcmp(argv[3], "threads"));
    else printf("unknown mode %s\n", mode);
    return 0;
}
