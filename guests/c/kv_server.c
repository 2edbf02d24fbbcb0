/* kv_server: a key-value store for guests on a network, with an optional replica.
 *
 *     kv_server [PORT [REPLICA_HOST REPLICA_PORT]]
 *
 * Listens on PORT (default 6379) and serves up to 32 clients at once with
 * poll().  Each request is one line; each answer is one line:
 *
 *     SET KEY VALUE   ->  OK                (stored here and on the replica)
 *                         OK unreplicated   (stored here only: the replica is lost)
 *     GET KEY         ->  VALUE VALUE  or  MISSING
 *     DUMP            ->  KEY=VALUE ... in the order the keys were first set
 *     anything else   ->  ERROR what
 *
 * With a replica (another kv_server, reached by name), every SET is sent to it
 * and answered only once the replica has answered: replication is synchronous,
 * so while the network cuts the two apart a SET waits, and the store serves
 * nobody else meanwhile.  When the connection to the replica fails (ETIMEDOUT
 * after a long cut, ECONNRESET, end of file) the store says "replica lost: ..."
 * on its console and goes on alone.  Prints "listening on PORT" once ready. */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CLIENTS 32
#define MAX_KEYS 256
#define KEY_LEN 64
#define VALUE_LEN 256
#define LINE_LEN 512

static char keys[MAX_KEYS][KEY_LEN];
static char values[MAX_KEYS][VALUE_LEN];
static int nkeys;
static int has_replica; /* started with one (it may be lost since) */
static int replica = -1;
static char replica_line[LINE_LEN];
static size_t replica_have;

static void lose_replica(const char *why)
{
    printf("replica lost: %s\n", why);
    fflush(stdout);
    close(replica);
    replica = -1;
}

static int connect_to(const char *host, const char *port)
{
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *ai;
    int err = getaddrinfo(host, port, &hints, &ai);
    if (err) {
        fprintf(stderr, "%s: %s\n", host, gai_strerror(err));
        return -1;
    }
    int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen)) {
        perror("connect to replica");
        close(fd);
        fd = -1;
    }
    freeaddrinfo(ai);
    return fd;
}

/* Send one line to the replica and wait for its one-line answer; 0 if it said OK. */
static int replicate(const char *line)
{
    size_t len = strlen(line);
    if (send(replica, line, len, 0) != (ssize_t)len) {
        lose_replica(strerror(errno));
        return -1;
    }
    for (;;) {
        char *end = memchr(replica_line, '\n', replica_have);
        if (end) {
            size_t used = end - replica_line + 1;
            int ok = strncmp(replica_line, "OK", 2) == 0;
            memmove(replica_line, end + 1, replica_have - used);
            replica_have -= used;
            return ok ? 0 : -1;
        }
        if (replica_have == sizeof replica_line) {
            lose_replica("answer too long");
            return -1;
        }
        ssize_t got = recv(replica, replica_line + replica_have, sizeof replica_line - replica_have, 0);
        if (got <= 0) {
            lose_replica(got < 0 ? strerror(errno) : "end of file");
            return -1;
        }
        replica_have += got;
    }
}

static int find(const char *key)
{
    for (int i = 0; i < nkeys; i++)
        if (strcmp(keys[i], key) == 0) return i;
    return -1;
}

/* Answer one request line (without its newline) into out. */
static void answer(char *line, char *out, size_t size)
{
    char *cmd = strtok(line, " ");
    char *key = strtok(NULL, " ");
    char *value = strtok(NULL, "");
    if (cmd && strcmp(cmd, "SET") == 0 && key && value) {
        if (strlen(key) >= KEY_LEN || strlen(value) >= VALUE_LEN) {
            snprintf(out, size, "ERROR too long\n");
            return;
        }
        int i = find(key);
        if (i < 0 && nkeys == MAX_KEYS) {
            snprintf(out, size, "ERROR full\n");
            return;
        }
        if (i < 0) strcpy(keys[i = nkeys++], key);
        strcpy(values[i], value);
        char forward[LINE_LEN];
        snprintf(forward, sizeof forward, "SET %s %s\n", key, value);
        int replicated = replica >= 0 && replicate(forward) == 0;
        snprintf(out, size, replicated || !has_replica ? "OK\n" : "OK unreplicated\n");
    } else if (cmd && strcmp(cmd, "GET") == 0 && key) {
        int i = find(key);
        if (i < 0) snprintf(out, size, "MISSING\n");
        else snprintf(out, size, "VALUE %s\n", values[i]);
    } else if (cmd && strcmp(cmd, "DUMP") == 0) {
        size_t n = 0;
        out[0] = 0;
        for (int i = 0; i < nkeys && n + 2 < size; i++)
            n += snprintf(out + n, size - n, "%s%s=%s", i ? " " : "", keys[i], values[i]);
        if (n + 1 < size) strcat(out, "\n");
    } else {
        snprintf(out, size, "ERROR unknown request\n");
    }
}

int main(int argc, char **argv)
{
    const char *port = argc > 1 ? argv[1] : "6379";
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 16)) {
        perror("kv_server");
        return 1;
    }
    has_replica = argc > 3;
    if (has_replica && (replica = connect_to(argv[2], argv[3])) < 0) return 1;
    printf("listening on %s\n", port);
    fflush(stdout);
    struct pollfd fds[1 + MAX_CLIENTS];
    static char lines[1 + MAX_CLIENTS][LINE_LEN];
    static size_t have[1 + MAX_CLIENTS];
    int n = 1;
    fds[0] = (struct pollfd){.fd = lfd, .events = POLLIN};
    for (;;) {
        if (poll(fds, n, -1) < 0) {
            perror("poll");
            return 1;
        }
        if ((fds[0].revents & POLLIN) && n < 1 + MAX_CLIENTS) {
            int c = accept(lfd, 0, 0);
            if (c >= 0) {
                have[n] = 0;
                fds[n++] = (struct pollfd){.fd = c, .events = POLLIN};
            }
        }
        for (int i = 1; i < n; i++) {
            if (!fds[i].revents) continue;
            ssize_t got = recv(fds[i].fd, lines[i] + have[i], LINE_LEN - have[i], 0);
            int done = got <= 0;
            if (got > 0) have[i] += got;
            char *end;
            while (!done && (end = memchr(lines[i], '\n', have[i]))) {
                *end = 0;
                size_t used = end - lines[i] + 1;
                char out[4096];
                answer(lines[i], out, sizeof out);
                size_t len = strlen(out);
                done = send(fds[i].fd, out, len, 0) != (ssize_t)len;
                memmove(lines[i], lines[i] + used, have[i] - used);
                have[i] -= used;
            }
            if (have[i] == LINE_LEN) done = 1; /* a line too long: this client is done */
            if (!done) continue;
            close(fds[i].fd); /* end of file, or an error: this client is done */
            n--;
            if (i < n) {
                fds[i] = fds[n];
                memcpy(lines[i], lines[n], have[n]);
                have[i] = have[n];
            }
            i--;
        }
    }
}
