/* fsprobe: a C guest that runs file system commands read from stdin, one per
 * line, and prints one line per command: "ok ..." or "err ENAME".  Built by
 * tests/test_files.py; runs natively too (the same answers on a host). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

static const struct {
    int e;
    const char *name;
} names[] = {
    {ENOENT, "ENOENT"}, {EACCES, "EACCES"}, {EXDEV, "EXDEV"},   {EROFS, "EROFS"},
    {EBADF, "EBADF"},   {EEXIST, "EEXIST"}, {ENOTDIR, "ENOTDIR"}, {EISDIR, "EISDIR"},
    {ELOOP, "ELOOP"},   {EMFILE, "EMFILE"}, {EINVAL, "EINVAL"}, {ENOTTY, "ENOTTY"},
    {ENOTEMPTY, "ENOTEMPTY"}, {EBUSY, "EBUSY"}, {ESTALE, "ESTALE"}, {ENOSYS, "ENOSYS"},
    {EPERM, "EPERM"}, {ENAMETOOLONG, "ENAMETOOLONG"}, {ESPIPE, "ESPIPE"},
};

static void err(void)
{
    for (unsigned i = 0; i < sizeof names / sizeof names[0]; i++)
        if (names[i].e == errno) {
            printf("err %s\n", names[i].name);
            return;
        }
    printf("err %d\n", errno);
}

static int flags_of(const char *s)
{
    int f = 0, acc = O_RDONLY;
    for (; *s; s++) switch (*s) {
        case 'w': acc = acc == O_RDONLY ? O_WRONLY : acc; break;
        case 'b': acc = O_RDWR; break;
        case 'c': f |= O_CREAT; break;
        case 't': f |= O_TRUNC; break;
        case 'a': f |= O_APPEND; break;
        case 'x': f |= O_EXCL; break;
        case 'd': f |= O_DIRECTORY; break;
        case 'n': f |= O_NOFOLLOW; break;
        }
    return f | acc;
}

int main(void)
{
    char line[4096];
    static char buf[1 << 16];
    setvbuf(stdout, 0, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        char *argv[8] = {0};
        int argc = 0;
        for (char *p = strtok(line, " \n"); p && argc < 8; p = strtok(0, " \n")) argv[argc++] = p;
        if (!argc) continue;
        const char *c = argv[0];
        const char *a = argc > 1 ? argv[1] : "", *b = argc > 2 ? argv[2] : "";
        const char *d = argc > 3 ? argv[3] : "";
        long r;
        if (!strcmp(c, "open")) {
            r = open(a, flags_of(b), 0644);
            if (r < 0) err(); else printf("ok %ld\n", r);
        } else if (!strcmp(c, "close")) {
            if (close(atoi(a))) err(); else printf("ok\n");
        } else if (!strcmp(c, "read")) {
            r = read(atoi(a), buf, atoi(b));
            if (r < 0) err(); else printf("ok %ld %.*s\n", r, (int)r, buf);
        } else if (!strcmp(c, "write")) {
            r = write(atoi(a), b, strlen(b));
            if (r < 0) err(); else printf("ok %ld\n", r);
        } else if (!strcmp(c, "pread")) {
            r = pread(atoi(a), buf, atoi(b), atoll(d));
            if (r < 0) err(); else printf("ok %ld %.*s\n", r, (int)r, buf);
        } else if (!strcmp(c, "pwrite")) {
            r = pwrite(atoi(a), b, strlen(b), atoll(d));
            if (r < 0) err(); else printf("ok %ld\n", r);
        } else if (!strcmp(c, "writev")) {
            struct iovec v[2] = {{(void *)b, strlen(b)}, {(void *)d, strlen(d)}};
            r = writev(atoi(a), v, 2);
            if (r < 0) err(); else printf("ok %ld\n", r);
        } else if (!strcmp(c, "seek")) {
            off_t o = lseek(atoi(a), atoll(b), atoi(d));
            if (o < 0) err(); else printf("ok %lld\n", (long long)o);
        } else if (!strcmp(c, "stat") || !strcmp(c, "lstat") || !strcmp(c, "fstat")) {
            struct stat st;
            r = !strcmp(c, "stat") ? stat(a, &st) : !strcmp(c, "lstat") ? lstat(a, &st)
                                                                          : fstat(atoi(a), &st);
            if (r) err();
            else if (S_ISREG(st.st_mode)) printf("ok file %lld\n", (long long)st.st_size);
            else printf("ok %s\n", S_ISDIR(st.st_mode) ? "dir" : S_ISLNK(st.st_mode) ? "link"
                                    : S_ISCHR(st.st_mode) ? "chr" : "other");
        } else if (!strcmp(c, "unlink")) {
            if (unlink(a)) err(); else printf("ok\n");
        } else if (!strcmp(c, "rmdir")) {
            if (rmdir(a)) err(); else printf("ok\n");
        } else if (!strcmp(c, "mkdir")) {
            if (mkdir(a, 0755)) err(); else printf("ok\n");
        } else if (!strcmp(c, "rename")) {
            if (rename(a, b)) err(); else printf("ok\n");
        } else if (!strcmp(c, "link")) {
            if (link(a, b)) err(); else printf("ok\n");
        } else if (!strcmp(c, "symlink")) {
            if (symlink(a, b)) err(); else printf("ok\n");
        } else if (!strcmp(c, "ls")) {
            DIR *dir = opendir(a);
            if (!dir) { err(); continue; }
            struct dirent *e;
            static char names_[64][256];
            int n = 0, k = 0;
            while ((e = readdir(dir))) {
                if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && k < 64)
                    snprintf(names_[k++], 256, "%s", e->d_name);
                n++;
            }
            qsort(names_, k, 256, (int (*)(const void *, const void *))strcmp);
            printf("ok");
            for (int i = 0; i < k; i++) printf(" %s", names_[i]);
            printf(" (%d)\n", n);
            closedir(dir);
        } else if (!strcmp(c, "cwd")) {
            if (!getcwd(buf, sizeof buf)) err(); else printf("ok %s\n", buf);
        } else if (!strcmp(c, "cd")) {
            if (chdir(a)) err(); else printf("ok\n");
        } else if (!strcmp(c, "access")) {
            int m = 0;
            for (const char *p = b; *p; p++) m |= *p == 'r' ? R_OK : *p == 'w' ? W_OK : *p == 'x' ? X_OK : 0;
            if (access(a, m)) err(); else printf("ok\n");
        } else if (!strcmp(c, "dup")) {
            r = dup(atoi(a));
            if (r < 0) err(); else printf("ok %ld\n", r);
        } else if (!strcmp(c, "dup2")) {
            r = dup2(atoi(a), atoi(b));
            if (r < 0) err(); else printf("ok %ld\n", r);
        } else if (!strcmp(c, "getfl")) {
            r = fcntl(atoi(a), F_GETFL);
            if (r < 0) err(); else printf("ok %lo\n", r & (O_ACCMODE | O_APPEND));
        } else if (!strcmp(c, "cloexec")) {
            fcntl(atoi(a), F_SETFD, FD_CLOEXEC);
            r = fcntl(atoi(a), F_GETFD);
            if (r < 0) err(); else printf("ok %ld\n", r);
        } else if (!strcmp(c, "trunc")) {
            if (ftruncate(atoi(a), atoll(b))) err(); else printf("ok\n");
        } else if (!strcmp(c, "fsync")) {
            if (fsync(atoi(a))) err(); else printf("ok\n");
        } else if (!strcmp(c, "isatty")) {
            r = isatty(atoi(a));
            if (!r) err(); else printf("ok\n");
        } else if (!strcmp(c, "readlink")) {
            r = readlink(a, buf, sizeof buf);
            if (r < 0) err(); else printf("ok %.*s\n", (int)r, buf);
        } else if (!strcmp(c, "cat")) { /* stdio: every line of a file, then a count */
            FILE *f = fopen(a, "r");
            if (!f) { err(); continue; }
            int n = 0;
            while (fgets(buf, sizeof buf, f)) n++;
            printf("ok %d lines\n", n);
            fclose(f);
        } else if (!strcmp(c, "put")) { /* stdio: write N lines "line I" */
            FILE *f = fopen(a, "w");
            if (!f) { err(); continue; }
            for (int i = 0; i < atoi(b); i++) fprintf(f, "line %d\n", i);
            if (fclose(f)) err(); else printf("ok\n");
        } else if (!strcmp(c, "openmany")) { /* open until it fails */
            int n = 0;
            while (open(a, O_RDONLY) >= 0) n++;
            printf("opened %d, then ", n);
            err();
        } else if (!strcmp(c, "records")) { /* write 4096-byte records forever */
            int fd = open(a, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd < 0) { err(); continue; }
            printf("ok writing\n");
            for (unsigned i = 0;; i++) {
                memset(buf, 'a' + i % 26, 4096);
                snprintf(buf, 16, "%08u", i);
                buf[8] = '\n';
                if (write(fd, buf, 4096) != 4096) { err(); break; }
            }
        } else if (!strcmp(c, "exit")) {
            return atoi(a);
        } else {
            printf("unknown %s\n", c);
        }
    }
    return 0;
}
