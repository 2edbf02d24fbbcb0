/* netbench: the network figures' guest (benchmarks/bench_net.py).
 *
 *     netbench echo PORT             accept one connection, echo until end of file
 *     netbench sink PORT             accept one connection, read until end of file,
 *                                    print "got BYTES"
 *     netbench ping HOST PORT N      N round trips of 1 byte
 *     netbench send HOST PORT BYTES  BYTES in 64 KiB writes, then close
 *
 * The servers print "listening" once they listen; the clients print "start"
 * once connected and "done" at the end, so the host times exactly the
 * transfer. */
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char buf[1 << 16];

static int serve(int port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1)) {
        perror("listen");
        exit(1);
    }
    puts("listening");
    fflush(stdout);
    int c = accept(s, 0, 0);
    if (c < 0) {
        perror("accept");
        exit(1);
    }
    return c;
}

static int dial(const char *host, const char *port)
{
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(host, port, &hints, &ai)) {
        fprintf(stderr, "%s: cannot resolve\n", host);
        exit(1);
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen)) {
        perror("connect");
        exit(1);
    }
    freeaddrinfo(ai);
    return fd;
}

int main(int argc, char **argv)
{
    if (argc < 3) return 2;
    const char *mode = argv[1];
    if (!strcmp(mode, "echo") || !strcmp(mode, "sink")) {
        int c = serve(atoi(argv[2]));
        unsigned long long total = 0;
        long n;
        while ((n = read(c, buf, sizeof buf)) > 0) {
            total += (unsigned long long)n;
            if (mode[0] == 'e')
                for (long at = 0; at < n;) {
                    long w = write(c, buf + at, (size_t)(n - at));
                    if (w <= 0) return 1;
                    at += w;
                }
        }
        if (n < 0) return 1;
        printf("got %llu\n", total);
        return 0;
    }
    if (argc < 5) return 2;
    int fd = dial(argv[2], argv[3]);
    long long count = atoll(argv[4]);
    puts("start");
    fflush(stdout);
    if (!strcmp(mode, "ping")) {
        char b = 'x';
        for (long long i = 0; i < count; i++)
            if (write(fd, &b, 1) != 1 || read(fd, &b, 1) != 1) return 1;
    } else {
        for (long long left = count; left > 0;) {
            long n = left < (long long)sizeof buf ? (long)left : (long)sizeof buf;
            long w = write(fd, buf, (size_t)n);
            if (w <= 0) return 1;
            left -= w;
        }
    }
    close(fd);
    puts("done");
    return 0;
}
