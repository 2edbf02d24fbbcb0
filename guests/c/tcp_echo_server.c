/* tcp_echo_server: a TCP echo service for guests on a network (docs/network.md).
 *
 *     tcp_echo_server [PORT [CONNECTIONS]]
 *
 * Listens on PORT (default 7), serves up to 64 clients at once with poll(),
 * echoes what each sends until it closes, and exits after CONNECTIONS clients
 * have come and gone (default: never).  Prints "listening on PORT" once ready. */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CLIENTS 64

int main(int argc, char **argv)
{
    int port = argc > 1 ? atoi(argv[1]) : 7;
    long left = argc > 2 ? atol(argv[2]) : -1;
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 16)) {
        perror("tcp_echo_server");
        return 1;
    }
    printf("listening on %d\n", port);
    fflush(stdout);
    struct pollfd fds[1 + MAX_CLIENTS];
    int n = 1;
    fds[0] = (struct pollfd){.fd = lfd, .events = POLLIN};
    static char buf[65536];
    while (left != 0) {
        if (poll(fds, n, -1) < 0) {
            perror("poll");
            return 1;
        }
        if ((fds[0].revents & POLLIN) && n < 1 + MAX_CLIENTS) {
            int c = accept(lfd, 0, 0);
            if (c >= 0) fds[n++] = (struct pollfd){.fd = c, .events = POLLIN};
        }
        for (int i = 1; i < n; i++) {
            if (!fds[i].revents) continue;
            ssize_t got = read(fds[i].fd, buf, sizeof buf);
            if (got > 0 && write(fds[i].fd, buf, got) == got) continue;
            close(fds[i].fd); /* end of file, or an error: this client is done */
            fds[i--] = fds[--n];
            if (left > 0) left--;
        }
    }
    close(lfd);
    return 0;
}
