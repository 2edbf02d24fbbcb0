/* runtime.c - the C guest runtime: boot, lguest.h's helpers, and the system
 * calls musl makes (the "kernel" a hosted C program needs).
 *
 * Guarantees (docs/sdk.md):
 *  - boot: lguest_data is registered with every hcall_status slot free, the
 *    syscall vector 0x80 and the noirq range of the irq return path; the GDT
 *    has lguest's kernel segments (0x60 code, 0x68 data) and the TLS slots;
 *    every irq has a handler (ignore by default); page faults report NULL
 *    dereferences; page 0 is unmapped once the boot info has been copied.
 *  - main(argc, argv) runs through musl's __libc_start_main: argv[0] is the
 *    image's name, the rest is the command line split at blanks; main's
 *    return value (or exit()'s status) is the power-off status, after stdio
 *    is flushed.
 *  - system calls: read/write/readv/writev on the console (fds 0-2), brk and
 *    anonymous mmap/munmap inside guest memory, clock_gettime (REALTIME,
 *    MONOTONIC, *_CPUTIME = time since boot), nanosleep/clock_nanosleep
 *    (clock event + halt), set_thread_area (TLS), exit/exit_group, signals
 *    sent to self kill the guest; threads (clone, futex, sched_yield,
 *    gettid, a thread's exit) are threads.c's; anything else returns -ENOSYS.
 *  - several CPUs (docs/sdk.md): %fs is each CPU's struct lg_percpu (GDT
 *    entry 9); lg_start_cpu gives a started CPU its own lguest_data, stack
 *    (with a guard page), GDT and musl thread block (errno, TLS); the irq
 *    return path, the clock and halt act on the calling CPU; the console,
 *    block device and brk/mmap/munmap are serialised by runtime spinlocks.
 */
#include <lguest.h>

#include <stdint.h>
#include <string.h>

#define PAGE_SIZE 4096u
#define ENOSYS 38
#define EBADF 9
#define EFAULT 14
#define EINVAL 22
#define ENOMEM 12
#define ENOTTY 25

/* ---- state ---- */
static void random_fill(void *buf, uint32_t len);
struct lguest_data lguest_data __attribute__((aligned(16)));
static struct lguest_boot_info boot_copy;
const struct lguest_boot_info *const lguest_boot_info = &boot_copy;
static char cmdline_copy[2048];
static char argv_buf[2048]; /* the command line again, cut into argv */
static uint64_t gdt[LGUEST_GDT_ENTRIES] __attribute__((aligned(8)));
static lguest_irq_handler irq_handlers[LGUEST_IRQS];

extern char __lguest_irq_stubs[], __lguest_noirq_start[], __lguest_noirq_end[];
extern char __lguest_int80[], __lguest_pf_entry[], __lguest_vsyscall[];
extern char _end[], __lguest_text_start[], __lguest_text_end[];
#define PTE_USER 4u
#define CR4_SMEP (1u << 20)
/* CPU 0's stack (runtime-placed at the top of free memory) and the unmapped
 * page below it. */
uint32_t __lguest_stack_guard_page, __lguest_stack_top;
extern char __tdata_start[], __tdata_end[], __tbss_end[];
extern char __lguest_tls_align[];
/* The image's name (argv[0]); `supervisor build` defines it. */
__attribute__((weak)) const char __lguest_progname[] = "guest";

extern char __lguest_secondary_entry[];

/* ---- several CPUs: CPU n's struct lg_percpu is %fs's segment (GDT entry
 * LGUEST_GDT_ENTRY_PERCPU of CPU n's own GDT: CPU 0's is `gdt`); CPU 0's
 * lguest_data is `lguest_data`, the others' are in cpu_data. ---- */
static struct lg_percpu percpu[LG_MAX_CPUS] __attribute__((aligned(64)));
static struct lguest_data cpu_data[LG_MAX_CPUS - 1] __attribute__((aligned(16)));
static uint64_t cpu_gdt[LG_MAX_CPUS - 1][LGUEST_GDT_ENTRIES] __attribute__((aligned(8)));
static uint32_t tls_selector; /* %gs as musl loaded it on CPU 0 (0: no TLS) */
static lg_spinlock_t mem_lock, console_lock, block_lock, start_lock;

/* threads.c */
int lg_thread_syscall(const long *frame, long *result);
int lg_thread_sleep(uint64_t deadline);
void lg_thread_clock(void);
void __lguest_net_irq(unsigned irq); /* net.c */

int main();
int __libc_start_main(int (*)(), int, char **, void (*)(void), void (*)(void),
                      void (*)(void));

/* ---- small helpers ---- */
static void set_gate(unsigned vector, const void *handler, uint32_t type_dpl)
{
    uint32_t h = (uint32_t)handler;
    lguest_hcall(LHCALL_LOAD_IDT_ENTRY, vector, (LGUEST_KERNEL_CS << 16) | (h & 0xffff),
                 (h & 0xffff0000u) | type_dpl);
}

static void crash_hex(const char *what, uint32_t a, const char *mid, uint32_t b)
{
    static char buf[128];
    static const char hex[] = "0123456789abcdef";
    char *p = buf;
    while (*what) *p++ = *what++;
    *p++ = '0', *p++ = 'x';
    for (int i = 28; i >= 0; i -= 4) *p++ = hex[(a >> i) & 15];
    while (*mid) *p++ = *mid++;
    *p++ = '0', *p++ = 'x';
    for (int i = 28; i >= 0; i -= 4) *p++ = hex[(b >> i) & 15];
    *p++ = ')';
    *p = 0;
    lguest_crash(buf);
}

void lguest_poweroff(int status)
{
    for (;;) lguest_hcall(LHCALL_SHUTDOWN, (unsigned long)"power off",
                          LGUEST_SHUTDOWN_POWEROFF, (unsigned long)status);
}

void lguest_crash(const char *reason)
{
    for (;;) lguest_hcall(LHCALL_SHUTDOWN, (unsigned long)reason, LGUEST_SHUTDOWN_CRASH, 0);
}

const char *lguest_cmdline(void) { return cmdline_copy; }

/* ---- interrupts ---- */
void __lguest_irq_dispatch(unsigned irq)
{
    if (irq == LGUEST_CLOCK_IRQ) lg_percpu()->clock_fired = 1;
    if (irq < LGUEST_IRQS && irq_handlers[irq]) irq_handlers[irq](irq);
    if (irq == LGUEST_CLOCK_IRQ) lg_thread_clock(); /* threads.c: time slices */
    __lguest_net_irq(irq); /* net.c: wakes threads waiting for the network */
}

int lguest_set_irq_handler(unsigned irq, lguest_irq_handler handler)
{
    if (irq >= LGUEST_IRQS) return -1;
    irq_handlers[irq] = handler;
    return 0;
}

void lguest_halt(void)
{
    struct lguest_data *d = lg_cpu_data();
    uint32_t was = d->irq_enabled;
    lguest_hcall(LHCALL_HALT, 0, 0, 0);
    lg_cpu_data()->irq_enabled = was; /* this CPU's: a thread may have moved */
}

static uint32_t set_pte(uint32_t va, uint32_t pte);
static uint32_t *pte_slot(uint32_t va);

/* An instruction fetch from a present user page (error code bits 1 present
 * and 16 fetch, with CR4.SMEP set by protect_code): the page becomes a
 * supervisor one, which the CPU may run code from, and the fetch is retried.
 * Code outside .text (a trampoline on the stack, code a program wrote) runs
 * as before; only its page keeps the slower stores of a code page.  Returns 0
 * if the fault is anything else. */
static int make_executable(uint32_t error, uint32_t va)
{
    if ((error & 0x11) != 0x11 || va < PAGE_SIZE) return 0;
    uint32_t *slot = pte_slot(va);
    if (!slot || !(*slot & 1)) return 0;
    if (*slot & PTE_USER) set_pte(va & ~(PAGE_SIZE - 1), *slot & ~PTE_USER);
    else lguest_hcall(LHCALL_FLUSH_TLB, 0, 0, 0); /* another CPU made it executable */
    return 1;
}

/* Any other page fault kills the guest with a reason naming the access (a
 * NULL dereference: an access to page 0); error code bits: 1 present, 2
 * write.  Returns (to crt0's __lguest_pf_entry, which resumes the faulting
 * instruction) only for make_executable's faults. */
void __lguest_page_fault(uint32_t error, uint32_t eip)
{
    uint32_t cr2 = lg_cpu_data()->cr2;
    if (make_executable(error, cr2)) return;
    const char *kind = (error & 2) ? "write" : "read";
    if (cr2 < PAGE_SIZE) {
        crash_hex((error & 2) ? "NULL pointer dereference: write at "
                              : "NULL pointer dereference: read at ",
                  cr2, " (eip ", eip);
    }
    (void)kind;
    if (cr2 - __lguest_stack_guard_page < PAGE_SIZE)
        crash_hex("stack overflow: access at ", cr2, " (eip ", eip);
    crash_hex((error & 16) ? "page fault: instruction fetch at "
               : (error & 2) ? "page fault: write at "
                             : "page fault: read at ",
              cr2, " (eip ", eip);
}

/* ---- clocks ---- */
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* The clocks' hot path is always inlined and uses neither division nor jump
 * tables: under emulation a `div` costs hundreds of ns, a return or an
 * indirect jump a trip through the emulator's block lookup; a multiply is
 * as cheap as an add. */
#define HOT static inline __attribute__((always_inline))

/* The high 64 bits of a * b (32-bit multiplies). */
HOT uint64_t mulhi64(uint64_t a, uint64_t b)
{
    uint32_t al = (uint32_t)a, ah = (uint32_t)(a >> 32), bl = (uint32_t)b, bh = (uint32_t)(b >> 32);
    uint64_t ll = (uint64_t)al * bl, lh = (uint64_t)al * bh, hl = (uint64_t)ah * bl;
    uint64_t mid = (ll >> 32) + (uint32_t)lh + (uint32_t)hl;
    return (uint64_t)ah * bh + (lh >> 32) + (hl >> 32) + (mid >> 32);
}

/* n / 10^9 and n % 10^9, for any n: (n >> 9) / 1953125 as a multiply by
 * ceil(2^75 / 1953125), exact for every n >> 9 < 2^55. */
HOT uint64_t div_1e9(uint64_t n, uint32_t *rem)
{
    uint64_t q = mulhi64(n >> 9, 0x44b82fa09b5a53ull) >> 11;
    *rem = (uint32_t)(n - q * 1000000000u);
    return q;
}

/* TSC ticks to ns is tsc * mult >> shift, with mult < 2^32 from tsc_khz
 * (Linux's clocksource scaling): one 8-byte word {mult, shift, khz} that any
 * CPU may refresh, recomputed (a division) only when tsc_khz changes, e.g.
 * on a restore on another host.  mult's rounding is a few parts in 10^10,
 * far below tsc_khz's own kHz resolution. */
uint64_t tsc_scale; /* crt0.S's __clock_gettime64 reads it too */

static __attribute__((noinline)) uint64_t tsc_scale_for(uint32_t khz)
{
    uint32_t shift = 32;
    while (shift && ((uint64_t)1000000u << shift) / khz >= (1ull << 32)) shift--;
    uint64_t mult = ((uint64_t)1000000u << shift) / khz;
    uint64_t scale = mult << 32 | (uint64_t)shift << 26 | khz;
    __atomic_store_n(&tsc_scale, scale, __ATOMIC_RELAXED);
    return scale;
}

HOT uint64_t mono_ns(void)
{
    uint64_t tsc = rdtsc();
    uint32_t khz = lguest_data.tsc_khz ? lguest_data.tsc_khz : 1000000;
    uint64_t scale = __atomic_load_n(&tsc_scale, __ATOMIC_RELAXED);
    if ((uint32_t)(scale & 0x3ffffff) != khz) scale = tsc_scale_for(khz);
    uint32_t mult = (uint32_t)(scale >> 32), shift = (uint32_t)(scale >> 26) & 63;
    uint64_t lo = (uint64_t)(uint32_t)tsc * mult, hi = (uint64_t)(uint32_t)(tsc >> 32) * mult;
    if (__builtin_expect(shift == 32, 1)) return hi + (lo >> 32); /* a TSC above 1 GHz */
    return (hi << (32 - shift)) + (lo >> shift);
}

uint64_t lguest_monotonic_ns(void) { return mono_ns(); }

static uint64_t boot_ns;       /* monotonic time at boot */
static int64_t realtime_offset; /* realtime = monotonic + offset (8-byte atomic: any CPU) */

HOT uint64_t host_realtime_ns(void)
{
    struct lguest_data *d = lg_cpu_data(); /* this CPU's: refreshed when it runs */
    uint32_t s, ns;
    do {
        s = *(volatile uint32_t *)&d->time.tv_sec;
        ns = *(volatile uint32_t *)&d->time.tv_nsec;
    } while (s != *(volatile uint32_t *)&d->time.tv_sec);
    return (uint64_t)s * 1000000000u + ns;
}

/* The Host refreshes lguest_data.time whenever it (re)enters the guest, so
 * between refreshes it lags; the realtime clock runs on the monotonic one
 * and re-syncs when they drift more than 50 ms apart (e.g. after a restore). */
HOT uint64_t realtime_ns(void)
{
    uint64_t mono = mono_ns();
    int64_t host = (int64_t)host_realtime_ns();
    int64_t ours = (int64_t)mono + __atomic_load_n(&realtime_offset, __ATOMIC_RELAXED);
    int64_t diff = ours - host;
    if (diff > 50000000 || diff < -50000000) {
        __atomic_store_n(&realtime_offset, host - (int64_t)mono, __ATOMIC_RELAXED);
        ours = host;
    }
    return (uint64_t)ours;
}

#define CLOCK_REALTIME 0
#define CLOCK_MONOTONIC 1
#define CLOCK_PROCESS_CPUTIME_ID 2
#define CLOCK_THREAD_CPUTIME_ID 3
#define CLOCK_MONOTONIC_RAW 4
#define CLOCK_REALTIME_COARSE 5
#define CLOCK_MONOTONIC_COARSE 6
#define CLOCK_BOOTTIME 7

HOT int clock_ns(int clk, uint64_t *out)
{
    if (clk == CLOCK_REALTIME || clk == CLOCK_REALTIME_COARSE) {
        *out = realtime_ns();
    } else if (clk == CLOCK_MONOTONIC || clk == CLOCK_MONOTONIC_RAW ||
               clk == CLOCK_MONOTONIC_COARSE || clk == CLOCK_BOOTTIME) {
        *out = mono_ns();
    } else if (clk == CLOCK_PROCESS_CPUTIME_ID || clk == CLOCK_THREAD_CPUTIME_ID) {
        *out = mono_ns() - boot_ns;
    } else {
        return -EINVAL;
    }
    return 0;
}

/* Sleep until the monotonic clock reaches `deadline`: clock event + halt. */
static void sleep_until(uint64_t deadline)
{
    if (lg_thread_sleep(deadline)) return; /* threads.c: the thread waits, not the CPU */
    for (;;) {
        uint64_t now = lguest_monotonic_ns();
        if (now >= deadline) break;
        uint64_t delta = deadline - now;
        if (delta > 0x7fffffffu) delta = 0x7fffffffu;
        if (delta < 100) delta = 100;
        struct lg_percpu *me = lg_percpu(); /* the clock and its irq are per CPU */
        me->clock_fired = 0;
        lguest_set_clockevent((unsigned long)delta);
        while (!me->clock_fired) lguest_halt();
    }
}

/* ---- devices ---- */
struct lguest_device_desc *lguest_find_device(uint32_t type, unsigned index)
{
    uint32_t n = boot_copy.device_count;
    if (n > LGUEST_MAX_DEVICES) n = LGUEST_MAX_DEVICES;
    struct lguest_device_desc *d = (struct lguest_device_desc *)boot_copy.device_page;
    for (uint32_t i = 0; i < n; i++) {
        if (d[i].type == type && index-- == 0) return &d[i];
    }
    return 0;
}

static struct lguest_console *console;
static struct lguest_block *block;
struct lguest_console *lguest_console(void) { return console; }
struct lguest_block *lguest_block(void) { return block; }

/* Output on `stream` (LGUEST_STDOUT or LGUEST_STDERR: the tag the Launcher
 * routes by). */
static void console_write(uint32_t stream, const void *buf, size_t len)
{
    volatile struct lguest_console *c = console;
    if (!c || !len) return;
    uint32_t was = lg_spin_lock_irqsave(&console_lock); /* one descriptor for all CPUs */
    c->out_stream = stream;
    c->out_addr = (uint32_t)buf;
    c->out_len = len;
    lguest_notify((const void *)c);
    lg_spin_unlock_irqrestore(&console_lock, was);
}

void lguest_console_write(const void *buf, size_t len) { console_write(LGUEST_STDOUT, buf, len); }

static char rx_buf[1024];
static uint32_t rx_pos, rx_len;
static int rx_armed, rx_eof;

/* Wait until console input is buffered (returns 1) or input has ended (0). */
static int console_wait_input(void)
{
    volatile struct lguest_console *c = console;
    if (!c) return 0;
    for (;;) {
        if (rx_pos < rx_len) return 1;
        if (rx_eof) return 0;
        if (!rx_armed) {
            c->in_addr = (uint32_t)rx_buf;
            c->in_size = sizeof rx_buf;
            c->in_len = 0;
            rx_armed = 1;
            lguest_notify((const void *)c);
        }
        uint32_t got = c->in_len;
        if (got) {
            if (got > sizeof rx_buf) got = sizeof rx_buf; /* never trust in_len */
            rx_pos = 0;
            rx_len = got;
            c->in_size = 0; /* disarmed: the Launcher must not refill rx_buf while it is read */
            c->in_len = 0;  /* consumed; re-armed when empty */
            rx_armed = 0;
            continue;
        }
        if (c->flags & LGUEST_CONSOLE_EOF) {
            rx_eof = 1;
            continue;
        }
        lguest_halt();
    }
}

/* For poll and select (net.c): 1 if a read of fd 0 would not wait (input
 * buffered, or ended); otherwise arms the input buffer so that input raises the
 * console irq, and returns 0. */
int __lguest_console_readable(void)
{
    volatile struct lguest_console *c = console;
    if (!c || rx_pos < rx_len || rx_eof) return 1;
    if (!rx_armed) {
        c->in_addr = (uint32_t)rx_buf;
        c->in_size = sizeof rx_buf;
        c->in_len = 0;
        rx_armed = 1;
        lguest_notify((const void *)c);
    }
    return c->in_len != 0 || (c->flags & LGUEST_CONSOLE_EOF) != 0;
}

long lguest_console_read(void *buf, size_t size)
{
    if (!size) return 0;
    if (!console_wait_input()) return 0;
    uint32_t n = rx_len - rx_pos;
    if (n > size) n = size;
    memcpy(buf, rx_buf + rx_pos, n);
    rx_pos += n;
    return n;
}

static int block_io(struct lguest_block *dev, uint32_t cmd, uint32_t sector, uint32_t count,
                    const void *buf)
{
    volatile struct lguest_block *b = dev;
    if (!b) return LGUEST_BLOCK_IOERR;
    uint32_t was = lg_spin_lock_irqsave(&block_lock);
    b->command = cmd;
    b->sector = sector;
    b->count = count;
    b->buffer = (uint32_t)buf;
    lguest_notify((const void *)b);
    int status = b->status;
    lg_spin_unlock_irqrestore(&block_lock, was);
    return status;
}

int lguest_block_read(struct lguest_block *dev, uint32_t sector, uint32_t count, void *buf)
{
    return block_io(dev, LGUEST_BLOCK_READ, sector, count, buf);
}

int lguest_block_write(struct lguest_block *dev, uint32_t sector, uint32_t count,
                       const void *buf)
{
    return block_io(dev, LGUEST_BLOCK_WRITE, sector, count, buf);
}

/* ---- memory: brk grows up from the end of the image, mmap takes pages from
 * the top of free memory; a bitmap (at the heap's start) says which pages of
 * [heap_lo, heap_hi) are in use. ---- */
static uint32_t heap_lo, heap_hi, brk_cur;
static uint8_t *page_map;
static uint32_t heap_pages;

static int page_used(uint32_t i) { return page_map[i >> 3] >> (i & 7) & 1; }
static void page_set(uint32_t i, int used)
{
    if (used) page_map[i >> 3] |= (uint8_t)(1u << (i & 7));
    else page_map[i >> 3] &= (uint8_t)~(1u << (i & 7));
}

static void heap_init(uint32_t hi)
{
    uint32_t lo = ((uint32_t)_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
    if (hi <= lo) hi = lo;
    uint32_t pages = (hi - lo) / PAGE_SIZE;
    uint32_t map_bytes = (pages + 7) / 8;
    uint32_t map_pages = (map_bytes + PAGE_SIZE - 1) / PAGE_SIZE;
    if (map_pages >= pages) map_pages = pages;
    page_map = (uint8_t *)lo;
    memset(page_map, 0, map_pages * PAGE_SIZE);
    heap_lo = lo + map_pages * PAGE_SIZE;
    heap_hi = hi;
    heap_pages = (hi - heap_lo) / PAGE_SIZE;
    brk_cur = heap_lo;
}

static long sys_brk(uint32_t want)
{
    if (want < heap_lo || want > heap_hi) return brk_cur;
    uint32_t old_top = (brk_cur - heap_lo + PAGE_SIZE - 1) / PAGE_SIZE;
    uint32_t new_top = (want - heap_lo + PAGE_SIZE - 1) / PAGE_SIZE;
    if (new_top > old_top) {
        for (uint32_t i = old_top; i < new_top; i++)
            if (page_used(i)) return brk_cur;
        for (uint32_t i = old_top; i < new_top; i++) page_set(i, 1);
        memset((void *)(heap_lo + old_top * PAGE_SIZE), 0, (new_top - old_top) * PAGE_SIZE);
    } else {
        for (uint32_t i = new_top; i < old_top; i++) page_set(i, 0);
    }
    brk_cur = want;
    return brk_cur;
}

#define MAP_FIXED 0x10
#define MAP_ANONYMOUS 0x20

static long sys_mmap(uint32_t addr, uint32_t len, uint32_t flags, int fd)
{
    (void)addr;
    if (!(flags & MAP_ANONYMOUS) || (flags & MAP_FIXED) || fd != -1) return -ENOSYS;
    if (!len) return -EINVAL;
    uint32_t n = (len + PAGE_SIZE - 1) / PAGE_SIZE;
    if (n > heap_pages) return -ENOMEM;
    uint32_t floor = (brk_cur - heap_lo + PAGE_SIZE - 1) / PAGE_SIZE;
    uint32_t run = 0;
    for (uint32_t i = heap_pages; i-- > floor;) {
        run = page_used(i) ? 0 : run + 1;
        if (run == n) {
            for (uint32_t j = i; j < i + n; j++) page_set(j, 1);
            void *p = (void *)(heap_lo + i * PAGE_SIZE);
            memset(p, 0, n * PAGE_SIZE);
            return (long)p;
        }
    }
    return -ENOMEM;
}

static long sys_munmap(uint32_t addr, uint32_t len)
{
    if (addr & (PAGE_SIZE - 1)) return -EINVAL;
    uint32_t end = addr + len;
    if (end < addr) return -EINVAL;
    for (uint32_t a = addr; a < end; a += PAGE_SIZE) {
        if (a < heap_lo || a >= heap_hi) continue;
        uint32_t i = (a - heap_lo) / PAGE_SIZE;
        if (heap_lo + i * PAGE_SIZE >= brk_cur) page_set(i, 0); /* never the brk heap */
    }
    return 0;
}

/* ---- TLS: set_thread_area writes a descriptor into a GDT TLS slot and
 * tells the Host (LHCALL_LOAD_TLS), as lguest's guest kernel does. ---- */
struct user_desc {
    int32_t entry_number;
    uint32_t base_addr;
    uint32_t limit;
    uint32_t flags; /* seg_32bit:1 contents:2 read_exec_only:1 limit_in_pages:1
                       seg_not_present:1 useable:1 */
};

static long sys_set_thread_area(struct user_desc *u)
{
    if (!u) return -EFAULT;
    int32_t e = u->entry_number;
    if (e == -1) e = LGUEST_GDT_ENTRY_TLS_MIN;
    if (e < LGUEST_GDT_ENTRY_TLS_MIN || e >= LGUEST_GDT_ENTRY_TLS_MIN + 3) return -EINVAL;
    uint32_t base = u->base_addr, limit = u->limit, f = u->flags;
    uint32_t lo = (limit & 0xffff) | (base << 16);
    uint32_t hi = ((base >> 16) & 0xff) | (base & 0xff000000u) | (limit & 0xf0000);
    hi |= ((f >> 3) & 1 ? 0x0 : 0x200);   /* writable unless read_exec_only */
    hi |= ((f >> 1) & 3) << 10;           /* contents: expand-down / code bits */
    hi |= 0x1000 | (3 << 13);             /* S = 1, DPL 3 */
    hi |= ((f >> 5) & 1) ? 0 : 0x8000;    /* present */
    hi |= ((f >> 6) & 1) << 20;           /* AVL (useable) */
    hi |= (f & 1) << 22;                  /* D/B: 32-bit */
    hi |= ((f >> 4) & 1) << 23;           /* G: limit in pages */
    uint32_t cpu = lg_cpu_id();
    uint64_t *g = cpu ? cpu_gdt[cpu - 1] : gdt; /* this CPU's own GDT */
    g[e] = ((uint64_t)hi << 32) | lo;
    u->entry_number = e;
    lg_percpu()->tp = base;
    if (!cpu) tls_selector = ((uint32_t)e << 3) | 3; /* musl's %gs, given to every CPU */
    lguest_hcall(LHCALL_LOAD_TLS, (unsigned long)&g[LGUEST_GDT_ENTRY_TLS_MIN], 0, 0);
    return 0;
}

/* ---- system calls (i386 numbers) ---- */
struct iovec32 {
    uint32_t base, len;
};

static long sys_write(int fd, const void *buf, uint32_t len)
{
    if (fd < 1 || fd > 2) return -EBADF;
    console_write(fd == 2 ? LGUEST_STDERR : LGUEST_STDOUT, buf, len);
    return len;
}

static long sys_writev(int fd, const struct iovec32 *iov, int n)
{
    if (fd < 1 || fd > 2) return -EBADF;
    long total = 0;
    for (int i = 0; i < n; i++) {
        console_write(fd == 2 ? LGUEST_STDERR : LGUEST_STDOUT, (const void *)iov[i].base,
                      iov[i].len);
        total += iov[i].len;
    }
    return total;
}

static long sys_readv(int fd, const struct iovec32 *iov, int n)
{
    if (fd != 0) return -EBADF;
    long total = 0;
    int i = 0;
    while (i < n && !iov[i].len) i++;
    if (i == n) return 0;
    if (!console_wait_input()) return 0;
    for (; i < n; i++) {
        uint32_t avail = rx_len - rx_pos;
        if (!avail) break;
        uint32_t k = iov[i].len < avail ? iov[i].len : avail;
        memcpy((void *)iov[i].base, rx_buf + rx_pos, k);
        rx_pos += k;
        total += k;
    }
    return total;
}

HOT long put_timespec(int clk, void *ts, int wide)
{
    uint64_t ns;
    int r = clock_ns(clk, &ns);
    if (r) return r;
    if (!ts) return -EFAULT;
    uint32_t sub;
    uint64_t sec = div_1e9(ns, &sub);
    if (wide) {
        int64_t *t = ts;
        t[0] = (int64_t)sec;
        t[1] = sub;
    } else {
        int32_t *t = ts;
        t[0] = (int32_t)sec;
        t[1] = (int32_t)sub;
    }
    return 0;
}

/* ---- clocks without a trap: musl's time64 entry points (what <time.h> and
 * <sys/time.h> name clock_gettime, gettimeofday and time on i386) defined
 * here, as a vDSO would: one call, no system call.  Library code that calls
 * musl's internal __clock_gettime still reaches the dispatcher (same clocks). */
int *__errno_location(void) __attribute__((weak)); /* musl's; none in gcc-fallback builds */

/* crt0.S's __clock_gettime64 does the monotonic clocks itself and comes
 * here for the rest. */
int __lguest_clock_gettime(int clk, void *ts)
{
    long r = put_timespec(clk, ts, 1); /* struct timespec: int64 sec, long nsec, pad */
    if (r) {
        if (__errno_location) *__errno_location() = (int)-r;
        return -1;
    }
    return 0;
}

int __gettimeofday_time64(void *tv, void *tz)
{
    (void)tz;
    if (tv) { /* struct timeval: int64 sec, int64 usec */
        uint32_t sub;
        ((int64_t *)tv)[0] = (int64_t)div_1e9(realtime_ns(), &sub);
        ((int64_t *)tv)[1] = sub / 1000u;
    }
    return 0;
}

int64_t __time64(int64_t *t)
{
    uint32_t sub;
    int64_t now = (int64_t)div_1e9(realtime_ns(), &sub);
    if (t) *t = now;
    return now;
}

#define TIMER_ABSTIME 1
static long sys_nanosleep(int clk, int flags, const void *req, void *rem, int wide)
{
    if (!req) return -EFAULT;
    int64_t sec, nsec;
    if (wide) {
        const int64_t *t = req;
        sec = t[0], nsec = t[1];
    } else {
        const int32_t *t = req;
        sec = t[0], nsec = t[1];
    }
    if (sec < 0 || nsec < 0 || nsec >= 1000000000) return -EINVAL;
    uint64_t now;
    int r = clock_ns(clk, &now);
    if (r) return r;
    uint64_t want = (uint64_t)sec * 1000000000u + (uint64_t)nsec;
    uint64_t delta = (flags & TIMER_ABSTIME) ? (want > now ? want - now : 0) : want;
    sleep_until(lguest_monotonic_ns() + delta);
    if (rem && !(flags & TIMER_ABSTIME)) {
        if (wide) ((int64_t *)rem)[0] = ((int64_t *)rem)[1] = 0;
        else ((int32_t *)rem)[0] = ((int32_t *)rem)[1] = 0;
    }
    return 0;
}

static const char *const signal_names[] = {
    [1] = "SIGHUP", [2] = "SIGINT", [3] = "SIGQUIT", [4] = "SIGILL", [5] = "SIGTRAP",
    [6] = "SIGABRT", [7] = "SIGBUS", [8] = "SIGFPE", [9] = "SIGKILL", [11] = "SIGSEGV",
    [13] = "SIGPIPE", [14] = "SIGALRM", [15] = "SIGTERM",
};

static long sys_kill_self(int sig)
{
    static char buf[48] = "killed by signal ";
    if (sig == 0) return 0;
    char *p = buf + 17;
    const char *name = (sig > 0 && sig < 16) ? signal_names[sig] : 0;
    if (name) {
        while (*name) *p++ = *name++;
    } else {
        if (sig >= 10) *p++ = (char)('0' + sig / 10 % 10);
        *p++ = (char)('0' + sig % 10);
    }
    *p = 0;
    lguest_crash(buf);
}

#define TIOCGWINSZ 0x5413
/* brk, mmap and munmap share the page bitmap: one CPU at a time. */
#define MEM_LOCKED(call)                                                                  \
    ({                                                                                    \
        uint32_t was_ = lg_spin_lock_irqsave(&mem_lock);                                  \
        long r_ = (call);                                                                 \
        lg_spin_unlock_irqrestore(&mem_lock, was_);                                       \
        r_;                                                                               \
    })

/* System calls served so far (tests read it: the clocks must not add to it). */
unsigned long __lguest_syscalls;
int __lguest_files_syscall(long, long, long, long, long, long, long *); /* files.c */
int __lguest_net_syscall(long, long, long, long, long, long, long, long *); /* net.c */

long __lguest_syscall(long nr, long a1, long a2, long a3, long a4, long a5, long a6)
{
    long files_result;
    __lguest_syscalls++;
    long r;
    /* threads.c: clone, futex, ...; it reads the arguments where crt0 pushed
     * them (the frame pointer this forces: saved ebp, return address, nr). */
    if (lg_thread_syscall((const long *)__builtin_frame_address(0) + 2, &r)) return r;
    if (__lguest_net_syscall(nr, a1, a2, a3, a4, a5, a6, &files_result)) return files_result;
    if (__lguest_files_syscall(nr, a1, a2, a3, a4, a5, &files_result)) return files_result;
    switch (nr) {
    case 1:   /* exit */
    case 252: /* exit_group */
        lguest_poweroff(a1 & 0xff);
    case 3: { /* read */
        if (a1 != 0) return -EBADF;
        struct iovec32 v = {(uint32_t)a2, (uint32_t)a3};
        return sys_readv(0, &v, 1);
    }
    case 4: return sys_write(a1, (const void *)a2, a3);
    case 6: return (a1 >= 0 && a1 <= 2) ? 0 : -EBADF; /* close */
    case 13: { /* time */
        uint32_t sub;
        int32_t t = (int32_t)div_1e9(realtime_ns(), &sub);
        if (a1) *(int32_t *)a1 = t;
        return t;
    }
    case 20:  /* getpid */
    case 224: /* gettid */
        return 1;
    case 24:  /* getuid */
    case 47:  /* getgid */
    case 49:  /* geteuid */
    case 50:  /* getegid */
    case 199: /* getuid32 */
    case 200: /* getgid32 */
    case 201: /* geteuid32 */
    case 202: /* getegid32 */
        return 0; /* the guest's only user: root, as in a container */
    case 37:  /* kill */
        return (a1 == 1 || a1 == 0) ? sys_kill_self(a2) : -ENOSYS;
    case 238: /* tkill */
        return a1 == 1 ? sys_kill_self(a2) : -ENOSYS;
    case 270: /* tgkill */
        return (a1 == 1 && a2 == 1) ? sys_kill_self(a3) : -ENOSYS;
    case 45: return MEM_LOCKED(sys_brk(a1));
    case 54: /* ioctl: output is a terminal (line buffered); input if the Launcher says so */
        if (a1 < 0 || a1 > 2) return -EBADF;
        if (a1 == 0 && !(console && (((volatile struct lguest_console *)console)->flags &
                                      LGUEST_CONSOLE_INPUT_TTY)))
            return -ENOTTY;
        if (a2 == TIOCGWINSZ && a3) {
            uint16_t *ws = (uint16_t *)a3;
            ws[0] = 24, ws[1] = 80, ws[2] = ws[3] = 0;
            return 0;
        }
        return -ENOTTY;
    case 78: { /* gettimeofday */
        if (a1) {
            uint32_t sub;
            ((int32_t *)a1)[0] = (int32_t)div_1e9(realtime_ns(), &sub);
            ((int32_t *)a1)[1] = (int32_t)(sub / 1000u);
        }
        return 0;
    }
    case 90: { /* old mmap: one argument block */
        const uint32_t *b = (const uint32_t *)a1;
        return MEM_LOCKED(sys_mmap(b[0], b[1], b[3], (int)b[4]));
    }
    case 192: return MEM_LOCKED(sys_mmap(a1, a2, a4, (int)a5)); /* mmap2 */
    case 91: return MEM_LOCKED(sys_munmap(a1, a2));
    case 125: return 0; /* mprotect: nothing to protect with */
    case 145: return sys_readv(a1, (const struct iovec32 *)a2, a3);
    case 146: return sys_writev(a1, (const struct iovec32 *)a2, a3);
    case 162: return sys_nanosleep(CLOCK_MONOTONIC, 0, (void *)a1, (void *)a2, 0);
    case 174: /* rt_sigaction */
    case 175: /* rt_sigprocmask */
        return 0;
    case 243: return sys_set_thread_area((struct user_desc *)a1);
    case 355: /* getrandom: never blocks, any flags */
        if (a2 < 0) return -EINVAL;
        random_fill((void *)a1, (uint32_t)a2);
        return a2;
    case 258: return 1; /* set_tid_address: the only thread's id */
    case 265: return put_timespec(a1, (void *)a2, 0);
    case 403: return put_timespec(a1, (void *)a2, 1);
    case 266: /* clock_getres */
    case 406: {
        uint64_t ns;
        if (clock_ns(a1, &ns)) return -EINVAL;
        if (a2) {
            if (nr == 406) ((int64_t *)a2)[0] = 0, ((int64_t *)a2)[1] = 1;
            else ((int32_t *)a2)[0] = 0, ((int32_t *)a2)[1] = 1;
        }
        return 0;
    }
    case 267: return sys_nanosleep(a1, a2, (void *)a3, (void *)a4, 0);
    case 407: return sys_nanosleep(a1, a2, (void *)a3, (void *)a4, 1);
    }
    return -ENOSYS;
}

/* ---- boot ---- */
#define AT_NULL 0
#define AT_PHDR 3
#define AT_PHENT 4
#define AT_PHNUM 5
#define AT_PAGESZ 6
#define AT_HWCAP 16
#define AT_RANDOM 25
#define AT_SYSINFO 32

struct phdr32 {
    uint32_t type, offset, vaddr, paddr, filesz, memsz, flags, align;
};

/* The page table entry of virtual `va`, or NULL if `va` has no page table
 * (a 4 MiB page, or none). */
static uint32_t *pte_slot(uint32_t va)
{
    uint32_t pde = ((volatile uint32_t *)lguest_data.pgdir)[va >> 22];
    if (!(pde & 1) || (pde & 0x80)) return 0; /* no table, or a 4 MiB page */
    return &((uint32_t *)(pde & ~0xfffu))[(va >> 12) & 1023];
}

/* Set the page table entry of virtual `va` (low mapping) and tell the Host;
 * returns the old entry, or 0 (and changes nothing) if `va` has no page
 * table (a 4 MiB page, or none). */
static uint32_t set_pte(uint32_t va, uint32_t pte)
{
    volatile uint32_t *slot = pte_slot(va);
    if (!slot) return 0; /* leave it */
    uint32_t old = *slot;
    *slot = pte;
    lguest_hcall(LHCALL_SET_PTE, lguest_data.pgdir, va, pte);
    return old;
}

/* Only the pages of .text are executable.  QEMU keeps every store to a page
 * the CPU may run code from on its slow path (a call that checks for
 * self-modifying code), and an x86-32 page without PAE is always executable,
 * except to ring-0 code under CR4.SMEP when its entry says "user".  The
 * Launcher maps every page "user", so: .text's entries become supervisor
 * ones, then SMEP is turned on (which flushes the TLB; secondary CPUs start
 * with this CPU's control registers).  Everything else (data, heap, stacks)
 * is then a page no code runs from, whose stores stay on the fast path once
 * the CPU has seen them; make_executable turns a page executable when code
 * does run from it.  guest.ld keeps writable sections off .text's pages.  If
 * .text is not mapped with 4 KiB pages, nothing changes. */
static void protect_code(void)
{
    uint32_t start = (uint32_t)__lguest_text_start & ~(PAGE_SIZE - 1);
    uint32_t end = (uint32_t)__lguest_text_end;
    for (uint32_t va = start; va < end; va += PAGE_SIZE)
        if (!pte_slot(va)) return;
    for (uint32_t va = start; va < end; va += PAGE_SIZE) *pte_slot(va) &= ~PTE_USER;
    uint32_t cr4;
    __asm__ __volatile__("movl %%cr4, %0" : "=r"(cr4));
    __asm__ __volatile__("movl %0, %%cr4" : : "r"(cr4 | CR4_SMEP) : "memory");
}

#define MAX_ARGS 64
#define ENV_MAX 0x700 /* the boot info page's environment area (docs/abi.md) */
#define MAX_ENV (ENV_MAX / 2)  /* "A=" NUL... : never more strings than this */
static char *start_vec[MAX_ARGS + 1 + MAX_ENV + 1 + 2 * 16];
static char env_copy[ENV_MAX + 1];
static int start_argc;
static struct phdr32 tls_phdr;
static uint8_t random_bytes[16];

/* Unmap the page at virtual `va` (low mapping) and tell the Host; returns the
 * old page table entry (0 if there was none to clear). */
static uint32_t unmap_page(uint32_t va)
{
    return set_pte(va, 0);
}

/* ---- several CPUs ---- */

/* CPU n's struct lg_percpu as GDT entry LGUEST_GDT_ENTRY_PERCPU of `table`
 * (a flat-limit-free data segment: base &percpu[n], byte limit, DPL 3 so
 * that any privilege level may load it). */
static void percpu_segment(uint64_t *table, uint32_t n)
{
    struct lg_percpu *p = &percpu[n];
    p->cpu = n;
    p->data = n ? &cpu_data[n - 1] : &lguest_data;
    p->self = p;
    uint32_t base = (uint32_t)p, limit = sizeof *p - 1;
    uint32_t lo = (limit & 0xffff) | (base << 16);
    uint32_t hi = ((base >> 16) & 0xff) | (base & 0xff000000u) | (limit & 0xf0000);
    hi |= 0xf200;  /* present, DPL 3, data, writable */
    hi |= 1 << 22; /* 32-bit */
    table[LGUEST_GDT_ENTRY_PERCPU] = ((uint64_t)hi << 32) | lo;
}

/* musl's thread block (struct pthread, musl 1.2 on i386: 112 bytes; self at
 * 0, sysinfo at 16, errno at 28) with the static TLS below the thread
 * pointer.  A started CPU gets its own copy: its own errno and _Thread_local
 * variables (fresh from the TLS image, as a new thread's are). */
#define MUSL_PTHREAD_SIZE 112
#define MUSL_PTHREAD_SYSINFO 16
#define MUSL_PTHREAD_ERRNO 28

static uint32_t tls_offset(void) /* bytes of static TLS below the thread pointer */
{
    uint32_t size = (uint32_t)(__tbss_end - __tdata_start);
    uint32_t align = (uint32_t)__lguest_tls_align;
    if (!size) return 0; /* musl had no TLS segment (AT_PHNUM 0) */
    return size + ((-size - (uint32_t)__tdata_start) & (align - 1));
}

static uint32_t tls_block_size(void)
{
    return tls_offset() + MUSL_PTHREAD_SIZE + (uint32_t)__lguest_tls_align;
}

/* Copy CPU 0's thread block into [mem, mem + tls_block_size()) for CPU n;
 * returns the new thread pointer, or 0 if CPU 0 has no musl thread block. */
static uint32_t tls_copy(uint32_t mem)
{
    uint32_t tp0 = percpu[0].tp, align = (uint32_t)__lguest_tls_align;
    if (!tls_selector || !tp0 || *(uint32_t *)tp0 != tp0 ||
        *(uint32_t *)(tp0 + MUSL_PTHREAD_SYSINFO) != (uint32_t)__lguest_vsyscall)
        return 0; /* not the layout this code knows: the CPU shares CPU 0's */
    uint32_t off = tls_offset();
    uint32_t tp = (mem + off + align - 1) & ~(align - 1);
    uint32_t tdata = (uint32_t)(__tdata_end - __tdata_start);
    memcpy((void *)(tp - off), __tdata_start, tdata);
    memset((void *)(tp - off + tdata), 0, off - tdata);
    memcpy((void *)tp, (const void *)tp0, MUSL_PTHREAD_SIZE);
    *(uint32_t *)tp = tp;                              /* self */
    *(int *)(tp + MUSL_PTHREAD_ERRNO) = 0;
    return tp;
}

static uint32_t next_cpu = 1;

/* The stack (and thread block) of a started CPU: __lguest_stack_size bytes
 * plus the thread block from the top of free memory, with the page below
 * unmapped as a guard. */
struct cpu_stack {
    uint32_t base, size, guard_pte;
};

/* The link-time __lguest_stack_size: 0 unless built with --stack-size.  (Read
 * with an instruction: C may assume a symbol's address is never 0.) */
static uint32_t stack_size_option(void)
{
    uint32_t size;
    __asm__("movl $__lguest_stack_size, %0" : "=r"(size));
    return size;
}

/* --stack-size if the image was built with one, else 256 KiB (musl's threads get 128). */
static uint32_t secondary_stack_size(void)
{
    uint32_t size = stack_size_option();
    return size ? (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1) : 256u << 10;
}

static int stack_alloc(struct cpu_stack *st)
{
    uint32_t want = secondary_stack_size() + tls_block_size();
    want = (want + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
    long mem = MEM_LOCKED(sys_mmap(0, want + PAGE_SIZE, MAP_ANONYMOUS, -1));
    if (mem < 0) return -1;
    st->base = (uint32_t)mem;
    st->size = want + PAGE_SIZE;
    st->guard_pte = unmap_page(st->base);
    return 0;
}

static void stack_free(struct cpu_stack *st)
{
    if (st->guard_pte) set_pte(st->base, st->guard_pte);
    MEM_LOCKED(sys_munmap(st->base, st->size));
}

int lg_start_cpu(void (*fn)(void *), void *arg)
{
    struct cpu_stack st;
    uint32_t was = lg_spin_lock_irqsave(&start_lock);
    int result = -1;
    if (next_cpu < LG_MAX_CPUS && stack_alloc(&st) == 0) {
        uint32_t top = st.base + st.size; /* thread block at the top, stack below */
        uint32_t tls_mem = top - tls_block_size();
        while (next_cpu < LG_MAX_CPUS) {
            uint32_t n = next_cpu++;
            struct lg_percpu *p = &percpu[n];
            struct lguest_data *d = &cpu_data[n - 1];
            memset(d, 0, sizeof *d);
            for (int i = 0; i < LHCALL_RING_SIZE; i++) d->hcall_status[i] = LGUEST_HCALL_FREE;
            d->syscall_vec = LGUEST_SYSCALL_VECTOR;
            d->noirq_start = (uint32_t)__lguest_noirq_start;
            d->noirq_end = (uint32_t)__lguest_noirq_end;
            p->cpu = n;
            p->data = d;
            p->self = p;
            p->fn = fn;
            p->arg = arg;
            p->clock_fired = 0;
            p->tp = tls_copy(tls_mem);
            uint32_t esp = (tls_mem - 16) & ~15u;
            long r = (long)lguest_hcall(LHCALL_START_CPU, n,
                                        (unsigned long)__lguest_secondary_entry, esp);
            if (r == 0) {
                result = (int)n;
                break;
            }
            if (r != -16 /* EBUSY: started without us; try the next */) {
                next_cpu = LG_MAX_CPUS; /* EINVAL: no such CPU, nor any after it */
                break;
            }
        }
        if (result < 0) stack_free(&st);
    }
    lg_spin_unlock_irqrestore(&start_lock, was);
    return result;
}

/* A started CPU (crt0's __lguest_secondary_entry): its own lguest_data first,
 * then its own GDT (CPU 0's with this CPU's %fs and TLS entries), fn(arg), and
 * a halt nothing wakes. */
__attribute__((noreturn, used)) void __lguest_secondary_c(uint32_t n)
{
    if (n == 0 || n >= LG_MAX_CPUS) lguest_crash("started CPU has a bad number");
    struct lg_percpu *p = &percpu[n];
    lguest_hcall(LHCALL_LGUEST_INIT, (unsigned long)p->data, 0, 0);
    uint64_t *g = cpu_gdt[n - 1];
    memcpy(g, gdt, sizeof gdt);
    percpu_segment(g, n);
    uint32_t gs = 0;
    if (p->tp) {
        uint32_t e = tls_selector >> 3, base = p->tp;
        uint64_t lo = (g[e] & 0x0000ffffull) | ((uint64_t)(base & 0xffff) << 16);
        uint64_t hi = (g[e] >> 32) & 0x00ffff00ull;
        hi |= ((base >> 16) & 0xff) | (base & 0xff000000u);
        g[e] = (hi << 32) | lo;
        gs = tls_selector;
    }
    lguest_hcall(LHCALL_LOAD_GDT, (unsigned long)g, LGUEST_GDT_ENTRIES, 0);
    if (p->tp) lguest_hcall(LHCALL_LOAD_TLS, (unsigned long)&g[LGUEST_GDT_ENTRY_TLS_MIN], 0, 0);
    __asm__ __volatile__("movl %0, %%fs" : : "r"(LGUEST_PERCPU_SEL) : "memory");
    if (gs) __asm__ __volatile__("movl %0, %%gs" : : "r"(gs) : "memory");
    p->fn(p->arg);
    p->data->blocked_interrupts = 0xffffffffu; /* done: nothing wakes this CPU */
    p->data->irq_enabled = 0;
    for (;;) lguest_hcall(LHCALL_HALT, 0, 0, 0);
}

/* CPU 0's stack: __lguest_stack_size bytes if the image was built with
 * --stack-size (the guest dies saying so if they do not fit), else 8 MiB as
 * Linux gives a process if that leaves at least 4 MiB for the heap (the
 * default 16 MiB guest does), else half the free memory; at the top of free
 * memory, above an unmapped guard page.  The heap is what lies
 * below.  Its pages cost the Host nothing until touched (guest memory is
 * demand-zero). */
#define DEFAULT_STACK (8u << 20)
#define MIN_HEAP (4u << 20)
static void place_stack(void)
{
    uint32_t lo = ((uint32_t)_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
    uint32_t hi = boot_copy.free_end & ~(PAGE_SIZE - 1);
    uint32_t avail = hi > lo ? hi - lo : 0;
    uint32_t want = stack_size_option();
    if (want) {
        want = (want + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
        if (want > avail || avail - want < 2 * PAGE_SIZE)
            crash_hex("stack (--stack-size) of ", want,
                      " bytes does not fit in the memory free for it (give more --memory: free ",
                      avail);
    } else {
        want = avail >= DEFAULT_STACK + MIN_HEAP ? DEFAULT_STACK : (avail / 2) & ~(PAGE_SIZE - 1);
    }
    __lguest_stack_top = hi;
    __lguest_stack_guard_page = hi - want - PAGE_SIZE;
    unmap_page(__lguest_stack_guard_page);
    heap_init(__lguest_stack_guard_page);
}

/* getrandom and AT_RANDOM: splitmix64 over a counter any CPU may advance
 * (one 8-byte atomic add), seeded at boot from the TSC and the Host's wall
 * clock.  Unpredictable enough for hash seeds and temporary names; not a
 * source for cryptographic keys. */
static uint64_t random_state;

static void random_fill(void *buf, uint32_t len)
{
    uint8_t *p = buf;
    while (len) {
        uint64_t z = __atomic_add_fetch(&random_state, 0x9e3779b97f4a7c15ull, __ATOMIC_RELAXED);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        uint32_t n = len < 8 ? len : 8;
        memcpy(p, &z, n);
        p += n;
        len -= n;
    }
}

__attribute__((noreturn, used)) void __lguest_start_c(const struct lguest_boot_info *bi)
{
    for (int i = 0; i < LHCALL_RING_SIZE; i++) lguest_data.hcall_status[i] = LGUEST_HCALL_FREE;
    lguest_data.irq_enabled = 0;
    lguest_data.syscall_vec = LGUEST_SYSCALL_VECTOR;
    lguest_data.noirq_start = (uint32_t)__lguest_noirq_start;
    lguest_data.noirq_end = (uint32_t)__lguest_noirq_end;
    lguest_hcall(LHCALL_LGUEST_INIT, (unsigned long)&lguest_data, 0, 0);

    /* lguest's kernel segments (flat, ring 0), then reload every segment. */
    gdt[LGUEST_KERNEL_CS >> 3] = 0x00cf9a000000ffffull;
    gdt[LGUEST_KERNEL_DS >> 3] = 0x00cf92000000ffffull;
    percpu_segment(gdt, 0); /* several CPUs: CPU 0's %fs */
    lguest_hcall(LHCALL_LOAD_GDT, (unsigned long)gdt, LGUEST_GDT_ENTRIES, 0);
    __asm__ __volatile__("ljmp %0, $1f\n1:\n\t"
                         "movl %1, %%eax\n\t"
                         "movl %%eax, %%ds\n\tmovl %%eax, %%es\n\tmovl %%eax, %%ss\n\t"
                         "xorl %%eax, %%eax\n\tmovl %%eax, %%fs\n\tmovl %%eax, %%gs"
                         :
                         : "i"(LGUEST_KERNEL_CS), "i"(LGUEST_KERNEL_DS)
                         : "eax", "memory");
    __asm__ __volatile__("movl %0, %%fs" : : "r"(LGUEST_PERCPU_SEL) : "memory");

    /* Copy what we need from the boot info page, then unmap page 0.  (bi is
     * 0: hide that from the compiler, which may treat a read through it as
     * undefined.) */
    __asm__("" : "+r"(bi));
    boot_copy = *bi;
    if (boot_copy.magic != LGUEST_BOOT_MAGIC || boot_copy.version != LGUEST_BOOT_VERSION)
        lguest_crash("bad boot info");
    if (boot_copy.cmdline && boot_copy.cmdline_len < sizeof cmdline_copy)
        memcpy(cmdline_copy, (const char *)boot_copy.cmdline, boot_copy.cmdline_len);
    uint32_t env_len = boot_copy.env ? boot_copy.env_len : 0;
    if (env_len > ENV_MAX) lguest_crash("bad boot info: environment too long");
    memcpy(env_copy, (const char *)boot_copy.env, env_len);
    set_gate(14, __lguest_pf_entry, 0x8e00);
    unmap_page(0);
    protect_code();

    for (unsigned irq = 0; irq < LGUEST_IRQS; irq++)
        set_gate(LGUEST_IRQ_VECTOR_BASE + irq, __lguest_irq_stubs + 8 * irq, 0x8e00);
    set_gate(LGUEST_SYSCALL_VECTOR, __lguest_int80, 0xef00);
    console = (struct lguest_console *)lguest_find_device(LGUEST_DEVICE_CONSOLE, 0);
    block = (struct lguest_block *)lguest_find_device(LGUEST_DEVICE_BLOCK, 0);
    place_stack();
    boot_ns = lguest_monotonic_ns();
    realtime_offset = (int64_t)host_realtime_ns() - (int64_t)boot_ns;

    /* argv (argv[0] = the image's name; the command line split at blanks),
     * envp (the boot info's NAME=VALUE strings, in order), and the auxiliary
     * vector musl reads. */
    int argc = 0;
    char **v = start_vec;
    v[argc++] = (char *)__lguest_progname;
    memcpy(argv_buf, cmdline_copy, sizeof argv_buf);
    for (char *p = argv_buf; *p && argc < MAX_ARGS;) {
        while (*p == ' ' || *p == '\t' || *p == '\n') *p++ = 0;
        if (!*p) break;
        v[argc++] = p;
        while (*p && *p != ' ' && *p != '\t' && *p != '\n') p++;
    }
    int k = argc;
    v[k++] = 0; /* end of argv */
    for (uint32_t i = 0; i < env_len && k < MAX_ARGS + 1 + MAX_ENV;) {
        char *e = env_copy + i;
        uint32_t n = (uint32_t)strlen(e); /* env_copy[env_len] is 0: always ends */
        for (uint32_t j = 0; j < n; j++) {
            if (e[j] == '=') {
                v[k++] = e;
                break;
            }
        }
        i += n + 1;
    }
    v[k++] = 0; /* end of envp */
    uint32_t tls_size = (uint32_t)(__tbss_end - __tdata_start);
    tls_phdr = (struct phdr32){7 /* PT_TLS */, 0, (uint32_t)__tdata_start,
                               (uint32_t)__tdata_start,
                               (uint32_t)(__tdata_end - __tdata_start), tls_size, 4,
                               (uint32_t)__lguest_tls_align};
    uint32_t hwcap, eax_, ebx_, ecx_;
    __asm__ __volatile__("cpuid" : "=a"(eax_), "=b"(ebx_), "=c"(ecx_), "=d"(hwcap) : "a"(1));
    random_state = rdtsc() ^ (uint64_t)host_realtime_ns() << 17;
    random_fill(random_bytes, sizeof random_bytes);
    uint32_t aux[][2] = {
        {AT_PHDR, (uint32_t)&tls_phdr},
        {AT_PHENT, sizeof tls_phdr},
        {AT_PHNUM, tls_size ? 1 : 0},
        {AT_PAGESZ, PAGE_SIZE},
        {AT_HWCAP, hwcap}, /* CPUID 1's edx, as Linux gives it: musl's fenv uses SSE if set */
        {AT_RANDOM, (uint32_t)random_bytes},
        {AT_SYSINFO, (uint32_t)__lguest_vsyscall},
        {AT_NULL, 0},
    };
    for (unsigned i = 0; i < sizeof aux / sizeof aux[0]; i++) {
        v[k++] = (char *)aux[i][0];
        v[k++] = (char *)aux[i][1];
    }
    start_argc = argc;
    /* Off the boot stack, onto CPU 0's own (16-byte aligned, as the ABI wants). */
    __asm__ __volatile__("movl %0, %%esp\n\txorl %%ebp, %%ebp\n\tcall __lguest_run_main"
                         :
                         : "r"(__lguest_stack_top - 16)
                         : "memory");
    __builtin_unreachable();
}

__attribute__((noreturn, used)) void __lguest_run_main(void)
{
    __libc_start_main(main, start_argc, start_vec, 0, 0, 0);
    lguest_crash("__libc_start_main returned");
}
