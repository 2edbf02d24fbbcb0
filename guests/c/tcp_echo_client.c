/* tcp_echo_client: send a line to an echo service by name, print the answer.
 *
 *     tcp_echo_client HOST PORT WORDS...
 *
 * Resolves HOST (a guest's name, "host", or an address) with getaddrinfo,
 * connects, sends WORDS joined by spaces and a newline, shuts its side down and
 * prints everything that comes back. */
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: tcp_echo_client HOST PORT WORDS...\n");
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
    char line[4096] = "";
    for (int i = 3; i < argc; i++) {
        if (i > 3) strncat(line, " ", sizeof line - strlen(line) - 1);
        strncat(line, argv[i], sizeof line - strlen(line) - 1);
    }
    strncat(line, "\n", sizeof line - strlen(line) - 1);
    if (send(fd, line, strlen(line), 0) < 0) {
        perror("send");
        return 1;
    }
    shutdown(fd, SHUT_WR);
    char buf[4096];
    ssize_t got;
    while ((got = recv(fd, buf, sizeof buf, 0)) > 0) fwrite(buf, 1, got, stdout);
    if (got < 0) {
        perror("recv");
        return 1;
    }
    close(fd);
    return 0;
}
