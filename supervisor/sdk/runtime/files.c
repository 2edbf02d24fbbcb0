/* files.c - the file system calls of the C guest runtime, served by the
 * Launcher's file device (supervisor/launcher/files.py; docs/abi.md, "File
 * device").
 *
 * Guarantees (docs/sdk.md, "Files"):
 *  - fds 0-2 stay the console (runtime.c); every other fd is the file device's.
 *    A request is the device descriptor's fields plus a NOTIFY: the Launcher has
 *    served it, with a result or -errno, when lguest_notify returns.
 *  - transfers larger than the device's max_io are split into several requests;
 *    a read stops at the first short one (end of file).
 *  - small reads (< RA_DIRECT bytes, as stdio makes) are served from one
 *    read-ahead buffer of RA_SIZE bytes, filled by one request.  The host's file
 *    offset then runs ahead of the guest's; any other file call first puts it
 *    back (ra_drop), so offsets, dup'ed descriptors and snapshots see exactly
 *    what the guest has read.
 *  - one CPU at a time: every call holds files_lock (interrupts off).
 */
#include <lguest.h>

#include <stdint.h>
#include <string.h>

#define LGUEST_DEVICE_FILES 3

#define ENOENT 2
#define EBADF 9
#define EFAULT 14
#define EINVAL 22
#define ENOTDIR 20
#define ENOTTY 25
#define ESPIPE 29
#define ENOSYS 38
#define ENAMETOOLONG 36
#define EOVERFLOW 75

#define AT_FDCWD (-100)
#define AT_SYMLINK_NOFOLLOW 0x100
#define AT_REMOVEDIR 0x200
#define AT_EMPTY_PATH 0x1000
#define O_WRONLY 01
#define O_RDWR 02
#define O_CREAT 0100
#define O_TRUNC 01000
#define O_CLOEXEC 02000000
#define PATH_MAX 4096

enum {
    OP_OPENAT = 1, OP_CLOSE, OP_READ, OP_WRITE, OP_PREAD, OP_PWRITE, OP_LSEEK, OP_STATX,
    OP_FSYNC, OP_FTRUNCATE, OP_UNLINKAT, OP_MKDIRAT, OP_RENAMEAT, OP_GETDENTS64,
    OP_FACCESSAT, OP_GETCWD, OP_CHDIR, OP_DUP, OP_FCNTL, OP_READLINKAT, OP_CHECKFD,
    OP_LOCK = 34, /* after the socket requests (net.c: 22-33) */
};

struct lguest_files {
    uint32_t type, irq;
    uint32_t op;
    int32_t fd;
    uint32_t a[7];
    uint32_t result_lo, result_hi;
    uint32_t max_io; /* Launcher: the largest transfer of one request */
    uint32_t reserved[2];
};
_Static_assert(sizeof(struct lguest_files) == LGUEST_DESC_SIZE, "files layout");

struct iovec32 {
    uint32_t base, len;
};

static struct lguest_files *files_dev;
static int files_looked;
lg_spinlock_t __lguest_files_lock; /* net.c shares the descriptor: one request at a time */
#define files_lock __lguest_files_lock

static int64_t req(uint32_t op, int fd, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                   uint32_t a4, uint32_t a5)
{
    if (!files_looked) {
        files_dev = (struct lguest_files *)lguest_find_device(LGUEST_DEVICE_FILES, 0);
        files_looked = 1;
    }
    volatile struct lguest_files *d = files_dev;
    if (!d) return -ENOSYS;
    d->op = op;
    d->fd = fd;
    d->a[0] = a0, d->a[1] = a1, d->a[2] = a2, d->a[3] = a3, d->a[4] = a4, d->a[5] = a5;
    d->a[6] = 0;
    lguest_notify((const void *)d);
    return (int64_t)(((uint64_t)d->result_hi << 32) | d->result_lo);
}

static uint32_t max_io(void)
{
    uint32_t m = files_dev ? files_dev->max_io : 0;
    return m ? m : 65536;
}

/* ---- read-ahead ---- */
#define RA_SIZE 65536
#define RA_DIRECT 16384
static char ra_buf[RA_SIZE];
static int ra_fd = -1;
static uint32_t ra_pos, ra_len;

/* Put the host's offset back where the guest has read to, and forget the buffer. */
static void ra_drop(void)
{
    if (ra_fd < 0) return;
    int fd = ra_fd;
    uint32_t ahead = ra_len - ra_pos;
    ra_fd = -1;
    ra_pos = ra_len = 0;
    if (ahead) {
        int64_t back = -(int64_t)ahead;
        req(OP_LSEEK, fd, (uint32_t)back, (uint32_t)((uint64_t)back >> 32), 1, 0, 0, 0);
    }
}

/* Copy out of the read-ahead buffer 64 bytes a loop iteration, with 16-byte
 * loads and stores: an emulated CPU pays per basic block, and per store far
 * more than per byte (every store takes the emulator's slow path: see
 * docs/performance.md, "Guest stores"), so the widest stores win. */
typedef uint8_t v16 __attribute__((vector_size(16), aligned(1)));
static void ra_copy(char *dst, const char *src, uint32_t n)
{
    while (n >= 64) {
        v16 a = *(const v16 *)src, b = *(const v16 *)(src + 16);
        v16 c = *(const v16 *)(src + 32), d = *(const v16 *)(src + 48);
        *(v16 *)dst = a, *(v16 *)(dst + 16) = b, *(v16 *)(dst + 32) = c, *(v16 *)(dst + 48) = d;
        src += 64, dst += 64, n -= 64;
    }
    while (n >= 16) {
        *(v16 *)dst = *(const v16 *)src;
        src += 16, dst += 16, n -= 16;
    }
    while (n--) *dst++ = *src++;
}

/* ---- transfers ---- */
static long xfer(uint32_t op, int fd, char *buf, uint32_t len, int64_t off)
{
    uint32_t done = 0, chunk = max_io();
    while (done < len) {
        uint32_t n = len - done < chunk ? len - done : chunk;
        int64_t r;
        if (off < 0)
            r = req(op, fd, (uint32_t)(buf + done), n, 0, 0, 0, 0);
        else {
            uint64_t at = (uint64_t)off + done;
            r = req(op, fd, (uint32_t)(buf + done), n, (uint32_t)at, (uint32_t)(at >> 32), 0, 0);
        }
        if (r < 0) return done ? (long)done : (long)r;
        done += (uint32_t)r;
        if ((uint32_t)r < n) break;
    }
    return (long)done;
}

static long file_read(int fd, char *buf, uint32_t len)
{
    if (!len) return req(OP_CHECKFD, fd, 0, 0, 0, 0, 0, 0) < 0 ? -EBADF : 0;
    uint32_t got = 0;
    if (fd == ra_fd) {
        uint32_t avail = ra_len - ra_pos;
        uint32_t k = len < avail ? len : avail;
        ra_copy(buf, ra_buf + ra_pos, k);
        ra_pos += k;
        got = k;
        if (got == len) return got;
    }
    ra_drop();
    uint32_t rest = len - got;
    if (rest >= RA_DIRECT) {
        long r = xfer(OP_READ, fd, buf + got, rest, -1);
        return r < 0 ? (got ? (long)got : r) : (long)(got + (uint32_t)r);
    }
    int64_t r = req(OP_READ, fd, (uint32_t)ra_buf, RA_SIZE < max_io() ? RA_SIZE : max_io(), 0, 0,
                    0, 0);
    if (r < 0) return got ? (long)got : (long)r;
    ra_fd = fd;
    ra_len = (uint32_t)r;
    ra_pos = 0;
    uint32_t k = rest < ra_len ? rest : ra_len;
    ra_copy(buf + got, ra_buf, k);
    ra_pos = k;
    return (long)(got + k);
}

/* ---- paths ---- */
static long bounded_strlen(const char *p)
{
    if (!p) return -EFAULT;
    for (long i = 0; i < PATH_MAX; i++)
        if (!p[i]) return i;
    return -ENAMETOOLONG;
}

#define PATH(p)                                                                           \
    long p##_len = bounded_strlen((const char *)(p));                                           \
    if (p##_len < 0) return p##_len;                                                      \
    if (p##_len == 0) return -ENOENT

/* ---- stat ---- */
struct statx32 {
    uint32_t mask, blksize;
    uint64_t attributes;
    uint32_t nlink, uid, gid;
    uint16_t mode, pad1;
    uint64_t ino, size, blocks, attributes_mask;
    struct {
        int64_t sec;
        uint32_t nsec;
        int32_t pad;
    } atime, btime, ctime, mtime;
    uint32_t rdev_major, rdev_minor, dev_major, dev_minor;
    uint64_t spare[14];
};
_Static_assert(sizeof(struct statx32) == 256, "statx layout");

static void console_statx(struct statx32 *s)
{
    memset(s, 0, sizeof *s);
    s->mask = 0x7ff;
    s->blksize = 1024;
    s->nlink = 1;
    s->mode = 0020620; /* a character device, like a terminal */
    s->rdev_major = 136;
}

static uint64_t makedev(uint32_t ma, uint32_t mi)
{
    return (uint64_t)(mi & 0xff) | ((uint64_t)(ma & 0xfff) << 8) |
           ((uint64_t)(mi & ~0xffu) << 12) | ((uint64_t)(ma & ~0xfffu) << 32);
}

/* The i386 kernel's struct stat64 (musl's struct kstat), 96 bytes. */
static void to_kstat(const struct statx32 *s, void *out)
{
    uint8_t *k = out;
    memset(k, 0, 96);
    uint64_t dev = makedev(s->dev_major, s->dev_minor), rdev = makedev(s->rdev_major, s->rdev_minor);
    uint32_t mode = s->mode, ino32 = (uint32_t)s->ino, blksize = s->blksize;
    int32_t t[6] = {(int32_t)s->atime.sec, (int32_t)s->atime.nsec, (int32_t)s->mtime.sec,
                    (int32_t)s->mtime.nsec, (int32_t)s->ctime.sec, (int32_t)s->ctime.nsec};
    memcpy(k + 0, &dev, 8);
    memcpy(k + 12, &ino32, 4);
    memcpy(k + 16, &mode, 4);
    memcpy(k + 20, &s->nlink, 12); /* nlink, uid, gid */
    memcpy(k + 32, &rdev, 8);
    memcpy(k + 44, &s->size, 8);
    memcpy(k + 52, &blksize, 4);
    memcpy(k + 56, &s->blocks, 8);
    memcpy(k + 64, t, 24);
    memcpy(k + 88, &s->ino, 8);
}

static long do_statx(int dirfd, const char *path, int flags, struct statx32 *buf)
{
    if (!buf) return -EFAULT;
    long len = bounded_strlen(path);
    if (len < 0) return len;
    if (len == 0 && !(flags & AT_EMPTY_PATH)) return -ENOENT;
    if (len == 0 && dirfd >= 0 && dirfd <= 2) {
        console_statx(buf);
        return 0;
    }
    return (long)req(OP_STATX, dirfd, (uint32_t)path, (uint32_t)len, (uint32_t)flags,
                     (uint32_t)buf, 0, 0);
}

static long do_kstat(int dirfd, const char *path, int flags, void *out)
{
    struct statx32 s;
    if (!out) return -EFAULT;
    long r = do_statx(dirfd, path, flags, &s);
    if (r == 0) to_kstat(&s, out);
    return r;
}

/* ---- fcntl ---- */
#define F_DUPFD 0
#define F_GETFD 1
#define F_SETFD 2
#define F_GETFL 3
#define F_SETFL 4
#define F_GETLK 5
#define F_SETLK 6
#define F_SETLKW 7
#define F_GETLK64 12
#define F_SETLK64 13
#define F_SETLKW64 14
#define F_OFD_GETLK 36
#define F_OFD_SETLK 37
#define F_OFD_SETLKW 38
#define F_DUPFD_CLOEXEC 1030

static long do_fcntl(int fd, int cmd, uint32_t arg, int wide)
{
    if (fd >= 0 && fd <= 2) {
        if (cmd == F_GETFL) return O_RDWR;
        if (cmd == F_GETFD || cmd == F_SETFD || cmd == F_SETFL) return 0;
        return -EINVAL;
    }
    switch (cmd) {
    case F_DUPFD:
    case F_DUPFD_CLOEXEC:
        return (long)req(OP_DUP, fd, arg, cmd == F_DUPFD_CLOEXEC, 0, 0, 0, 0);
    case F_GETFD:
    case F_SETFD:
    case F_GETFL:
    case F_SETFL:
        return (long)req(OP_FCNTL, fd, (uint32_t)cmd, arg, 0, 0, 0, 0);
    case F_GETLK:
    case F_SETLK:
    case F_SETLKW:
        /* struct flock with 32-bit offsets (16 bytes) */
        return (long)req(OP_LOCK, fd, (uint32_t)(cmd - F_GETLK), arg, 0, 0, 0, 0);
    case F_GETLK64:
    case F_SETLK64:
    case F_SETLKW64:
        /* struct flock64 (24 bytes: 64-bit start and length at 4 and 12) */
        return (long)req(OP_LOCK, fd, (uint32_t)(cmd - F_GETLK64), arg, 1, 0, 0, 0);
    case F_OFD_GETLK:
    case F_OFD_SETLK:
    case F_OFD_SETLKW:
        /* locks of the open file description (flock64 through fcntl64) */
        return (long)req(OP_LOCK, fd, (uint32_t)(cmd - F_OFD_GETLK) | 4, arg, wide != 0, 0, 0, 0);
    }
    return -EINVAL;
}

/* ---- the dispatcher's hook ---- */
static long files_call(long nr, long a1, long a2, long a3, long a4, long a5, int *handled);

int __lguest_files_syscall(long nr, long a1, long a2, long a3, long a4, long a5, long *result)
{
    int handled = 1;
    uint32_t was = lg_spin_lock_irqsave(&files_lock);
    long r = files_call(nr, a1, a2, a3, a4, a5, &handled);
    lg_spin_unlock_irqrestore(&files_lock, was);
    *result = r;
    return handled;
}

static long open_at(int dirfd, const char *path, uint32_t flags, uint32_t mode)
{
    PATH(path);
    return (long)req(OP_OPENAT, dirfd, (uint32_t)path, (uint32_t)path_len, flags, mode, 0, 0);
}

static long path_op(uint32_t op, int dirfd, const char *path, uint32_t x, uint32_t y)
{
    PATH(path);
    return (long)req(op, dirfd, (uint32_t)path, (uint32_t)path_len, x, y, 0, 0);
}

static long rename_at(int od, const char *op, int nd, const char *np, uint32_t flags)
{
    PATH(op);
    PATH(np);
    return (long)req(OP_RENAMEAT, od, (uint32_t)op, (uint32_t)op_len, (uint32_t)nd, (uint32_t)np,
                     (uint32_t)np_len, flags);
}

static long readv_files(int fd, const struct iovec32 *iov, int n, int64_t off)
{
    long total = 0;
    if (n < 0 || n > 1024) return -EINVAL;
    for (int i = 0; i < n; i++) {
        long r;
        if (off < 0) r = file_read(fd, (char *)iov[i].base, iov[i].len);
        else r = xfer(OP_PREAD, fd, (char *)iov[i].base, iov[i].len, off + total);
        if (r < 0) return total ? total : r;
        total += r;
        if ((uint32_t)r < iov[i].len) break;
    }
    return total;
}

static long writev_files(int fd, const struct iovec32 *iov, int n, int64_t off)
{
    long total = 0;
    if (n < 0 || n > 1024) return -EINVAL;
    for (int i = 0; i < n; i++) {
        long r = xfer(off < 0 ? OP_WRITE : OP_PWRITE, fd, (char *)iov[i].base, iov[i].len,
                      off < 0 ? -1 : off + total);
        if (r < 0) return total ? total : r;
        total += r;
        if ((uint32_t)r < iov[i].len) break;
    }
    return total;
}

/* The calls files_call serves whatever the fd (beyond read/write/close/ioctl). */
static int file_syscall(long nr)
{
    switch (nr) {
    case 180: case 181: case 333: case 334: case 5: case 8: case 295: case 19: case 140:
    case 383: case 195: case 196: case 197: case 300: case 118: case 148: case 93: case 194:
    case 10: case 40: case 301: case 39: case 296: case 38: case 302: case 353: case 220:
    case 33: case 307: case 439: case 183: case 12: case 133: case 41: case 63: case 330:
    case 55: case 221: case 85: case 305: case 60:
        return 1;
    }
    return 0;
}

static int64_t ll(long lo, long hi) { return (int64_t)(((uint64_t)(uint32_t)hi << 32) | (uint32_t)lo); }

static long files_call(long nr, long a1, long a2, long a3, long a4, long a5, int *handled)
{
    int fd = (int)a1;
    int console = fd >= 0 && fd <= 2;
    switch (nr) {
    case 3: /* read */
        if (console) break;
        if (fd == ra_fd) return file_read(fd, (char *)a2, (uint32_t)a3);
        ra_drop();
        return file_read(fd, (char *)a2, (uint32_t)a3);
    case 145: { /* readv */
        if (console) break;
        if (fd != ra_fd) ra_drop();
        return readv_files(fd, (const struct iovec32 *)a2, (int)a3, -1);
    }
    case 4: /* write */
        if (console) break;
        ra_drop();
        return xfer(OP_WRITE, fd, (char *)a2, (uint32_t)a3, -1);
    case 146: /* writev */
        if (console) break;
        ra_drop();
        return writev_files(fd, (const struct iovec32 *)a2, (int)a3, -1);
    case 6: /* close */
        if (console) break;
        ra_drop(); /* a dup of fd shares its offset: put it back first */
        return (long)req(OP_CLOSE, fd, 0, 0, 0, 0, 0, 0);
    case 54: /* ioctl: a file is not a terminal */
        if (console) break;
        return req(OP_CHECKFD, fd, 0, 0, 0, 0, 0, 0) < 0 ? -EBADF : -ENOTTY;
    }
    if (nr == 3 || nr == 4 || nr == 6 || nr == 54 || nr == 145 || nr == 146) {
        *handled = 0; /* the console's: runtime.c */
        return 0;
    }
    if (!file_syscall(nr)) {
        *handled = 0;
        return 0;
    }
    ra_drop();
    switch (nr) {
    case 180: /* pread64 */
        if (console) return -ESPIPE;
        return xfer(OP_PREAD, fd, (char *)a2, (uint32_t)a3, ll(a4, a5));
    case 181: /* pwrite64 */
        if (console) return -ESPIPE;
        return xfer(OP_PWRITE, fd, (char *)a2, (uint32_t)a3, ll(a4, a5));
    case 333: /* preadv */
        if (console) return -ESPIPE;
        return readv_files(fd, (const struct iovec32 *)a2, (int)a3, ll(a4, a5));
    case 334: /* pwritev */
        if (console) return -ESPIPE;
        return writev_files(fd, (const struct iovec32 *)a2, (int)a3, ll(a4, a5));
    case 5: return open_at(AT_FDCWD, (const char *)a1, (uint32_t)a2, (uint32_t)a3); /* open */
    case 8: /* creat */
        return open_at(AT_FDCWD, (const char *)a1, O_CREAT | O_WRONLY | O_TRUNC, (uint32_t)a2);
    case 295: return open_at(fd, (const char *)a2, (uint32_t)a3, (uint32_t)a4); /* openat */
    case 19: { /* lseek */
        if (console) return -ESPIPE;
        int64_t r = req(OP_LSEEK, fd, (uint32_t)a2, (uint32_t)(a2 < 0 ? -1 : 0), (uint32_t)a3,
                        0, 0, 0);
        if (r > 0x7fffffff) return -EOVERFLOW;
        return (long)r;
    }
    case 140: { /* _llseek(fd, hi, lo, &result, whence) */
        if (console) return -ESPIPE;
        int64_t r = req(OP_LSEEK, fd, (uint32_t)a3, (uint32_t)a2, (uint32_t)a5, 0, 0, 0);
        if (r < 0) return (long)r;
        if (!a4) return -EFAULT;
        *(int64_t *)a4 = r;
        return 0;
    }
    case 383: return do_statx(fd, (const char *)a2, (int)a3, (struct statx32 *)a5); /* statx */
    case 195: return do_kstat(AT_FDCWD, (const char *)a1, 0, (void *)a2);             /* stat64 */
    case 196: return do_kstat(AT_FDCWD, (const char *)a1, AT_SYMLINK_NOFOLLOW, (void *)a2);
    case 197: return do_kstat(fd, "", AT_EMPTY_PATH, (void *)a2); /* fstat64 */
    case 300: return do_kstat(fd, (const char *)a2, (int)a4, (void *)a3); /* fstatat64 */
    case 118: /* fsync */
    case 148: /* fdatasync */
        if (console) return 0;
        return (long)req(OP_FSYNC, fd, nr == 148, 0, 0, 0, 0, 0);
    case 93: /* ftruncate */
        if (console) return -EINVAL;
        return (long)req(OP_FTRUNCATE, fd, (uint32_t)a2, (uint32_t)(a2 < 0 ? -1 : 0), 0, 0, 0, 0);
    case 194: /* ftruncate64 */
        if (console) return -EINVAL;
        return (long)req(OP_FTRUNCATE, fd, (uint32_t)a2, (uint32_t)a3, 0, 0, 0, 0);
    case 10: return path_op(OP_UNLINKAT, AT_FDCWD, (const char *)a1, 0, 0);             /* unlink */
    case 40: return path_op(OP_UNLINKAT, AT_FDCWD, (const char *)a1, AT_REMOVEDIR, 0); /* rmdir */
    case 301: return path_op(OP_UNLINKAT, fd, (const char *)a2, (uint32_t)a3, 0); /* unlinkat */
    case 39: return path_op(OP_MKDIRAT, AT_FDCWD, (const char *)a1, (uint32_t)a2, 0); /* mkdir */
    case 296: return path_op(OP_MKDIRAT, fd, (const char *)a2, (uint32_t)a3, 0); /* mkdirat */
    case 38: /* rename */
        return rename_at(AT_FDCWD, (const char *)a1, AT_FDCWD, (const char *)a2, 0);
    case 302: return rename_at(fd, (const char *)a2, (int)a3, (const char *)a4, 0); /* renameat */
    case 353: /* renameat2 */
        return rename_at(fd, (const char *)a2, (int)a3, (const char *)a4, (uint32_t)a5);
    case 220: /* getdents64 */
        if (console) return -ENOTDIR;
        return (long)req(OP_GETDENTS64, fd, (uint32_t)a2, (uint32_t)a3, 0, 0, 0, 0);
    case 33: return path_op(OP_FACCESSAT, AT_FDCWD, (const char *)a1, (uint32_t)a2, 0); /* access */
    case 307: return path_op(OP_FACCESSAT, fd, (const char *)a2, (uint32_t)a3, 0); /* faccessat */
    case 439: /* faccessat2 */
        return path_op(OP_FACCESSAT, fd, (const char *)a2, (uint32_t)a3, (uint32_t)a4);
    case 183: /* getcwd */
        if (!a1) return -EFAULT;
        return (long)req(OP_GETCWD, 0, (uint32_t)a1, (uint32_t)a2, 0, 0, 0, 0);
    case 12: return path_op(OP_CHDIR, AT_FDCWD, (const char *)a1, 0, 0); /* chdir */
    case 133: /* fchdir */
        if (console) return -ENOTDIR;
        return (long)req(OP_CHDIR, fd, 0, 0, 0, 0, 0, 0);
    case 41: /* dup */
        if (console) return -EINVAL;
        return (long)req(OP_DUP, fd, 0, 0, 0, 0, 0, 0);
    case 63: /* dup2 */
    case 330: /* dup3 */
        if (console) return -EINVAL;
        if (nr == 330 && a1 == a2) return -EINVAL;
        if (nr == 330 && (a3 & ~O_CLOEXEC)) return -EINVAL;
        return (long)req(OP_DUP, fd, (uint32_t)a2, nr == 330 && (a3 & O_CLOEXEC), 1, 0, 0, 0);
    case 55:  /* fcntl */
    case 221: /* fcntl64 */
        return do_fcntl(fd, (int)a2, (uint32_t)a3, nr == 221);
    case 85: /* readlink */
        return path_op(OP_READLINKAT, AT_FDCWD, (const char *)a1, (uint32_t)a2, (uint32_t)a3);
    case 305: /* readlinkat */
        return path_op(OP_READLINKAT, fd, (const char *)a2, (uint32_t)a3, (uint32_t)a4);
    case 60: return 022; /* umask: the host's files get its own umask */
    }
    *handled = 0;
    return 0;
}
