/* threads.c - threads for C guests: musl's clone, futex and a small scheduler.
 *
 * Guarantees (docs/sdk.md, "Threads"):
 *  - clone with CLONE_VM | CLONE_THREAD (musl's pthread_create) makes a thread:
 *    its own tid, registers, stack (musl's) and TLS descriptor (CLONE_SETTLS);
 *    CLONE_PARENT_SETTID / CLONE_CHILD_SETTID / CLONE_CHILD_CLEARTID as Linux
 *    has them (the tid word is cleared and futex-woken once the thread is off
 *    its stack, which is what pthread_join waits for).  Any other clone, fork
 *    and vfork: -ENOSYS.
 *  - futex WAIT / WAKE / REQUEUE / CMP_REQUEUE / WAIT_BITSET / WAKE_BITSET
 *    (private or not: one address space), relative or absolute timeouts on
 *    the monotonic clock (or the realtime one with FUTEX_CLOCK_REALTIME).
 *  - Scheduling: threads run on the guest's CPUs, started as threads appear;
 *    more runnable threads than CPUs wait in one FIFO run queue.  A thread
 *    leaves its CPU when it waits (futex, nanosleep), yields, exits, or its
 *    SLICE_NS time slice ends at a clock interrupt while another thread
 *    waits for a CPU and no CPU is halted.  A CPU with nothing to run halts
 *    (costing the Host nothing) until an IPI (LG_THREAD_IPI: sent for a new
 *    thread, or at a busy CPU's clock tick while threads wait) or its own
 *    clock (the earliest timed wait) wakes it.
 *  - Each thread has its own x87/SSE state, saved at every switch and
 *    around the clock interrupt's work.
 *  - A detached thread's munmap of its own stack waits until it is off it.
 *  - Threads run with interrupts on (the slice needs the clock interrupt);
 *    before the first clone the program runs as it always has.
 *
 * Locking: sched_lock (taken with interrupts off) guards every thread's
 * state, the run queue, the wait list and the per-CPU records.  A context
 * switch happens with it held; the context that resumes releases it, so a
 * thread is never visible as runnable while another CPU still runs on its
 * stack.  Hypercalls that leave the slice are made after the release
 * (sched_unlock), never while another CPU could be spinning on the lock.
 */
#include <lguest.h>

#include <stdint.h>
#include <string.h>

#define EAGAIN 11
#define EINVAL 22
#define ENOSYS 38
#define ESRCH 3
#define ETIMEDOUT 110
#define SIGCANCEL 33 /* musl's */

#define CLONE_VM 0x00000100
#define CLONE_THREAD 0x00010000
#define CLONE_SETTLS 0x00080000
#define CLONE_PARENT_SETTID 0x00100000
#define CLONE_CHILD_CLEARTID 0x00200000
#define CLONE_CHILD_SETTID 0x01000000

#define FUTEX_WAIT 0
#define FUTEX_WAKE 1
#define FUTEX_REQUEUE 3
#define FUTEX_CMP_REQUEUE 4
#define FUTEX_WAIT_BITSET 9
#define FUTEX_WAKE_BITSET 10
#define FUTEX_PRIVATE_FLAG 128
#define FUTEX_CLOCK_REALTIME 256

#define LG_MAX_THREADS 256   /* live threads, the main one included */
#define SLICE_NS 10000000u   /* a thread's time slice while others wait */
#define LG_THREAD_IPI 31     /* the irq one CPU raises to wake a halted one */
#define IDLE_STACK 8192

enum { T_FREE, T_RUNNABLE, T_RUNNING, T_BLOCKED, T_DEAD, T_IDLE };
enum { WAKE_NONE, WAKE_WOKEN, WAKE_TIMEOUT };

struct user_regs { /* a new thread's registers as clone leaves them (eax = 0) */
    uint32_t eip, esp, ebx, ecx, edx, esi, edi, ebp;
};

struct lg_thread {
    uint32_t ksp; /* saved stack pointer while switched out (lg_ctx_switch) */
    int tid, state;
    uint32_t tls_entry; /* GDT TLS entry musl's %gs selects (0: none) */
    uint64_t tls_desc;  /* its descriptor: base = this thread's thread pointer */
    volatile int *clear_tid;
    uint32_t futex_addr, bitset;
    int wake;
    uint64_t deadline; /* timed wait: monotonic ns; 0: none */
    uint32_t unmap_base, unmap_len; /* munmap of its own stack, done after it exits */
    uint32_t fpu_init; /* a new thread's x87/SSE state (its parent's, on its stack) */
    struct lg_thread *next; /* run queue or wait list */
    struct user_regs regs;
};

struct cpu_sched {
    struct lg_thread *cur;
    struct lg_thread idle; /* this CPU's idle context */
    struct lg_thread *dead; /* exited on this CPU: finished by the next context */
    int online, halting, kicked;
    uint32_t clock_ns, ipis; /* for sched_unlock: the clock to arm, CPUs to wake */
};

static struct lg_thread threads[LG_MAX_THREADS];
static struct cpu_sched cpus[LG_MAX_CPUS];
static lg_spinlock_t sched_lock;
static struct lg_thread *runq_head, *runq_tail, *waiters;
static int threads_on, live, online, next_tid = 2;
static volatile int *main_clear_tid;
static char idle_stack0[IDLE_STACK] __attribute__((aligned(16)));
/* Halts of idle CPUs so far (tests read it: waiting threads must halt). */
unsigned long __lguest_idle_halts;

long __lguest_syscall(long nr, long a1, long a2, long a3, long a4, long a5, long a6);

/* lg_ctx_switch(&prev->ksp, next->ksp): save the callee-saved registers on
 * this stack, switch stacks, restore the next context's and return into it. */
void lg_ctx_switch(uint32_t *save, uint32_t ksp);
void __lg_thread_first(void);
void __lg_idle_first(void);
__asm__(".text\n"
        ".globl lg_ctx_switch\n"
        "lg_ctx_switch:\n"
        "  movl 4(%esp), %eax\n"
        "  movl 8(%esp), %edx\n"
        "  pushl %ebp\n  pushl %ebx\n  pushl %esi\n  pushl %edi\n"
        "  movl %esp, (%eax)\n"
        "  movl %edx, %esp\n"
        "  popl %edi\n  popl %esi\n  popl %ebx\n  popl %ebp\n"
        "  ret\n"
        /* A new thread's first context: finish the switch in C, then enter
         * the thread where clone returns, with eax = 0 and its own stack. */
        ".globl __lg_thread_first\n"
        "__lg_thread_first:\n"
        "  call lg_thread_first_c\n"
        "  movl 4(%eax), %esp\n"
        "  pushl 0(%eax)\n"
        "  movl 8(%eax), %ebx\n"
        "  movl 12(%eax), %ecx\n"
        "  movl 16(%eax), %edx\n"
        "  movl 20(%eax), %esi\n"
        "  movl 24(%eax), %edi\n"
        "  movl 28(%eax), %ebp\n"
        "  xorl %eax, %eax\n"
        "  ret\n"
        ".globl __lg_idle_first\n"
        "__lg_idle_first:\n"
        "  call lg_idle_first_c\n"
        "1: hlt\n  jmp 1b\n");

/* Interrupts on for the calling thread: irq_enabled, and the real IF too.  The
 * Host's interrupt frames carry IF from eflags (cleared if irq_enabled is off,
 * as lguest does); the runtime runs at CPL 0, where an iret from a frame pushed
 * while interrupts were off (musl's early int $0x80 calls) clears the real IF,
 * and every later frame would then say "off" and its iret leave irqs off. */
static void irqs_on(void)
{
    lg_cpu_data()->irq_enabled = LGUEST_IRQ_ON;
    __asm__ __volatile__("sti" ::: "memory");
}

static struct cpu_sched *this_cpu(void) { return &cpus[lg_cpu_id()]; }

/* A fresh context that lg_ctx_switch enters at `entry` on the stack below `top`. */
static uint32_t new_context(uint32_t top, void (*entry)(void))
{
    uint32_t *sp = (uint32_t *)((top & ~15u) - 32);
    sp[0] = sp[1] = sp[2] = sp[3] = 0; /* edi, esi, ebx, ebp */
    sp[4] = (uint32_t)entry;
    return (uint32_t)sp;
}

/* ---- the calling CPU's GDT (GDTR: the runtime's per-CPU table) ---- */
static uint64_t *cpu_gdt(void)
{
    struct {
        uint16_t limit;
        uint32_t base;
    } __attribute__((packed)) g;
    __asm__ __volatile__("sgdt %0" : "=m"(g));
    return (uint64_t *)g.base;
}

static uint64_t with_base(uint64_t desc, uint32_t base)
{
    uint32_t lo = (uint32_t)desc, hi = (uint32_t)(desc >> 32);
    lo = (lo & 0xffff) | (base << 16);
    hi = (hi & 0x00ffff00u) | ((base >> 16) & 0xff) | (base & 0xff000000u);
    return ((uint64_t)hi << 32) | lo;
}

/* Give this CPU thread t's TLS: its descriptor in the GDT slot, the Host's
 * copy (LHCALL_LOAD_TLS), and %gs reloaded so its cached base is t's. */
static void load_tls(struct lg_thread *t)
{
    if (!t->tls_entry) return;
    uint64_t *g = cpu_gdt();
    g[t->tls_entry] = t->tls_desc;
    lguest_hcall(LHCALL_LOAD_TLS, (unsigned long)&g[LGUEST_GDT_ENTRY_TLS_MIN], 0, 0);
    uint32_t sel = (t->tls_entry << 3) | 3;
    __asm__ __volatile__("movl %0, %%gs" : : "r"(sel) : "memory");
    lg_percpu()->tp = (uint32_t)(t->tls_desc >> 16 & 0xffffff) |
                      (uint32_t)(t->tls_desc >> 32 & 0xff000000u);
}

/* ---- queues (sched_lock held) ---- */
static void enqueue(struct lg_thread *t)
{
    t->next = 0;
    if (runq_tail) runq_tail->next = t;
    else runq_head = t;
    runq_tail = t;
}

static struct lg_thread *dequeue(void)
{
    struct lg_thread *t = runq_head;
    if (t) {
        runq_head = t->next;
        if (!runq_head) runq_tail = 0;
        t->next = 0;
    }
    return t;
}

/* t can run: queue it.  No CPU is woken here: this CPU takes it when its
 * thread waits, yields or exits, and its next clock tick wakes a halted CPU
 * for it (kick_idle).  A guest's CPUs take turns on the Host, so a wake-up
 * per futex wake would cost an IPI's trip through the Host each time and buy
 * no parallelism; one per tick bounds that cost. */
static void make_runnable(struct lg_thread *t)
{
    t->state = T_RUNNABLE;
    enqueue(t);
}

/* Wake one halted CPU if threads wait for a CPU; 1 if one was woken. */
static int kick_idle(void)
{
    if (!runq_head) return 0;
    unsigned me = lg_cpu_id();
    for (unsigned i = 0; i < LG_MAX_CPUS; i++) {
        struct cpu_sched *c = &cpus[i];
        if (i != me && c->online && c->halting && !c->kicked) {
            c->kicked = 1;
            cpus[me].ipis |= 1u << i;
            return 1;
        }
    }
    return 0;
}

static void wait_list_remove(struct lg_thread *t)
{
    for (struct lg_thread **p = &waiters; *p; p = &(*p)->next) {
        if (*p == t) {
            *p = t->next;
            t->next = 0;
            return;
        }
    }
}

static int futex_wake_locked(uint32_t addr, int n, uint32_t bitset)
{
    int woken = 0;
    struct lg_thread **p = &waiters;
    while (*p && woken < n) {
        struct lg_thread *t = *p;
        if (t->futex_addr == addr && (t->bitset & bitset)) {
            *p = t->next;
            t->wake = WAKE_WOKEN;
            make_runnable(t);
            woken++;
        } else {
            p = &t->next;
        }
    }
    return woken;
}

/* Wake every timed waiter whose deadline has passed; returns the earliest
 * deadline still pending (0: none). */
static uint64_t expire(uint64_t now)
{
    uint64_t first = 0;
    struct lg_thread **p = &waiters;
    while (*p) {
        struct lg_thread *t = *p;
        if (t->deadline && t->deadline <= now) {
            *p = t->next;
            t->wake = WAKE_TIMEOUT;
            make_runnable(t);
            continue;
        }
        if (t->deadline && (!first || t->deadline < first)) first = t->deadline;
        p = &t->next;
    }
    return first;
}

static void arm_clock(uint64_t now, uint64_t deadline)
{
    uint64_t delta = deadline > now ? deadline - now : 100;
    if (delta > 0x7fffffffu) delta = 0x7fffffffu;
    this_cpu()->clock_ns = (uint32_t)delta;
}

/* Release sched_lock, then make the hypercalls it recorded: arming the clock
 * and IPIs leave the slice for the Host, and another CPU given the turn
 * meanwhile must not spin on a lock whose holder is not running.  Interrupts
 * are still off, so the thread cannot move between recording and sending. */
static void sched_unlock(void)
{
    struct cpu_sched *c = this_cpu();
    uint32_t ns = c->clock_ns, ipis = c->ipis;
    c->clock_ns = c->ipis = 0;
    lg_spin_unlock(&sched_lock);
    if (ns) lguest_set_clockevent(ns);
    for (unsigned i = 0; ipis; i++, ipis >>= 1)
        if (ipis & 1) lg_send_ipi(i, LG_THREAD_IPI);
}

static void sched_unlock_irqrestore(uint32_t was)
{
    sched_unlock();
    __asm__ __volatile__("" ::: "memory");
    lg_cpu_data()->irq_enabled = was;
}

/* ---- switching (sched_lock held, interrupts off) ---- */

/* What the context that resumes does first: finish a thread that exited on
 * this CPU (now that nothing runs on its stack), give the CPU the new
 * thread's TLS and arm its time slice. */
static void finish_switch(void)
{
    struct cpu_sched *c = this_cpu();
    struct lg_thread *d = c->dead, *t = c->cur;
    if (d) {
        c->dead = 0;
        if (d->clear_tid) {
            *d->clear_tid = 0;
            futex_wake_locked((uint32_t)d->clear_tid, 1, ~0u);
        }
        if (d->unmap_len) __lguest_syscall(91, d->unmap_base, d->unmap_len, 0, 0, 0, 0);
        d->state = T_FREE;
    }
    if (t != &c->idle) {
        load_tls(t);
        uint64_t now = lguest_monotonic_ns(), first = expire(now);
        uint64_t end = now + SLICE_NS;
        arm_clock(now, first && first < end ? first : end);
    }
}

/* The x87/SSE state (registers, control word, MXCSR) is a thread's own: a
 * preempted thread may be anywhere in a computation.  While a thread is
 * switched out, its state lives in its switch frame, on its own stack. */
struct fpu_area {
    uint8_t bytes[512];
} __attribute__((aligned(16)));

static void switch_to(struct lg_thread *prev, struct lg_thread *next)
{
    struct cpu_sched *c = this_cpu();
    c->cur = next;
    if (next != &c->idle) next->state = T_RUNNING;
    if (prev == next) return;
    uint8_t room[sizeof(struct fpu_area) + 15]; /* aligned by hand: an irq frame
                                                  * leaves the stack 4-aligned */
    struct fpu_area *fpu = (struct fpu_area *)(((uint32_t)room + 15) & ~15u);
    __asm__ __volatile__("fxsave %0" : "=m"(*fpu));
    lg_ctx_switch(&prev->ksp, next->ksp);
    __asm__ __volatile__("fxrstor %0" : : "m"(*fpu));
    finish_switch();
}

/* Leave the CPU: the current thread has blocked or exited (or, if it is still
 * T_RUNNING, yields to the next runnable thread, if any). */
static void schedule(void)
{
    struct cpu_sched *c = this_cpu();
    struct lg_thread *prev = c->cur, *next = dequeue();
    if (prev->state == T_RUNNING) {
        if (!next) return;
        make_runnable(prev);
    }
    switch_to(prev, next ? next : &c->idle);
}

/* The idle context of this CPU: entered with sched_lock held. */
static __attribute__((noreturn)) void idle_loop(void)
{
    for (;;) {
        struct cpu_sched *c = this_cpu();
        uint64_t now = lguest_monotonic_ns(), first = expire(now);
        struct lg_thread *next = dequeue();
        if (next) {
            kick_idle(); /* more woke at once (timeouts): another CPU for them */
            switch_to(&c->idle, next);
            continue;
        }
        if (first) arm_clock(now, first);
        c->halting = 1;
        c->kicked = 0;
        __lguest_idle_halts++;
        sched_unlock(); /* interrupts stay off: a wake-up ends the halt */
        lguest_halt();
        lg_spin_lock(&sched_lock);
        c->halting = 0;
        c->kicked = 0;
    }
}

__attribute__((used)) struct user_regs *lg_thread_first_c(void)
{
    finish_switch();
    struct lg_thread *t = this_cpu()->cur;
    __asm__ __volatile__("fxrstor %0" : : "m"(*(struct fpu_area *)t->fpu_init));
    sched_unlock();
    irqs_on();
    return &t->regs;
}

__attribute__((used, noreturn)) void lg_idle_first_c(void)
{
    finish_switch();
    idle_loop();
}

/* A CPU started for threads: it only runs the idle loop. */
static void secondary_idle(void *arg)
{
    (void)arg;
    lg_spin_lock(&sched_lock); /* interrupts are off on a started CPU */
    struct cpu_sched *c = this_cpu();
    c->idle.state = T_IDLE;
    c->cur = &c->idle;
    c->online = 1;
    online++;
    idle_loop();
}

/* The first clone: the caller becomes thread 1 (tid 1, as getpid says). */
static void threads_init(void)
{
    struct lg_thread *t = &threads[0];
    t->tid = 1;
    t->state = T_RUNNING;
    t->clear_tid = main_clear_tid;
    uint32_t gs;
    __asm__ __volatile__("movl %%gs, %0" : "=r"(gs));
    uint32_t e = (gs & 0xffff) >> 3;
    if (e >= LGUEST_GDT_ENTRY_TLS_MIN && e < LGUEST_GDT_ENTRY_TLS_MIN + 3) {
        t->tls_entry = e;
        t->tls_desc = cpu_gdt()[e];
    }
    struct cpu_sched *c = this_cpu();
    c->cur = t;
    c->online = 1;
    c->idle.state = T_IDLE;
    /* CPU 0's idle context needs a stack of its own; a started CPU's idle
     * loop runs on the stack lg_start_cpu gave it. */
    c->idle.ksp = new_context((uint32_t)idle_stack0 + IDLE_STACK, __lg_idle_first);
    online = 1;
    live = 1;
    threads_on = 1;
    uint64_t now = lguest_monotonic_ns();
    arm_clock(now, now + SLICE_NS); /* the caller's first time slice */
}

static long do_clone(uint32_t flags, uint32_t stack, int *ptid, uint32_t tls, int *ctid,
                     uint32_t ebp, uint32_t eip)
{
    if ((flags & (CLONE_VM | CLONE_THREAD)) != (CLONE_VM | CLONE_THREAD) || !stack)
        return -ENOSYS;
    uint32_t was = lg_spin_lock_irqsave(&sched_lock);
    if (!threads_on) threads_init();
    struct lg_thread *t = 0;
    for (int i = 1; i < LG_MAX_THREADS && !t; i++)
        if (threads[i].state == T_FREE) t = &threads[i];
    if (!t) {
        sched_unlock_irqrestore(was);
        return -EAGAIN;
    }
    struct lg_thread *parent = this_cpu()->cur;
    memset(t, 0, sizeof *t);
    t->tid = next_tid++;
    if (next_tid <= 1) next_tid = 2;
    t->regs = (struct user_regs){eip, stack, flags, stack, (uint32_t)ptid, tls,
                                 (uint32_t)ctid, ebp};
    t->tls_entry = parent->tls_entry;
    t->tls_desc = parent->tls_desc;
    if (flags & CLONE_SETTLS) {
        const uint32_t *u = (const uint32_t *)tls; /* struct user_desc */
        int32_t e = (int32_t)u[0];
        if (e >= LGUEST_GDT_ENTRY_TLS_MIN && e < LGUEST_GDT_ENTRY_TLS_MIN + 3 &&
            (uint32_t)e == parent->tls_entry)
            t->tls_desc = with_base(parent->tls_desc, u[1]);
        else {
            sched_unlock_irqrestore(was);
            return -EINVAL;
        }
    }
    if (flags & CLONE_PARENT_SETTID) *ptid = t->tid;
    if (flags & CLONE_CHILD_SETTID) *ctid = t->tid;
    if (flags & CLONE_CHILD_CLEARTID) t->clear_tid = ctid;
    /* Below the stack musl gave: the parent's x87/SSE state (as Linux's clone
     * copies it), then the first switch frame. */
    uint32_t fpu = ((stack - 64) & ~15u) - sizeof(struct fpu_area);
    __asm__ __volatile__("fxsave %0" : "=m"(*(struct fpu_area *)fpu));
    t->fpu_init = fpu;
    t->ksp = new_context(fpu, __lg_thread_first);
    live++;
    int start = live > online && online < (int)lg_cpu_count();
    make_runnable(t);
    if (!start) kick_idle(); /* a new thread goes to a halted CPU at once */
    int tid = t->tid;
    sched_unlock_irqrestore(was);
    if (start && lg_start_cpu(secondary_idle, 0) < 0) {
        /* no CPU left: the run queue has it */
    }
    irqs_on(); /* threads run with interrupts on */
    return tid;
}

/* Wait on `addr` (while it holds `val`) until woken or `deadline` (0: none). */
static long futex_wait(uint32_t addr, int val, uint64_t deadline, uint32_t bitset)
{
    uint32_t was = lg_spin_lock_irqsave(&sched_lock);
    if (!threads_on) threads_init();
    if (*(volatile int *)addr != val) {
        sched_unlock_irqrestore(was);
        return -EAGAIN;
    }
    if (deadline && deadline <= lguest_monotonic_ns()) {
        sched_unlock_irqrestore(was);
        return -ETIMEDOUT;
    }
    struct lg_thread *t = this_cpu()->cur;
    t->futex_addr = addr;
    t->bitset = bitset;
    t->deadline = deadline;
    t->wake = WAKE_NONE;
    t->next = waiters;
    waiters = t;
    t->state = T_BLOCKED;
    schedule();
    long r = t->wake == WAKE_WOKEN ? 0 : -ETIMEDOUT;
    sched_unlock_irqrestore(was);
    return r;
}

static int64_t timeout_ns(uint32_t ts, int wide, int *bad)
{
    int64_t s, ns;
    if (wide) s = ((const int64_t *)ts)[0], ns = ((const int64_t *)ts)[1];
    else s = ((const int32_t *)ts)[0], ns = ((const int32_t *)ts)[1];
    if (s < 0 || ns < 0 || ns >= 1000000000) *bad = 1;
    if (s > 0x7fffffff) s = 0x7fffffff;
    return s * 1000000000 + ns;
}

static long sys_futex(uint32_t addr, int op, int val, uint32_t ts, uint32_t addr2, int val3,
                      int wide)
{
    int cmd = op & ~(FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME), bad = 0;
    if (addr & 3) return -EINVAL;
    switch (cmd) {
    case FUTEX_WAIT:
    case FUTEX_WAIT_BITSET: {
        uint32_t bitset = cmd == FUTEX_WAIT ? ~0u : (uint32_t)val3;
        if (!bitset) return -EINVAL;
        uint64_t deadline = 0;
        if (ts) {
            int64_t t = timeout_ns(ts, wide, &bad);
            if (bad) return -EINVAL;
            uint64_t now = lguest_monotonic_ns();
            if (cmd == FUTEX_WAIT) {
                deadline = now + (uint64_t)t;
            } else if (op & FUTEX_CLOCK_REALTIME) {
                int64_t rt[2];
                __lguest_syscall(403, 0 /* CLOCK_REALTIME */, (long)rt, 0, 0, 0, 0);
                int64_t left = t - (rt[0] * 1000000000 + rt[1]);
                deadline = now + (left > 0 ? (uint64_t)left : 0);
            } else {
                deadline = (uint64_t)t;
            }
            if (!deadline) deadline = 1;
        }
        return futex_wait(addr, val, deadline, bitset);
    }
    case FUTEX_WAKE:
    case FUTEX_WAKE_BITSET: {
        uint32_t bitset = cmd == FUTEX_WAKE ? ~0u : (uint32_t)val3;
        if (!bitset) return -EINVAL;
        if (!threads_on) return 0;
        uint32_t was = lg_spin_lock_irqsave(&sched_lock);
        int n = futex_wake_locked(addr, val, bitset);
        sched_unlock_irqrestore(was);
        return n;
    }
    case FUTEX_REQUEUE:
    case FUTEX_CMP_REQUEUE: {
        if (addr2 & 3) return -EINVAL;
        if (!threads_on) return 0;
        uint32_t was = lg_spin_lock_irqsave(&sched_lock);
        if (cmd == FUTEX_CMP_REQUEUE && *(volatile int *)addr != val3) {
            sched_unlock_irqrestore(was);
            return -EAGAIN;
        }
        int n = futex_wake_locked(addr, val, ~0u);
        int moved = 0, limit = (int)ts; /* val2 travels in the timeout's place */
        for (struct lg_thread *t = waiters; t && moved < limit; t = t->next) {
            if (t->futex_addr == addr) {
                t->futex_addr = addr2;
                moved++;
            }
        }
        sched_unlock_irqrestore(was);
        return n + (cmd == FUTEX_CMP_REQUEUE ? moved : 0);
    }
    }
    return -ENOSYS;
}

/* ---- what runtime.c calls ---- */

/* Block the calling thread until the monotonic clock reaches `deadline`;
 * 0 if threads are not in use (the caller sleeps the CPU itself). */
int lg_thread_sleep(uint64_t deadline)
{
    if (!threads_on) return 0;
    static int never; /* nobody wakes it: only the deadline ends the wait */
    while (lguest_monotonic_ns() < deadline)
        futex_wait((uint32_t)&never, 0, deadline, ~0u);
    return 1;
}

/* Block the calling thread while *word holds val, until lg_thread_wake_word
 * or `deadline` (monotonic ns; 0: none); 0 if threads are not in use (the
 * caller waits on its CPU itself).  A change of *word before the wait is seen
 * under sched_lock, so a wake-up between the caller's look and here is never
 * lost. */
int lg_thread_wait_word(volatile uint32_t *word, uint32_t val, uint64_t deadline)
{
    if (!threads_on) return 0;
    futex_wait((uint32_t)word, (int)val, deadline, ~0u);
    return 1;
}

/* 1 once the program has threads (the thread scheduler owns the CPUs). */
int lg_thread_active(void) { return threads_on; }

/* From an irq handler (interrupts off), on whichever CPU took the irq: every
 * thread waiting on `word` becomes runnable, and a halted CPU is woken for
 * them (LG_THREAD_IPI) unless this CPU is idle and takes them itself when
 * its halt ends.  Integer work only, but the interrupted thread's x87/SSE
 * state is saved around it as at the clock interrupt. */
void lg_thread_wake_word(volatile uint32_t *word)
{
    if (!threads_on) return;
    uint8_t room[sizeof(struct fpu_area) + 15];
    struct fpu_area *fpu = (struct fpu_area *)(((uint32_t)room + 15) & ~15u);
    __asm__ __volatile__("fxsave %0" : "=m"(*fpu));
    lg_spin_lock(&sched_lock);
    struct cpu_sched *c = this_cpu();
    if (futex_wake_locked((uint32_t)word, LG_MAX_THREADS, ~0u) && c->cur != &c->idle)
        kick_idle();
    sched_unlock();
    __asm__ __volatile__("fxrstor %0" : : "m"(*fpu));
}

/* The clock interrupt (irq 0) on this CPU, interrupts off: wake timed-out
 * waiters and end the running thread's slice if another waits for a CPU. */
static __attribute__((noinline)) void clock_tick(void)
{
    lg_spin_lock(&sched_lock);
    struct cpu_sched *c = this_cpu();
    uint64_t now = lguest_monotonic_ns(), first = expire(now);
    if (c->cur != &c->idle) {
        if (runq_head && !kick_idle())
            schedule(); /* no CPU is free: the slice is over, the next thread's turn */
        else arm_clock(now, first && first < now + SLICE_NS ? first : now + SLICE_NS);
    }
    sched_unlock();
}

/* The interrupted thread may be in the middle of any computation: its x87/SSE
 * registers are saved before anything here may use them (the clock's
 * arithmetic is SSE2) and restored when it resumes. */
void lg_thread_clock(void)
{
    if (!threads_on) return;
    uint8_t room[sizeof(struct fpu_area) + 15];
    struct fpu_area *fpu = (struct fpu_area *)(((uint32_t)room + 15) & ~15u);
    __asm__ __volatile__("fxsave %0" : "=m"(*fpu));
    clock_tick();
    __asm__ __volatile__("fxrstor %0" : : "m"(*fpu));
}

/* The system calls of threads; 1 (and *result set) if handled here.  `frame`
 * is the dispatcher's argument block: nr, the six arguments, the six saved
 * registers, then the caller's return address (where a clone child starts). */
int lg_thread_syscall(const long *frame, long *result)
{
    long nr = frame[0], a1 = frame[1], a2 = frame[2], a3 = frame[3], a4 = frame[4],
         a5 = frame[5], a6 = frame[6];
    switch (nr) {
    case 120: { /* clone */
        uint32_t eip = (uint32_t)frame[13];
        *result = do_clone(a1, a2, (int *)a3, a4, (int *)a5, a6, eip);
        /* musl's clone is an int $0x80: its frame (eip, cs, eflags) was pushed
         * with interrupts off before the first thread; the parent's iret must
         * leave them on (irqs_on's IF), or its next irq would turn them off. */
        if (*result > 0 && *(const uint16_t *)(eip - 2) == 0x80cd &&
            (uint32_t)frame[14] == LGUEST_KERNEL_CS)
            ((long *)frame)[15] |= LGUEST_IRQ_ON;
        return 1;
    }
    case 2:   /* fork */
    case 190: /* vfork */
        *result = -ENOSYS;
        return 1;
    case 240: /* futex */
    case 422: /* futex_time64 */
        *result = sys_futex(a1, a2, a3, a4, a5, a6, nr == 422);
        return 1;
    case 158: /* sched_yield */
        if (threads_on) {
            uint32_t was = lg_spin_lock_irqsave(&sched_lock);
            schedule();
            sched_unlock_irqrestore(was);
        }
        *result = 0;
        return 1;
    case 224: /* gettid */
        *result = threads_on ? this_cpu()->cur->tid : 1;
        return 1;
    case 258: /* set_tid_address */
        if (threads_on) this_cpu()->cur->clear_tid = (volatile int *)a1;
        else main_clear_tid = (volatile int *)a1;
        *result = threads_on ? this_cpu()->cur->tid : 1;
        return 1;
    case 238: /* tkill */
    case 270: /* tgkill: a signal to a thread kills the guest, as to the process */
        if (!threads_on) return 0;
        {
            int tid = nr == 238 ? a1 : a2;
            long sig = nr == 238 ? a2 : a3;
            if (nr == 270 && a1 != 1) return 0;
            for (int i = 0; i < LG_MAX_THREADS; i++) {
                if (threads[i].state != T_FREE && threads[i].state != T_DEAD &&
                    threads[i].tid == tid) {
                    /* No signal is delivered; musl's pthread_cancel (SIGCANCEL)
                     * has set the target's cancel flag, which its next
                     * cancellation point acts on. */
                    int other = &threads[i] != this_cpu()->cur;
                    *result = (other && sig == SIGCANCEL) || !sig
                                  ? 0
                                  : __lguest_syscall(37, 1, sig, 0, 0, 0, 0);
                    return 1;
                }
            }
            *result = -ESRCH;
            return 1;
        }
    case 242: { /* sched_getaffinity(pid, len, mask) */
        /* Every thread may run on every CPU of the guest (the scheduler starts
         * them as it needs them): the mask is the guest's CPUs, 4 bytes (one
         * long, as Linux's cpumask with at most 32 CPUs).  Allocators size
         * their per-CPU arenas by it (musl's sysconf, Zig's SmpAllocator). */
        int known = a1 == 0 || (!threads_on && a1 == 1);
        for (int i = 0; threads_on && !known && i < LG_MAX_THREADS; i++)
            known = threads[i].state != T_FREE && threads[i].state != T_DEAD &&
                    threads[i].tid == a1;
        if (!known) *result = -ESRCH;
        else if ((unsigned long)a2 < 4 || (a2 & 3)) *result = -EINVAL;
        else {
            uint32_t n = lg_cpu_count();
            *(uint32_t *)a3 = n >= 32 ? ~0u : (1u << n) - 1;
            *result = 4;
        }
        return 1;
    }
    case 91: /* munmap: a detached thread unmapping its own stack before exit */
        if (threads_on) {
            uint32_t sp;
            __asm__ __volatile__("movl %%esp, %0" : "=r"(sp));
            if (sp - (uint32_t)a1 < (uint32_t)a2) {
                struct lg_thread *t = this_cpu()->cur;
                t->unmap_base = a1, t->unmap_len = a2;
                *result = 0;
                return 1;
            }
        }
        return 0;
    case 1: /* exit: this thread only, unless it is the last */
        if (!threads_on) return 0;
        {
            uint32_t was = lg_spin_lock_irqsave(&sched_lock);
            if (live == 1) {
                sched_unlock_irqrestore(was);
                return 0; /* the process ends with it */
            }
            struct cpu_sched *c = this_cpu();
            struct lg_thread *t = c->cur;
            live--;
            t->state = T_DEAD;
            c->dead = t;
            schedule();
            lguest_crash("exited thread resumed");
        }
    }
    return 0;
}
