/* tcp_hold_client: connect to a service by name, send a line, print the answer's
 * first line, then hold the connection until the other end closes it.
 *
 *     tcp_hold_client HOST PORT WORD
 *
 * What many guests each holding one connection look like (benchmarks/
 * bench_net_memory.py): the guest waits in recv, costing the host nothing but
 * its connection while it waits. */
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: tcp_hold_client HOST PORT WORD\n");
        return 2;
    }
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *ai;
    int err = getaddrinfo(argv[1], argv[2], &hints, &ai);
    if (err) {
        fprintf(stderr, "%s: %s\n", argv[1], gai_strerror(err));
        return 1;
    }
    int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen)) {
        perror("connect");
        return 1;
    }
    freeaddrinfo(ai);
    char line[256];
    int n = snprintf(line, sizeof line, "%s\n", argv[3]);
    if (n < 0 || n >= (int)sizeof line || send(fd, line, n, 0) != n) {
        perror("send");
        return 1;
    }
    char buf[256];
    size_t have = 0;
    ssize_t got;
    while (have < sizeof buf && (got = recv(fd, buf + have, sizeof buf - have, 0)) > 0) {
        have += got;
        if (memchr(buf, '\n', have)) break;
    }
    char *end = memchr(buf, '\n', have);
    if (!end) {
        fprintf(stderr, "no answer\n");
        return 1;
    }
    printf("%.*s\n", (int)(end - buf), buf);
    fflush(stdout);
    while ((got = recv(fd, buf, sizeof buf, 0)) > 0) {
    }
    close(fd);
    return got < 0 ? 1 : 0;
}
