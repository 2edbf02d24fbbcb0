/* readfile: read a file through --dir, with read(2) in 64 KiB blocks ("read")
 * or with stdio fgets ("fgets"); prints "start" before and "bytes N sum S"
 * after, so the host times exactly the reading. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static char buf[1 << 16];

int main(int argc, char **argv)
{
    if (argc < 3) return 2;
    unsigned long long total = 0;
    unsigned sum = 0;
    if (!strcmp(argv[1], "read")) {
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) return 1;
        puts("start");
        fflush(stdout);
        long n;
        while ((n = read(fd, buf, sizeof buf)) > 0) {
            total += (unsigned long long)n;
            sum += (unsigned char)buf[n - 1];
        }
    } else {
        FILE *f = fopen(argv[2], "r");
        if (!f) return 1;
        puts("start");
        fflush(stdout);
        while (fgets(buf, 4096, f)) {
            size_t n = strlen(buf);
            total += n;
            sum += (unsigned char)buf[n - 1];
        }
    }
    printf("bytes %llu sum %u\n", total, sum);
    return 0;
}
