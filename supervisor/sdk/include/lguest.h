/* lguest.h - the guest side of lguest-for-asyncio, for C guests.
 *
 * Built with `python -m supervisor build`, a C guest is an ordinary hosted C
 * program (musl libc: stdio on the console, malloc, time.h ...) whose main()
 * runs after the guest runtime (crt0) has registered lguest_data, loaded its
 * GDT and IDT, and turned the command line into argc/argv.  This header is
 * what a guest needs beyond libc: the boot info page, lguest_data, device
 * descriptors, hypercalls, interrupt handlers and the console and block
 * devices.  Every offset is checked against docs/abi.md at compile time.
 *
 * Interrupts: the runtime runs with interrupts off (lguest_data.irq_enabled
 * = 0).  lguest_halt() sleeps until an irq the guest has not blocked is
 * pending; the Host then runs its handler and lguest_halt() returns with
 * interrupts off again.  Handlers registered with lguest_set_irq_handler()
 * run with interrupts off, on the interrupted stack.
 *
 * Several CPUs: lg_start_cpu(), lg_cpu_id(), lg_cpu_count(), lg_send_ipi(), lg_spinlock_t;
 * the interrupt calls above act on the calling CPU.  docs/sdk.md says what
 * else a started CPU may call (musl is single-threaded: no stdio or malloc
 * on two CPUs at once).
 */
#ifndef LGUEST_H
#define LGUEST_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- hypercalls (int $0x1f; eax = number, edx/ebx/ecx = arguments) ---- */
#define LGUEST_TRAP_ENTRY 0x1f
#define LHCALL_FLUSH_ASYNC 0
#define LHCALL_LGUEST_INIT 1
#define LHCALL_SHUTDOWN 2
#define LHCALL_LOAD_GDT 3
#define LHCALL_NEW_PGTABLE 4
#define LHCALL_FLUSH_TLB 5
#define LHCALL_LOAD_IDT_ENTRY 6
#define LHCALL_SET_STACK 7
#define LHCALL_TS 8
#define LHCALL_SET_CLOCKEVENT 9
#define LHCALL_HALT 10
#define LHCALL_SET_PTE 14
#define LHCALL_SET_PMD 15
#define LHCALL_LOAD_TLS 16
#define LHCALL_NOTIFY 17
/* Extensions of lguest's ABI (docs/abi.md): several CPUs per guest. */
#define LHCALL_START_CPU 64 /* edx cpu, ebx eip, ecx esp; 0, -EINVAL (no such CPU), -EBUSY */
#define LHCALL_SEND_IPI 65  /* edx cpu, ebx irq; 0 or -EINVAL */

#define LGUEST_SHUTDOWN_POWEROFF 1
#define LGUEST_SHUTDOWN_RESTART 2
#define LGUEST_SHUTDOWN_CRASH 0

#define LGUEST_IRQS 32
#define LGUEST_IRQ_VECTOR_BASE 32 /* irq N arrives on vector 32 + N */
#define LGUEST_CLOCK_IRQ 0
#define LGUEST_SYSCALL_VECTOR 0x80
#define LGUEST_IRQ_ON 512 /* X86_EFLAGS_IF */

/* Segments the runtime's GDT provides (lguest's __KERNEL_CS / __KERNEL_DS
 * at ring 0); GDT entries 6-8 are the TLS slots. */
#define LGUEST_KERNEL_CS 0x60
#define LGUEST_KERNEL_DS 0x68
#define LGUEST_GDT_ENTRY_TLS_MIN 6
#define LGUEST_GDT_ENTRIES 16
/* GDT entry 9 is each CPU's own data segment (%fs): struct lg_percpu below. */
#define LGUEST_GDT_ENTRY_PERCPU 9
#define LGUEST_PERCPU_SEL (LGUEST_GDT_ENTRY_PERCPU << 3)

static inline unsigned long lguest_hcall(unsigned long call, unsigned long arg1,
                                         unsigned long arg2, unsigned long arg3)
{
    __asm__ __volatile__("int $0x1f"
                         : "+a"(call)
                         : "d"(arg1), "b"(arg2), "c"(arg3)
                         : "memory");
    return call;
}

/* ---- the boot info page (guest-physical 0; copied by the runtime) ---- */
#define LGUEST_BOOT_MAGIC 0x5453474cu /* "LGST" */
#define LGUEST_BOOT_VERSION 1

struct lguest_boot_info {
    uint32_t magic;
    uint32_t version;
    uint32_t ram_size;     /* bytes of RAM; the device page starts here */
    uint32_t device_page;  /* address of the device page */
    uint32_t device_count; /* descriptors in it */
    uint32_t free_end;     /* end of memory free for the guest (= page directory) */
    uint32_t cmdline;      /* address of the command line (0 if none) */
    uint32_t cmdline_len;  /* its length, without the NUL that follows */
    uint32_t cpus;         /* CPUs the guest has (an extension; CPU 0 boots) */
    uint32_t env;          /* address of the environment: NAME=VALUE\0... (0 if none) */
    uint32_t env_len;      /* its length in bytes, every NUL included */
};

/* ---- struct lguest_data: shared with the Host (1136 bytes) ---- */
#define LHCALL_RING_SIZE 64
#define LGUEST_HCALL_FREE 0xff

struct hcall_args {
    uint32_t arg0, arg1, arg2, arg3; /* eax (number), edx, ebx, ecx */
};

struct lguest_data {
    uint32_t irq_enabled;        /* 512 = interrupts on, 0 = off */
    uint32_t blocked_interrupts; /* bit N set: irq N is not delivered (nor wakes) */
    uint32_t cr2;                /* address of the last page fault */
    struct {                     /* wall clock, refreshed by the Host before it */
        uint32_t tv_sec;         /* runs the guest */
        uint32_t tv_nsec;
    } time;
    uint8_t hcall_status[LHCALL_RING_SIZE]; /* 0xff free, 0 queued */
    struct hcall_args hcalls[LHCALL_RING_SIZE];
    uint32_t reserve_mem;  /* Host: 4 MiB, the top of virtual memory (boot GDT) */
    uint32_t tsc_khz;      /* Host: rdtsc ticks per millisecond */
    uint32_t pgdir;        /* Host: the page directory the guest booted with */
    uint32_t noirq_start;  /* guest: no irq is delivered while eip is in */
    uint32_t noirq_end;    /*   [noirq_start, noirq_end) */
    uint32_t kernel_address;
    uint32_t syscall_vec;  /* guest: must be 0x80 */
};

_Static_assert(offsetof(struct lguest_data, irq_enabled) == 0, "lguest_data layout");
_Static_assert(offsetof(struct lguest_data, blocked_interrupts) == 4, "lguest_data layout");
_Static_assert(offsetof(struct lguest_data, cr2) == 8, "lguest_data layout");
_Static_assert(offsetof(struct lguest_data, time) == 12, "lguest_data layout");
_Static_assert(offsetof(struct lguest_data, hcall_status) == 20, "lguest_data layout");
_Static_assert(offsetof(struct lguest_data, hcalls) == 84, "lguest_data layout");
_Static_assert(offsetof(struct lguest_data, reserve_mem) == 1108, "lguest_data layout");
_Static_assert(offsetof(struct lguest_data, tsc_khz) == 1112, "lguest_data layout");
_Static_assert(offsetof(struct lguest_data, pgdir) == 1116, "lguest_data layout");
_Static_assert(offsetof(struct lguest_data, noirq_start) == 1120, "lguest_data layout");
_Static_assert(offsetof(struct lguest_data, noirq_end) == 1124, "lguest_data layout");
_Static_assert(offsetof(struct lguest_data, kernel_address) == 1128, "lguest_data layout");
_Static_assert(offsetof(struct lguest_data, syscall_vec) == 1132, "lguest_data layout");
_Static_assert(sizeof(struct lguest_data) == 1136, "lguest_data layout");
_Static_assert(sizeof(struct lguest_boot_info) == 44, "boot info layout");

/* ---- device descriptors (64 bytes each, in the device page) ---- */
#define LGUEST_DEVICE_CONSOLE 1
#define LGUEST_DEVICE_BLOCK 2
#define LGUEST_DESC_SIZE 64
#define LGUEST_MAX_DEVICES 64

struct lguest_device_desc {
    uint32_t type; /* 1 console, 2 block, others custom */
    uint32_t irq;  /* its interrupt (vector 32 + irq) */
    uint32_t fields[14];
};

#define LGUEST_CONSOLE_EOF 1
#define LGUEST_CONSOLE_INPUT_TTY 2 /* the console's input is a terminal */
struct lguest_console {
    uint32_t type, irq;
    uint32_t out_addr; /* guest: output bytes */
    uint32_t out_len;  /* guest; zeroed by the Launcher when printed */
    uint32_t in_addr;  /* guest: input buffer */
    uint32_t in_size;  /* guest: its size */
    uint32_t in_len;   /* Launcher: bytes delivered; the guest zeroes it to re-arm */
    uint32_t flags;    /* Launcher: bit 0 end of input, bit 1 input is a terminal */
    uint32_t out_stream; /* guest: which stream out_addr/out_len are, LGUEST_STDOUT/STDERR */
    uint32_t pad[7];
};
#define LGUEST_STDOUT 0
#define LGUEST_STDERR 1

#define LGUEST_BLOCK_SECTOR_SIZE 512
#define LGUEST_BLOCK_READONLY 1
#define LGUEST_BLOCK_READ 1
#define LGUEST_BLOCK_WRITE 2
enum lguest_block_status {
    LGUEST_BLOCK_OK = 0,
    LGUEST_BLOCK_IOERR = 1,
    LGUEST_BLOCK_UNSUPPORTED = 2,
    LGUEST_BLOCK_RO = 3,
};
struct lguest_block {
    uint32_t type, irq;
    uint32_t capacity; /* Launcher: sectors */
    uint32_t flags;    /* Launcher: bit 0 read-only */
    uint32_t command;  /* guest: 1 read, 2 write */
    uint32_t sector;
    uint32_t count;
    uint32_t buffer;   /* guest-physical, count * 512 bytes */
    uint32_t status;   /* Launcher: enum lguest_block_status */
    uint32_t pad[7];
};

_Static_assert(sizeof(struct lguest_device_desc) == LGUEST_DESC_SIZE, "descriptor layout");
_Static_assert(sizeof(struct lguest_console) == LGUEST_DESC_SIZE, "console layout");
_Static_assert(offsetof(struct lguest_console, out_addr) == 8, "console layout");
_Static_assert(offsetof(struct lguest_console, out_stream) == 32, "console layout");
_Static_assert(offsetof(struct lguest_console, out_len) == 12, "console layout");
_Static_assert(offsetof(struct lguest_console, in_addr) == 16, "console layout");
_Static_assert(offsetof(struct lguest_console, in_size) == 20, "console layout");
_Static_assert(offsetof(struct lguest_console, in_len) == 24, "console layout");
_Static_assert(offsetof(struct lguest_console, flags) == 28, "console layout");
_Static_assert(sizeof(struct lguest_block) == LGUEST_DESC_SIZE, "block layout");
_Static_assert(offsetof(struct lguest_block, capacity) == 8, "block layout");
_Static_assert(offsetof(struct lguest_block, flags) == 12, "block layout");
_Static_assert(offsetof(struct lguest_block, command) == 16, "block layout");
_Static_assert(offsetof(struct lguest_block, sector) == 20, "block layout");
_Static_assert(offsetof(struct lguest_block, count) == 24, "block layout");
_Static_assert(offsetof(struct lguest_block, buffer) == 28, "block layout");
_Static_assert(offsetof(struct lguest_block, status) == 32, "block layout");

/* ---- what the runtime provides ---- */
extern struct lguest_data lguest_data;
/* The boot info page as it was at boot (page 0 itself is unmapped, so that a
 * NULL pointer dereference kills the guest). */
extern const struct lguest_boot_info *const lguest_boot_info;
/* The command line (a NUL-terminated copy; "" if none). */
extern const char *lguest_cmdline(void);

/* Device descriptor number `index` among those of `type`, or NULL. */
struct lguest_device_desc *lguest_find_device(uint32_t type, unsigned index);
struct lguest_console *lguest_console(void); /* the first console, or NULL */
struct lguest_block *lguest_block(void);     /* the first block device, or NULL */

/* Ask the Launcher to service a device; returns once it has. */
static inline void lguest_notify(const void *desc)
{
    lguest_hcall(LHCALL_NOTIFY, (unsigned long)desc, 0, 0);
}

/* Interrupt handlers: handler(irq) runs with interrupts off, on the CPU the
 * irq was raised on (device irqs: CPU 0; IPIs: their target).  One table for
 * all CPUs.  NULL restores the runtime's default (ignore).  Returns -1 for
 * irq >= 32. */
typedef void (*lguest_irq_handler)(unsigned irq);
int lguest_set_irq_handler(unsigned irq, lguest_irq_handler handler);

/* ---- several CPUs (GuestConfig.cpus, `run --cpus N`) ----
 * Each CPU has its own lguest_data (irq_enabled, blocked_interrupts, cr2, the
 * clock and the hypercall ring), timer, pending irqs and halted state; memory,
 * the devices and the irq handler table below are shared.  `lguest_data` is
 * CPU 0's; lg_cpu_data() is the calling CPU's.  The runtime keeps %fs pointing
 * at the calling CPU's struct lg_percpu: never load %fs yourself. */
#define LG_MAX_CPUS 16
struct lg_percpu {
    uint32_t cpu;               /* %fs:0, this CPU's number */
    struct lguest_data *data;   /* %fs:4, this CPU's lguest_data */
    struct lg_percpu *self;     /* %fs:8 */
    volatile uint32_t clock_fired; /* runtime: irq 0 seen (nanosleep) */
    void (*fn)(void *);         /* runtime: what lg_start_cpu runs here */
    void *arg;
    uint32_t tp;                /* runtime: this CPU's thread pointer (%gs base) */
    uint32_t pad;
};
_Static_assert(offsetof(struct lg_percpu, cpu) == 0, "lg_percpu layout");
_Static_assert(offsetof(struct lg_percpu, data) == 4, "lg_percpu layout");
_Static_assert(offsetof(struct lg_percpu, self) == 8, "lg_percpu layout");

/* This CPU's number (0 is the boot CPU): one memory read, no hypercall. */
static inline unsigned lg_cpu_id(void)
{
    unsigned id;
    __asm__ __volatile__("movl %%fs:0, %0" : "=r"(id));
    return id;
}
static inline struct lguest_data *lg_cpu_data(void)
{
    struct lguest_data *d;
    __asm__ __volatile__("movl %%fs:4, %0" : "=r"(d));
    return d;
}
static inline struct lg_percpu *lg_percpu(void)
{
    struct lg_percpu *p;
    __asm__ __volatile__("movl %%fs:8, %0" : "=r"(p));
    return p;
}

/* How many CPUs the guest has (the boot info's `cpus`; 1 from a Launcher
 * that does not say), online or not: lg_start_cpu() can start the others. */
static inline unsigned lg_cpu_count(void)
{
    unsigned n = lguest_boot_info->cpus;
    return n ? n : 1;
}

/* Start the next offline CPU: it runs fn(arg) on a stack of its own
 * (__lguest_stack_size bytes, from the top of free memory, with an unmapped
 * guard page below it), with its own lguest_data, interrupts off, the same
 * irq handlers; when fn returns, that CPU halts for good (no irq wakes it).
 * Returns the new CPU's number, or -1 when the guest has no CPU left (or no
 * memory for the stack).  Any CPU may call it. */
int lg_start_cpu(void (*fn)(void *), void *arg);
/* Raise `irq` (0-31) on CPU `cpu` (itself too), as a device would: it wakes a
 * halted CPU.  0, or -1 for no such CPU or irq. */
static inline int lg_send_ipi(unsigned cpu, unsigned irq)
{
    return lguest_hcall(LHCALL_SEND_IPI, cpu, irq, 0) ? -1 : 0;
}

/* A spinlock on the __atomic builtins (lock-prefixed xchg; the Host keeps a
 * guest's lock-prefixed instructions atomic across its CPUs).  Not recursive.
 * Do not take one in an irq handler that the interrupted code may hold: use
 * lg_spin_lock_irqsave() in the interrupted code for that. */
typedef struct {
    volatile uint32_t locked;
} lg_spinlock_t;
#define LG_SPINLOCK_INIT {0}

static inline int lg_spin_trylock(lg_spinlock_t *l)
{
    return __atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE) == 0;
}
static inline void lg_spin_lock(lg_spinlock_t *l)
{
    while (__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(&l->locked, __ATOMIC_RELAXED))
            __asm__ __volatile__("pause" ::: "memory");
    }
}
static inline void lg_spin_unlock(lg_spinlock_t *l)
{
    __atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE);
}
/* With this CPU's interrupts off while held; returns what to restore. */
static inline uint32_t lg_spin_lock_irqsave(lg_spinlock_t *l)
{
    struct lguest_data *d = lg_cpu_data();
    uint32_t was = d->irq_enabled;
    d->irq_enabled = 0;
    __asm__ __volatile__("" ::: "memory");
    lg_spin_lock(l);
    return was;
}
static inline void lg_spin_unlock_irqrestore(lg_spinlock_t *l, uint32_t was)
{
    lg_spin_unlock(l);
    __asm__ __volatile__("" ::: "memory");
    lg_cpu_data()->irq_enabled = was;
}

/* This CPU's interrupts (its lguest_data.irq_enabled). */
static inline void lguest_irq_disable(void) { lg_cpu_data()->irq_enabled = 0; }
static inline void lguest_irq_enable(void) { lg_cpu_data()->irq_enabled = LGUEST_IRQ_ON; }

/* Sleep (costing the Host nothing) until an irq the guest has not blocked is
 * pending; its handler has run when this returns, interrupts off.  Check your
 * condition with interrupts off, then halt: an irq that arrived in between
 * ends the halt at once, so no wake-up is lost. */
void lguest_halt(void);
/* Arm the clock: irq 0 in `ns` nanoseconds (0 disarms). */
static inline void lguest_set_clockevent(unsigned long ns)
{
    lguest_hcall(LHCALL_SET_CLOCKEVENT, ns, 0, 0);
}
/* Nanoseconds of the monotonic clock (rdtsc scaled by lguest_data.tsc_khz). */
uint64_t lguest_monotonic_ns(void);

/* Console: write `len` bytes; read up to `size` bytes (waits; 0 at end of input). */
void lguest_console_write(const void *buf, size_t len);
long lguest_console_read(void *buf, size_t size);

/* Block device: `count` sectors from `sector`; returns a lguest_block_status. */
int lguest_block_read(struct lguest_block *dev, uint32_t sector, uint32_t count, void *buf);
int lguest_block_write(struct lguest_block *dev, uint32_t sector, uint32_t count,
                       const void *buf);

/* Power off with `status` (stdio is NOT flushed: use exit() for that). */
__attribute__((noreturn)) void lguest_poweroff(int status);
/* Crash with `reason` (the guest's death reason is "CRASH: reason"). */
__attribute__((noreturn)) void lguest_crash(const char *reason);

#ifdef __cplusplus
}
#endif
#endif /* LGUEST_H */
