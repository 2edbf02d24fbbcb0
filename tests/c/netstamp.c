/* netstamp: prints the first line of FILE, then serves one TCP connection on PORT:
 * each piece it reads is printed with the CLOCK_MONOTONIC time (ns) it was read at
 * and sent back; the end of the connection ends the guest
 * (tests/test_determinism.py: record and replay of files and connections).
 *
 *     netstamp PORT FILE */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 3) return 2;
    char line[256] = "";
    FILE *f = fopen(argv[2], "r");
    if (!f || !fgets(line, sizeof line, f)) {
        perror("netstamp: file");
        return 1;
    }
    fclose(f);
    line[strcspn(line, "\n")] = 0;
    printf("file: %s at %lld\n", line, now());
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 1)) {
        perror("netstamp: listen");
        return 1;
    }
    printf("listening at %lld\n", now());
    fflush(stdout);
    int c = accept(lfd, 0, 0);
    if (c < 0) {
        perror("netstamp: accept");
        return 1;
    }
    printf("connected at %lld\n", now());
    fflush(stdout);
    static char buf[4096];
    ssize_t got;
    while ((got = read(c, buf, sizeof buf - 1)) > 0) {
        long long t = now();
        buf[got] = 0;
        buf[strcspn(buf, "\n")] = 0;
        printf("got %s at %lld\n", buf, t);
        fflush(stdout);
        if (write(c, buf, strlen(buf)) < 0 || write(c, "\n", 1) != 1) break;
    }
    puts("eof");
    close(c);
    return 0;
}
