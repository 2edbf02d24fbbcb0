/* netprobe: socket behaviours for tests/test_net.py, one mode per run (argv[1]). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <unistd.h>

static const char *ename(int e)
{
    switch (e) {
    case 0: return "OK";
    case ENOENT: return "ENOENT";
    case EAGAIN: return "EAGAIN";
    case EINPROGRESS: return "EINPROGRESS";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ECONNRESET: return "ECONNRESET";
    case EPIPE: return "EPIPE";
    case ENOTCONN: return "ENOTCONN";
    case EADDRINUSE: return "EADDRINUSE";
    case EBADF: return "EBADF";
    case EMFILE: return "EMFILE";
    case ENETUNREACH: return "ENETUNREACH";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case EISCONN: return "EISCONN";
    case ENOTSOCK: return "ENOTSOCK";
    case ETIMEDOUT: return "ETIMEDOUT";
    case ESTALE: return "ESTALE";
    case EALREADY: return "EALREADY";
    }
    return "E?";
}

static struct sockaddr_in at(const char *host, int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    struct hostent *h = gethostbyname(host);
    if (h) memcpy(&a.sin_addr, h->h_addr_list[0], 4);
    else inet_pton(AF_INET, host, &a.sin_addr);
    return a;
}

static int listener(int type, int port)
{
    int fd = socket(AF_INET, type, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (bind(fd, (struct sockaddr *)&a, sizeof a)) printf("bind %s\n", ename(errno));
    if (type == SOCK_STREAM && listen(fd, 4)) printf("listen %s\n", ename(errno));
    return fd;
}

static int dial(const char *host, int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = at(host, port);
    int r = connect(fd, (struct sockaddr *)&a, sizeof a);
    printf("connect %s\n", ename(r ? errno : 0));
    return fd;
}

static void ready(const char *what) { printf("ready %s\n", what), fflush(stdout); }

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    const char *host = argc > 2 ? argv[2] : "";
    int port = argc > 3 ? atoi(argv[3]) : 0;
    char buf[65536];
    if (!strcmp(mode, "names")) { /* names HOST...: each one's address */
        for (int i = 2; i < argc; i++) {
            struct addrinfo hints = {.ai_family = AF_INET}, *ai;
            int e = getaddrinfo(argv[i], 0, &hints, &ai);
            struct hostent *h = gethostbyname(argv[i]);
            if (e) { printf("%s none %s\n", argv[i], e == EAI_NONAME ? "EAI_NONAME" : "other"); continue; }
            char s[32];
            struct in_addr got = ((struct sockaddr_in *)ai->ai_addr)->sin_addr;
            inet_ntop(AF_INET, &got, s, sizeof s);
            struct addrinfo *any; /* AF_UNSPEC: an A and an AAAA query at once */
            int agree = !getaddrinfo(argv[i], 0, 0, &any);
            if (agree) {
                agree = any->ai_family == AF_INET &&
                        ((struct sockaddr_in *)any->ai_addr)->sin_addr.s_addr == got.s_addr;
                freeaddrinfo(any);
            }
            printf("%s %s %s\n", argv[i], s, !h ? "nohostent" : agree ? "same" : "unspec-differs");
            freeaddrinfo(ai);
        }
    } else if (!strcmp(mode, "errors")) { /* errors: every refusal, no network needed */
        int fd = dial(host, port); /* nothing listens there */
        char c = 'x';
        printf("send %s\n", ename(send(fd, &c, 1, 0) < 0 ? errno : 0));
        close(fd);
        int a = listener(SOCK_STREAM, 5000), b = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in s = {.sin_family = AF_INET, .sin_port = htons(5000)};
        printf("rebind %s\n", ename(bind(b, (struct sockaddr *)&s, sizeof s) ? errno : 0));
        printf("recv-unconnected %s\n", ename(recv(b, buf, 1, 0) < 0 ? errno : 0));
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        printf("peername %s\n", ename(getpeername(b, (struct sockaddr *)&peer, &len) ? errno : 0));
        printf("badfd %s\n", ename(send(99, &c, 1, 0) < 0 ? errno : 0));
        int file = open("/etc/hosts", O_RDONLY);
        printf("notsock %s\n", ename(listen(file, 1) ? errno : 0));
        close(file), close(a), close(b);
        for (int i = 4; i < argc; i++) dial(argv[i], 80);
    } else if (!strcmp(mode, "nonblock")) { /* nonblock HOST PORT: connect, accept, EAGAIN */
        int l = listener(SOCK_STREAM, 6000);
        fcntl(l, F_SETFL, fcntl(l, F_GETFL) | O_NONBLOCK);
        printf("accept-empty %s\n", ename(accept(l, 0, 0) < 0 ? errno : 0));
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        struct sockaddr_in a = at("127.0.0.1", 6000);
        printf("connect %s\n", ename(connect(fd, (struct sockaddr *)&a, sizeof a) ? errno : 0));
        struct pollfd p[2] = {{.fd = fd, .events = POLLOUT}, {.fd = l, .events = POLLIN}};
        printf("poll %d out=%d in=%d\n", poll(p, 2, -1), !!(p[0].revents & POLLOUT),
               !!(p[1].revents & POLLIN));
        int err = -1;
        socklen_t len = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        printf("so_error %s\n", ename(err));
        int c = accept4(l, 0, 0, SOCK_NONBLOCK);
        printf("accepted %d nonblock=%d\n", c >= 0, !!(fcntl(c, F_GETFL) & O_NONBLOCK));
        printf("recv-empty %s\n", ename(recv(c, buf, 10, 0) < 0 ? errno : 0));
        long total = 0;
        for (;;) {
            ssize_t n = send(fd, buf, sizeof buf, 0);
            if (n < 0) { printf("full %ld %s\n", total, ename(errno)); break; }
            total += n;
        }
        ssize_t got = recv(c, buf, 1000, 0);
        printf("drained %ld then-send %ld\n", (long)got, (long)send(fd, buf, 5000, 0));
        int r = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        struct sockaddr_in none = at(host, port);
        printf("connect-refused %s\n", ename(connect(r, (struct sockaddr *)&none, sizeof none) ? errno : 0));
        struct pollfd q = {.fd = r, .events = POLLOUT};
        poll(&q, 1, -1);
        getsockopt(r, SOL_SOCKET, SO_ERROR, &err, &len);
        printf("refused-so_error %s err=%d\n", ename(err), !!(q.revents & POLLERR));
    } else if (!strcmp(mode, "select")) { /* select: console and a listener, then a client */
        int l = listener(SOCK_STREAM, 7000);
        ready("select");
        for (int round = 0; round < 2; round++) {
            fd_set r;
            FD_ZERO(&r);
            FD_SET(0, &r);
            FD_SET(l, &r);
            int n = select(l + 1, &r, 0, 0, 0);
            printf("select %d stdin=%d listener=%d\n", n, FD_ISSET(0, &r), FD_ISSET(l, &r));
            if (FD_ISSET(0, &r)) {
                ssize_t k = read(0, buf, sizeof buf);
                printf("stdin %.*s", (int)k, buf);
            }
            if (FD_ISSET(l, &r)) {
                int c = accept(l, 0, 0);
                ssize_t k = recv(c, buf, sizeof buf, MSG_WAITALL);
                printf("client %ld\n", (long)k);
                close(c);
            }
        }
        struct timeval tv = {0, 1000};
        fd_set r;
        FD_ZERO(&r);
        FD_SET(l, &r);
        printf("timeout %d\n", select(l + 1, &r, 0, 0, &tv));
        struct pollfd p = {.fd = l, .events = POLLIN};
        printf("poll-timeout %d\n", poll(&p, 1, 1));
    } else if (!strcmp(mode, "serve-hold")) { /* serve-hold PORT: accept, never read */
        int l = listener(SOCK_STREAM, atoi(host));
        ready("hold");
        int c = accept(l, 0, 0);
        printf("accepted %d\n", c >= 0);
        fflush(stdout);
        read(0, buf, 1); /* until the test says so (or kills us) */
    } else if (!strcmp(mode, "client-wait")) { /* client-wait HOST PORT: send, read to the end */
        int fd = dial(host, port);
        char c = 'x';
        send(fd, &c, 1, 0);
        ready("client");
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        printf("recv %ld %s\n", (long)n, ename(n < 0 ? errno : 0));
        n = send(fd, &c, 1, 0);
        printf("send-after %s\n", ename(n < 0 ? errno : 0));
    } else if (!strcmp(mode, "udp-echo")) { /* udp-echo PORT COUNT */
        int fd = listener(SOCK_DGRAM, atoi(host));
        ready("udp");
        for (int i = 0; i < port; i++) {
            struct sockaddr_in from;
            socklen_t len = sizeof from;
            ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
            printf("datagram %ld from %s\n", (long)n, inet_ntoa(from.sin_addr));
            sendto(fd, buf, n, 0, (struct sockaddr *)&from, len);
        }
    } else if (!strcmp(mode, "udp-client")) { /* udp-client HOST PORT SIZES... */
        int fd = socket(AF_INET, SOCK_DGRAM, 0);
        struct sockaddr_in a = at(host, port);
        connect(fd, (struct sockaddr *)&a, sizeof a);
        for (int i = 4; i < argc; i++) send(fd, buf, atoi(argv[i]), 0);
        for (int i = 4; i < argc; i++) printf("reply %ld\n", (long)recv(fd, buf, sizeof buf, 0));
        char small[3];
        send(fd, buf, 10, 0);
        printf("truncated %ld\n", (long)recv(fd, small, sizeof small, MSG_TRUNC));
        struct iovec out[2] = {{"ab", 2}, {"cde", 3}};
        struct msghdr m = {.msg_iov = out, .msg_iovlen = 2};
        printf("sendmsg %ld\n", (long)sendmsg(fd, &m, 0));
        char x[2], y[10] = "";
        struct iovec in[2] = {{x, 2}, {y, 10}};
        struct sockaddr_in from;
        struct msghdr r = {.msg_name = &from, .msg_namelen = sizeof from, .msg_iov = in, .msg_iovlen = 2};
        long n = (long)recvmsg(fd, &r, 0);
        printf("recvmsg %ld %.2s|%.3s from %s flags %d\n", n, x, y, inet_ntoa(from.sin_addr), r.msg_flags);
    } else if (!strcmp(mode, "sockets")) { /* sockets: open until refused */
        int n = 0;
        while (socket(AF_INET, n % 2 ? SOCK_DGRAM : SOCK_STREAM, 0) >= 0) n++;
        printf("sockets %d %s\n", n, ename(errno));
        printf("file %s\n", ename(open("/etc/hosts", O_RDONLY) >= 0 ? 0 : errno));
    } else if (!strcmp(mode, "names-of")) { /* names-of HOST PORT: getsockname, getpeername */
        int fd = dial(host, port);
        struct sockaddr_in me, peer;
        socklen_t a = sizeof me, b = sizeof peer;
        getsockname(fd, (struct sockaddr *)&me, &a);
        getpeername(fd, (struct sockaddr *)&peer, &b);
        char s1[32], s2[32];
        inet_ntop(AF_INET, &me.sin_addr, s1, sizeof s1);
        inet_ntop(AF_INET, &peer.sin_addr, s2, sizeof s2);
        printf("me %s peer %s:%d\n", s1, s2, ntohs(peer.sin_port));
        int d = dup(fd);
        close(fd);
        ssize_t n = write(d, "dup\n", 4);
        printf("dup-write %ld\n", (long)n);
        shutdown(d, SHUT_WR);
        n = read(d, buf, sizeof buf);
        printf("read %.*s", (int)(n > 0 ? n : 0), buf);
    } else if (!strcmp(mode, "partition")) { /* partition PORT: per console line, poll once */
        int l = listener(SOCK_STREAM, atoi(host));
        ready("partition");
        int c = accept(l, 0, 0);
        char line[64];
        while (fgets(line, sizeof line, stdin)) {
            struct pollfd p = {.fd = c, .events = POLLIN};
            int n = poll(&p, 1, line[0] == 'w' ? -1 : 0); /* "wait": until data comes */
            printf("poll %d", n);
            if (n > 0) {
                ssize_t k = recv(c, buf, sizeof buf, 0);
                printf(" data %.*s", (int)(k > 0 ? k : 0), buf);
            }
            printf("\n");
            fflush(stdout);
        }
    } else if (!strcmp(mode, "stall")) { /* stall HOST PORT: send until an error, reconnect */
        int fd = dial(host, port);
        ready("stall");
        fgets(buf, sizeof buf, stdin); /* the test cuts the network, then says go */
        long total = 0;
        ssize_t n;
        while ((n = send(fd, buf, 4096, 0)) > 0) total += n;
        printf("sent %ld %s\n", total, ename(n < 0 ? errno : 0));
        n = send(fd, buf, 1, 0);
        printf("again %s\n", ename(n < 0 ? errno : 0));
        close(fd);
        dial(host, port);
    } else if (!strcmp(mode, "outbound")) { /* outbound ADDR PORT...: TCP, then UDP, each */
        for (int i = 3; i < argc; i++) {
            int fd = socket(AF_INET, SOCK_STREAM, 0);
            struct sockaddr_in a = at(host, atoi(argv[i]));
            int r = connect(fd, (struct sockaddr *)&a, sizeof a);
            printf("tcp %s:%s %s", host, argv[i], ename(r ? errno : 0));
            if (!r) {
                send(fd, "ping\n", 5, 0);
                ssize_t n = recv(fd, buf, sizeof buf, 0);
                struct sockaddr_in peer;
                socklen_t len = sizeof peer;
                getpeername(fd, (struct sockaddr *)&peer, &len);
                printf(" peer %s reply %.*s", inet_ntoa(peer.sin_addr), (int)(n > 0 ? n : 0), buf);
            } else {
                printf("\n");
            }
            close(fd);
            fd = socket(AF_INET, SOCK_DGRAM, 0);
            r = sendto(fd, "ping\n", 5, 0, (struct sockaddr *)&a, sizeof a);
            printf("udp %s:%s %s\n", host, argv[i], ename(r < 0 ? errno : 0));
            close(fd);
        }
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0); /* the first, not blocking */
        struct sockaddr_in a = at(host, atoi(argv[3]));
        int r = connect(fd, (struct sockaddr *)&a, sizeof a);
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int n = poll(&p, 1, -1);
        int err = -1;
        socklen_t len = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        printf("nonblock %s poll %d so_error %s\n", ename(r ? errno : 0), n, ename(err));
    } else if (!strcmp(mode, "snap")) { /* snap PORT: a listener and a connection, a line */
        int l = listener(SOCK_STREAM, atoi(host));
        ready("snap");
        int c = accept(l, 0, 0);
        fcntl(l, F_SETFL, O_NONBLOCK);
        printf("accepted %d\n", c >= 0);
        fflush(stdout);
        fgets(buf, sizeof buf, stdin); /* the test snapshots the guest here */
        int again = accept(l, 0, 0);
        printf("accept %s\n", ename(again < 0 ? errno : 0));
        ssize_t n = recv(c, buf, sizeof buf, 0);
        printf("recv %ld %s\n", (long)n, ename(n < 0 ? errno : 0));
        int a = close(c), b = close(l);
        printf("close %s %s\n", ename(a ? errno : 0), ename(b ? errno : 0));
        int l2 = listener(SOCK_STREAM, atoi(host)); /* the port is free again */
        printf("listen-again %d\n", l2 >= 0);
    } else if (!strcmp(mode, "nbconnect")) { /* nbconnect HOST PORT: two, across a cut */
        for (int i = 1; i <= 2; i++) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            struct sockaddr_in a = at(host, port);
            int r = connect(fd, (struct sockaddr *)&a, sizeof a);
            printf("connect%d %s", i, ename(r ? errno : 0));
            r = connect(fd, (struct sockaddr *)&a, sizeof a);
            printf(" again %s\n", ename(r ? errno : 0));
            fflush(stdout); /* the test times the first one out once both calls are made */
            if (i == 2) ready("second"); /* the test heals the cut now */
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            int n = poll(&p, 1, -1);
            int err = -1;
            socklen_t len = sizeof err;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
            struct sockaddr_in peer;
            len = sizeof peer;
            r = getpeername(fd, (struct sockaddr *)&peer, &len);
            printf("poll%d %d%s so_error %s peer %s\n", i, n, p.revents & POLLERR ? " ERR" : "",
                   ename(err), ename(r ? errno : 0));
            close(fd);
        }
    } else {
        printf("unknown mode %s\n", mode);
        return 2;
    }
    return 0;
}
