/*
 * Native slice meters for Unicorn CPUs: two ways to end a slice exactly.
 *
 * 1. The block hook (block_hook).  Unicorn calls it on the emulating thread
 *    before each translated block runs.  The hook ends the slice there
 *    (uc_emu_stop from inside a hook is exact: the block has not run yet) when
 *    another thread raised `stop` or when the slice's block budget or its time is
 *    spent.  The clock is read when (blocks & clock_mask) == 0: every block for a
 *    guest whose blocks are slow, every 256 for the rest.  It costs a helper call
 *    per block; it is kept for CPUs that need blocks counted (block limits, the
 *    debugger) and when the exit-request path is not available.
 *
 * 2. The exit request (run/kick and the slicer thread).  No per-block
 *    cost: the engine's translated code was generated with Unicorn's
 *    `no_exit_request` flag set (supervisor/_slicing.py), so the only place it
 *    looks at an exit request is the check QEMU puts at the start of every
 *    translated block, before any of the block's instructions ran.  A stop sent
 *    from any thread (uc_emu_stop, the same call Unicorn's own timeout thread
 *    makes) therefore lands on a block boundary.  One slicer thread per process
 *    sends the stop when a running slice's deadline passes; kick() sends it at
 *    once.  A stop sent before emu_start has reset the engine's stop state would
 *    be lost, so while a run is still in progress the stop is sent again every
 *    RESEND_NS, and ever less often once it is known to have landed (resend_after).
 *    All of this state is guarded by one mutex; uc_emu_stop is only
 *    ever called between do_enter() and do_leave() (inside run()), so never on a
 *    closed engine.  run() also reads eip and keeps the slice's CPU-time account,
 *    intr_hook handles the hypercall trap, completing the CPU-local calls it can
 *    itself, with no Python (see below), and an irq raised while a run goes on
 *    (interrupt()) is delivered by run() itself at the block boundary its stop lands
 *    on, and the next run started, also with no Python (irq_in_run).
 *    See docs/performance.md, "Exact slices".
 *
 * The hooks' user data is not a fuel_t but the address of a cell holding one's address:
 * the cell belongs to the Unicorn instance (supervisor/_unicorn.py, Seat), so an
 * instance handed to another CPU keeps its hooks and only the cell is pointed at
 * the new CPU's fuel_t.
 *
 * The fuel_t layout is mirrored by supervisor/_slicing.py (ctypes), which checks every
 * field's offset and size against fuel_layout at import.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/prctl.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#define HAVE_RDTSC 1
#endif

#define REASON_NONE 0
#define REASON_STOP 1
#define REASON_BUDGET 2
#define REASON_IRQ 3    /* an interrupt was raised: deliver it and go on (not a kick) */
#define RESEND_NS 50000 /* a run whose stop may have been lost is stopped again this often */
#define LANDED_NS 50000 /* CPU time after do_enter() by which emu_start has reset its stop state */
#define LANDED_SHIFT 4  /* a landed stop is resent first after RESEND_NS << LANDED_SHIFT, */
#define MAX_BACKOFF 7   /* then at doubling intervals up to RESEND_NS << MAX_BACKOFF */
#define TICK_NS 500000  /* while runs keep starting, the slicer wakes at least this often */
#define MAX_STRETCH 50   /* a run's deadline moves to at most this many spans after do_enter() */
#define MIN_STRETCH_NS 20000 /* CPU time worth moving a deadline for */
#define STRETCH_AHEAD 4      /* a moved deadline gives at most this many times what is missing */

typedef struct fuel {
    volatile int32_t stop;      /* set by any thread: end the slice at the next block */
    int32_t reason;             /* 0 none, 1 stop requested, 2 budget spent */
    int64_t budget;             /* blocks this slice may still start (block hook only) */
    uint64_t blocks;            /* blocks started, in total (block hook only) */
    int (*emu_stop)(void *uc);  /* uc_emu_stop from the unicorn shared library */
    int64_t deadline;           /* CLOCK_MONOTONIC nanoseconds at which the slice ends */
    uint64_t clock_mask;        /* read the clock when (blocks & clock_mask) == 0 */
    /* exit-request slicing; the fields below belong to the slicer's mutex */
    void *uc;                   /* the engine to stop */
    int32_t running;            /* between do_enter() and do_leave() */
    int32_t sent;               /* a stop was sent during this run: 1 it may have been lost,
                                   n >= 2 it landed, and was resent n - 2 times since (up to
                                   the bound; resend_after) */
    int64_t sent_at;            /* when it was last sent */
    struct fuel *next;          /* the list of running slices */
    struct fuel *prev;
    int32_t cpu_clock;          /* the emulating thread's CPU-time clock (a clockid_t) */
    int32_t exit_request;       /* run(): this CPU is on the exit-request path */
    int64_t cpu_start;          /* its CPU time at do_enter() */
    int64_t span;               /* deadline - now at do_enter(): the CPU time this run may use */
    int64_t latest;             /* wall time after which the deadline is not moved again */
    /* run(): the slice's CPU-time account, owned by the emulating thread; besides the
       slice's Python and run() with the GIL, run() changes `left` without the GIL (an irq
       it delivers, irq_in_run) and cut() from another thread, both under the lock */
    int64_t left;               /* ns of the emulating thread's CPU time left in the slice */
    int64_t mark;               /* that thread's CPU time when the slice's last run started, 0: none */
    /* the interrupt hook (intr_hook); set by the slice before each run */
    volatile uint8_t *ring;     /* the async ring's status bytes in guest memory; NULL: stop at
                                   every trap (no lguest_data yet, or a hypercall pending) */
    PyObject *local;            /* local(number, a1, a2, a3) -> stop?: a CPU-local hypercall */
    uint64_t local_mask;        /* bit n: hypercall n is CPU-local (supervisor/hypercalls.py) */
    int32_t next_hcall;         /* the ring's next slot */
    int32_t vector;             /* the trap that ended the run, -1: none (run() resets it) */
    uint32_t hcall[4];          /* eax, edx, ebx, ecx of that trap, if hcall_read */
    int32_t hcall_read;
    int32_t irq;                /* interrupt(): an irq waits; the next do_enter() stops the run */
    /* The hypercalls intr_hook completes itself (native_hcall), and the CPU-local state
       they change.  This is the state's only copy: Python reads and writes it here too
       (LgCpu.idt, .stack and .ts are views of these fields, supervisor/cpu.py). */
    uint64_t native_mask;       /* bit n: complete hypercall n here (a subset of local_mask) */
    uint64_t native_done;       /* hypercalls completed here; the run loop adds them to stats */
    /* The guest's IDT: lo, hi of each gate.  The CPU's own table whenever it holds an
       engine (so whenever a run may write it); while it waits without one, possibly a
       table shared with the CPUs whose IDT has the same bytes, which nothing writes
       (supervisor/_slicing.py: share_idt, own_idt). */
    uint32_t (*idt)[2];
    uint32_t stack[3];          /* LHCALL_SET_STACK's ss, esp, pages */
    int32_t ts;                 /* LHCALL_TS's flag */
    /* The guest's memory, for the page-table calls' checks: fixed for the guest's life */
    uint8_t *ram;               /* guest-physical 0 in this process; NULL: no page-table calls
                                   and no native interrupt delivery */
    uint32_t pfn_limit;         /* pages of guest-physical memory (Lguest.pfn_limit) */
    int32_t pad2;
    /* A lone slice (no job waited for a worker when it began): how many ns of its time
       are beyond a slice taken in turn, for cut() to take off once a job waits.  Written
       with the GIL held (the slice's Python, cut()). */
    int64_t lone;
    /* Irqs.  The CPU's pending irqs, their only copy (LgCpu.irqs_pending is a view of it):
       changed only atomically (interrupt() sets a bit, take_irq() and run() clear one). */
    uint32_t irqs_pending;
    int32_t wrote;              /* interrupt() for a Host write: run() leaves its stop to Python */
    /* run() delivers an irq raised while it ran (its REASON_IRQ stop) itself and runs on,
       without the GIL, while `irq_native` is set: the slice sets it and the fields below
       for an executor slice of a one-CPU guest with its lguest_data (execute.py). */
    int32_t irq_native;
    uint32_t irq_data;          /* lguest_data (guest-physical) */
    uint32_t noirq_start;       /* Lguest.noirq_start, noirq_end: no irq while eip is there */
    uint32_t noirq_end;
    uint32_t kernel;            /* Lguest.kernel_address (deliver_frame's aliases) */
    int32_t handler_bound;      /* such an irq's handler got the slice's last handler_ns */
    int64_t handler_ns;         /* CPU time a delivered irq's handler gets at least */
    uint64_t irq_stops;         /* runs a REASON_IRQ stop ended that run() went on with */
    uint64_t irqs_native;       /* irqs run() delivered (the slice adds both to CpuStats) */
} fuel_t;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void block_hook(void *uc, uint64_t address, uint32_t size, void *user)
{
    fuel_t *fuel = *(fuel_t *const *)user; /* the instance's cell: its CPU's fuel_t */
    (void)address;
    (void)size;
    if (fuel->stop) {
        fuel->reason = REASON_STOP;
        fuel->emu_stop(uc);
        return;
    }
    if (fuel->budget <= 0 ||
        ((fuel->blocks & fuel->clock_mask) == 0 && now_ns() >= fuel->deadline)) {
        fuel->reason = REASON_BUDGET;
        fuel->emu_stop(uc);
        return;
    }
    fuel->budget--;
    fuel->blocks++;
}

/* ---- the exit-request slicer ------------------------------------------------ */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake;
static fuel_t *running;  /* slices between do_enter() and do_leave() */
static int slicer_started;
static int64_t wake_at = INT64_MAX; /* when the slicer wakes next */
static int recent;                  /* a short run started since the slicer last woke */
static unsigned long long wakes;    /* the slicer's wake-ups (slicer_stats) */
static unsigned long long ticks;    /* sleeps it cut short to TICK_NS for `recent` */
static unsigned long long moved;    /* deadlines it moved (stretch) */
static unsigned long long resent;   /* stops it sent again */
/* Calls with the GIL held (kick, interrupt, hurry, cut: the event loop's, mostly) that
   found the lock taken and waited for it, every other thread of the interpreter
   waiting meanwhile (slicer_stats). */
static unsigned long long lock_waits;
static unsigned long long lock_wait_ns; /* and how long they waited in all */

/* Take the lock for a call that holds the GIL, counting a wait (lock_waits). */
static void lock_holding_gil(void)
{
    if (pthread_mutex_trylock(&lock) != 0) {
        int64_t start = now_ns();
        pthread_mutex_lock(&lock);
        lock_waits++; /* (under the lock) */
        lock_wait_ns += (unsigned long long)(now_ns() - start);
    }
}

/* Let go of the lock, then wake the slicer if `wake_slicer`.  Never the other way round:
   the slicer runs at a real-time priority where it may, so a signal sent with the lock
   held has it preempt the signalling thread at once, only to wait for the lock that
   thread holds; a niced worker preempted so, on a loaded machine, then waits for a core
   for milliseconds with the lock held, and the event loop's next kick or irq waits
   with it, holding the GIL (lock_waits).  The slicer looks at every run under the lock
   whenever it wakes, so nothing is lost by signalling after the unlock. */
static void unlock_and_wake(int wake_slicer)
{
    pthread_mutex_unlock(&lock);
    if (wake_slicer)
        pthread_cond_signal(&wake);
}

static int64_t clock_ns(clockid_t clock)
{
    struct timespec ts;
    if (clock_gettime(clock, &ts) != 0)
        return INT64_MAX;
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Lock held; fuel running.  Whether a stop sent now lands: a stop is lost only if it
   comes before emu_start has reset the engine's stop state, a few microseconds of the
   run's thread's CPU time after do_enter() (no translation, no allocation: the engine
   is set up before its first run).  CPU time, not wall time: a thread preempted in
   between has not got there however long ago do_enter() was.  Unknown without the
   thread's CPU clock (`latest` 0): not landed. */
static int landed(const fuel_t *f)
{
    if (f->latest == 0)
        return 0;
    int64_t cpu = clock_ns((clockid_t)f->cpu_clock);
    return cpu != INT64_MAX && cpu - f->cpu_start >= LANDED_NS;
}

/* Lock held; fuel running. */
static void send_stop(fuel_t *fuel, int32_t reason, int64_t now)
{
    if (fuel->reason == REASON_NONE || fuel->reason == REASON_IRQ || reason == REASON_STOP)
        fuel->reason = reason;
    fuel->sent = landed(fuel) ? 2 : 1;
    fuel->sent_at = now;
    fuel->emu_stop(fuel->uc);
}

/* Lock held.  The deadline is wall time, but a run's share is CPU time: a thread
   that the kernel preempted (other processes, our own other workers) while its
   deadline ran did not get its slice, and cutting it short there would make
   progress depend on who was preempted when (fairness under load).  So when the
   deadline passes and the thread has used less CPU than the span it was given,
   the deadline moves, until `latest` (MAX_STRETCH spans), far enough for what is
   missing at the share of a core the thread got since do_enter(): moving it by
   only what is missing would wake the slicer again and again while the thread
   gets a fraction of a core (a geometric series: about twenty wake-ups a slice
   at a fifth).  At most STRETCH_AHEAD times what is missing, so that a thread
   whose share grows back meanwhile overruns by at most that much. */
static int stretch(fuel_t *f, int64_t now)
{
    if (now >= f->latest)
        return 0;
    int64_t used = clock_ns((clockid_t)f->cpu_clock) - f->cpu_start;
    int64_t missing = f->span - used;
    if (missing < MIN_STRETCH_NS)
        return 0;
    int64_t elapsed = now - (f->latest - MAX_STRETCH * f->span); /* since do_enter() */
    int64_t wait = STRETCH_AHEAD * missing;
    if (used > 0 && elapsed < STRETCH_AHEAD * used)
        wait = elapsed > used ? (int64_t)((double)missing * (double)elapsed / (double)used)
                              : missing;
    f->deadline = now + wait < f->latest ? now + wait : f->latest;
    moved++;
    return 1;
}

/* Lock held; a stop was sent to this run.  How long after the last sending to send it
   again (the run has not returned meanwhile).  A stop that landed (landed(): sent past
   emu_start's reset) is on its way out: the run is slow to return because its thread is
   not running (a loaded machine), and sending it again every RESEND_NS would only wake
   the slicer (a core taken, from a worker or the event loop, each time), so it is sent
   again only after RESEND_NS << LANDED_SHIFT, then at doubling intervals up to RESEND_NS
   << MAX_BACKOFF (a bound, should the run's thread have been in the reset after all).
   Otherwise a kick's stop (or an irq's, a hurry's): RESEND_NS, in case it came before
   that reset.  A deadline's: the run's thread has used its share of CPU since
   do_enter(), so it is past that reset and has the stop unless the deadline passed at
   `latest` before it ran; the interval doubles: RESEND_NS, then the time since the
   deadline. */
static int64_t resend_after(const fuel_t *f)
{
    if (f->sent >= 2) {
        int shift = LANDED_SHIFT + f->sent - 2;
        return RESEND_NS << (shift < MAX_BACKOFF ? shift : MAX_BACKOFF);
    }
    if (f->stop)
        return RESEND_NS;
    int64_t since = f->sent_at - f->deadline;
    return since > RESEND_NS ? since : RESEND_NS;
}

static void *slicer(void *arg)
{
    (void)arg;
    prctl(PR_SET_TIMERSLACK, 1000UL); /* deadlines to the microsecond, not the default 50 */
    /* A deadline is only kept if this thread runs when its timer fires.  On a loaded
       machine a woken normal thread can wait milliseconds for a CPU, as long as a whole
       slice, so ask for the lowest real-time priority: the thread runs for
       microseconds per wake-up, so others lose nothing.  Without the
       privilege (CAP_SYS_NICE / RLIMIT_RTPRIO) it stays a normal thread. */
    struct sched_param param = {.sched_priority = 1};
    pthread_setschedparam(pthread_self(), SCHED_FIFO, &param);
    pthread_mutex_lock(&lock);
    for (;;) {
        int64_t now = now_ns();
        int64_t next = INT64_MAX;
        wakes++;
        for (fuel_t *f = running; f != NULL; f = f->next) {
            if (!f->sent) {
                if (now < f->deadline || stretch(f, now)) {
                    if (f->deadline < next)
                        next = f->deadline;
                    continue;
                }
                send_stop(f, REASON_BUDGET, now);
            } else if (now - f->sent_at >= resend_after(f)) {
                if (f->sent == 1)
                    f->sent = landed(f) ? 2 : 1;
                else if (LANDED_SHIFT + f->sent - 2 < MAX_BACKOFF)
                    f->sent++;
                f->sent_at = now;
                f->emu_stop(f->uc);
                resent++;
            }
            if (f->sent_at + resend_after(f) < next)
                next = f->sent_at + resend_after(f);
        }
        /* Waking a thread costs tens of microseconds here (a VM), far more than a
           short run, so do_enter() only wakes the slicer when it sleeps past the new
           deadline.  While short runs keep starting the slicer ticks; once they stop,
           it sleeps until woken and costs nothing.  A long run (a busy executor
           slice) does not make it tick: its deadline, or the one it is woken for,
           comes before a tick would help, and on a machine whose every core runs a
           busy slice each wake-up takes a core from one of them. */
        if (recent && now + TICK_NS < next) {
            next = now + TICK_NS;
            ticks++;
        }
        recent = 0;
        wake_at = next;
        if (next == INT64_MAX) {
            pthread_cond_wait(&wake, &lock);
        } else {
            struct timespec ts = {(time_t)(next / 1000000000), (long)(next % 1000000000)};
            pthread_cond_timedwait(&wake, &lock, &ts);
        }
        wake_at = 0; /* awake: it looks at every run before it sleeps again */
    }
    return NULL;
}

static void init_wake(void)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&wake, &attr);
    pthread_condattr_destroy(&attr);
}

/* A forked child has no slicer thread and no running slices. */
static void after_fork_child(void)
{
    pthread_mutex_init(&lock, NULL);
    init_wake();
    running = NULL;
    slicer_started = 0;
    wake_at = INT64_MAX;
    recent = 0;
    wakes = ticks = moved = resent = lock_waits = lock_wait_ns = 0;
}

static fuel_t *fuel_arg(PyObject *arg)
{
    fuel_t *fuel = PyLong_AsVoidPtr(arg);
    if (fuel == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "null fuel address");
    return fuel;
}

/* Register a run that starts now; `clock`/`cpu_now`: the calling thread's CPU clock and its
   reading (cpu_now < 0: not known, read it here).  `span` >= 0: the run's deadline is that
   many ns from now, taken under the lock (so time the thread spent getting here, e.g.
   preempted after releasing the GIL on a loaded machine, does not eat the run's share,
   which could end an IRQ handler's inline slice before its first instruction);
   < 0: `deadline` is already set.  Returns 0 or an errno. */
static int do_enter(fuel_t *fuel, int have_clock, clockid_t clock, int64_t cpu_now, int64_t span)
{
    pthread_mutex_lock(&lock);
    if (!slicer_started) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int err = pthread_create(&thread, &attr, slicer, NULL);
        pthread_attr_destroy(&attr);
        if (err != 0) {
            pthread_mutex_unlock(&lock);
            return err;
        }
        slicer_started = 1;
    }
    int64_t now = now_ns();
    if (span >= 0)
        fuel->deadline = now + span;
    fuel->span = fuel->deadline > now ? fuel->deadline - now : 0;
    fuel->latest = now + MAX_STRETCH * fuel->span;
    if (!have_clock && pthread_getcpuclockid(pthread_self(), &clock) == 0)
        have_clock = 1;
    if (have_clock) {
        fuel->cpu_clock = (int32_t)clock;
        fuel->cpu_start = cpu_now >= 0 ? cpu_now : clock_ns(clock);
    } else {
        fuel->latest = 0; /* no CPU clock: plain wall-clock deadlines */
    }
    fuel->running = 1;
    fuel->sent = 0;
    fuel->prev = NULL;
    fuel->next = running;
    if (running != NULL)
        running->prev = fuel;
    running = fuel;
    if (fuel->span <= TICK_NS)
        recent = 1;
    if (fuel->stop)
        send_stop(fuel, REASON_STOP, now_ns());
    else if (fuel->irq)
        send_stop(fuel, REASON_IRQ, now_ns());
    fuel->irq = 0;
    unlock_and_wake((fuel->sent ? fuel->sent_at + resend_after(fuel) : fuel->deadline) < wake_at);
    return 0;
}

/* The run registered by do_enter() has returned: no stop is sent to it after this. */
static void do_leave(fuel_t *fuel)
{
    pthread_mutex_lock(&lock);
    if (fuel->running) {
        if (fuel->prev != NULL)
            fuel->prev->next = fuel->next;
        else
            running = fuel->next;
        if (fuel->next != NULL)
            fuel->next->prev = fuel->prev;
        fuel->next = fuel->prev = NULL;
        fuel->running = 0;
    }
    pthread_mutex_unlock(&lock);
}

/* ---- run(): one entry into the guest, in one call ------------------------------ */

static int irq_in_run(fuel_t *fuel, clockid_t clock); /* (below, with deliver()) */

typedef int (*emu_start_fn)(void *uc, uint64_t begin, uint64_t until, uint64_t timeout, size_t count);
typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef int (*reg_write_fn)(void *uc, int regid, const void *value);
static emu_start_fn uc_emu_start_fn;
static reg_read_fn uc_reg_read_fn;
static reg_write_fn uc_reg_write_fn;
static int eip_id = -1;
static int hcall_ids[4]; /* eax, edx, ebx, ecx */
static int cr0_id = -1, cr3_id = -1;
/* interrupt delivery (deliver()): the frame's registers, cr4, and uc_ctl's call and
   request code for TB_REMOVE_CACHE (guest-virtual begin, end) */
typedef int (*ctl_fn)(void *uc, int control, ...);
static ctl_fn uc_ctl_fn;
static int remove_cache_request;
static int eflags_id = -1, cs_id = -1, esp_id = -1, cr4_id = -1;
static int flush_request; /* uc_ctl's request code for TB_FLUSH (every translation) */

#define TRAP_ENTRY 0x1f
#define HCALL_FREE 0xff

/* ---- hypercalls completed in C --------------------------------------------------
   Which calls are done here is decided by supervisor/hypercalls.py's table (native=True),
   which sets native_mask; NATIVE_CALLS is what this file knows how to do, and
   _slicing.trap_interrupts refuses a table that marks anything else.  Each case does
   exactly what the Python handler named beside it does for arguments it accepts; for
   any argument that handler would refuse (kill the guest), native_hcall returns 0
   and the hook hands the call to Python, so the death and its message come from the
   one handler.  tests/test_hotpath.py runs valid and hostile calls through both and
   compares the state and the deaths.  The numbers are supervisor/abi.py's. */
#define LHCALL_FLUSH_TLB 5
#define LHCALL_LOAD_IDT_ENTRY 6
#define LHCALL_SET_STACK 7
#define LHCALL_TS 8
#define LHCALL_SET_PTE 14
#define LHCALL_SET_PMD 15
#define NATIVE_CALLS (1u << LHCALL_FLUSH_TLB | 1u << LHCALL_LOAD_IDT_ENTRY | \
                      1u << LHCALL_SET_STACK | 1u << LHCALL_TS | 1u << LHCALL_SET_PTE | \
                      1u << LHCALL_SET_PMD)
#define IDT_ENTRIES 256
#define GUEST_PL 0 /* abi.GUEST_PL */
#define CR0_TS (1u << 3)
#define GATE_INTERRUPT 0xe
#define GATE_TRAP 0xf
#define GATE_PRESENT 0x8000u
#define PAGE_SIZE 4096
#define SWITCHER_ADDR 0xffc00000u /* abi.SWITCHER_ADDR: the Host's top 4 MiB */
#define SWITCHER_PGD_INDEX 1023
#define PTRS_PER_TABLE 1024
#define PTE_PRESENT 0x1
#define PTE_PSE 0x80

/* pagetables.pgdir_ok: a page-aligned page inside guest memory */
static int pgdir_ok(const fuel_t *fuel, uint32_t pgdir)
{
    return pgdir % PAGE_SIZE == 0 &&
           (uint64_t)pgdir + PAGE_SIZE <= (uint64_t)fuel->pfn_limit * PAGE_SIZE;
}

/* pagetables.check_entry: a present entry may not name a page past the limit */
static int entry_ok(const fuel_t *fuel, uint32_t entry, int big)
{
    if (!(entry & PTE_PRESENT))
        return 1;
    return ((entry & (big ? 0xffc00000u : 0xfffff000u)) >> 12) < fuel->pfn_limit;
}

/* interrupts.IGNORED_VECTORS: NMI, double fault, spurious, the hypercall trap */
static const uint32_t IGNORED_VECTORS[] = {2, 8, 15, TRAP_ENTRY};
#define N_IGNORED (sizeof IGNORED_VECTORS / sizeof IGNORED_VECTORS[0])

static int ignored_vector(uint32_t num)
{
    for (size_t i = 0; i < N_IGNORED; i++)
        if (num == IGNORED_VECTORS[i])
            return 1;
    return 0;
}

/* A 32-bit register through Unicorn's own call, like _unicorn.Registers. */
static int reg32(void *uc, int id, uint32_t *value)
{
    uint64_t v = 0;
    if (uc_reg_read_fn(uc, id, &v) != 0)
        return 0;
    *value = (uint32_t)v;
    return 1;
}

static int set_reg32(void *uc, int id, uint32_t value)
{
    uint64_t v = value;
    return uc_reg_write_fn(uc, id, &v) == 0;
}

/* Complete hypercall `number` as its Python handler would; 1: done, 0: Python must
   do it (an argument the handler refuses, or a register call that failed; nothing
   was changed then). */
static int native_hcall(void *uc, fuel_t *fuel, uint32_t number, uint32_t a1, uint32_t a2,
                        uint32_t a3)
{
    uint32_t value;
    switch (number) {
    case LHCALL_LOAD_IDT_ENTRY: { /* interrupts.load_idt_entry(num=a1, lo=a2, hi=a3) */
        if (a1 >= IDT_ENTRIES)
            return 0; /* kills: "Setting idt entry" */
        if (ignored_vector(a1))
            return 1;
        uint32_t type = (a3 >> 8) & 0xf;
        if ((a3 & GATE_PRESENT) && type != GATE_INTERRUPT && type != GATE_TRAP)
            return 0; /* kills: "bad IDT type" */
        fuel->idt[a1][0] = a2;
        fuel->idt[a1][1] = a3;
        return 1;
    }
    case LHCALL_SET_STACK: /* hypercalls._set_stack(ss=a1, esp=a2, pages=a3) */
        if ((a1 & 3) != GUEST_PL || a3 > 2)
            return 0; /* kills: "bad stack segment" / "bad stack pages" */
        fuel->stack[0] = a1;
        fuel->stack[1] = a2;
        fuel->stack[2] = a3;
        return 1;
    case LHCALL_TS: /* hypercalls._ts(on=a1) */
        if (!reg32(uc, cr0_id, &value))
            return 0;
        if (!set_reg32(uc, cr0_id, a1 ? value | CR0_TS : value & ~CR0_TS))
            return 0;
        fuel->ts = a1 ? 1 : 0;
        return 1;
    case LHCALL_SET_PTE: /* pagetables.set_pte(pgdir=a1, vaddr=a2, pte=a3) */
        if (fuel->ram == NULL || !pgdir_ok(fuel, a1) || a2 >= SWITCHER_ADDR ||
            !entry_ok(fuel, a3, 0))
            return 0; /* kills: "bad page directory", "attempt to access switcher pages",
                         "bad page" */
        goto flush;
    case LHCALL_SET_PMD: { /* pagetables.set_pmd(pgdir=a1, index=a2) */
        if (fuel->ram == NULL || !pgdir_ok(fuel, a1) || a2 >= PTRS_PER_TABLE)
            return 0; /* kills: "bad page directory ... index" */
        if (a2 >= SWITCHER_PGD_INDEX)
            return 0; /* Python rewrites the Host's entry: a Host write to guest memory,
                         which every CPU's code cache must hear of (Lguest.host_wrote) */
        const uint8_t *p = fuel->ram + a1 + 4 * a2; /* inside: pgdir_ok */
        uint32_t pde = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                       (uint32_t)p[3] << 24;
        if (!entry_ok(fuel, pde, (pde & PTE_PSE) != 0))
            return 0; /* kills: "bad page" */
        goto flush;
    }
    case LHCALL_FLUSH_TLB:
    flush: /* LgCpu.flush_tlb: CR3 written with its own value */
        return reg32(uc, cr3_id, &value) && set_reg32(uc, cr3_id, value);
    }
    return 0;
}

/* The interrupt hook (UC_HOOK_INTR) of the native paths, on the emulating thread.
   Every interrupt or exception ends the run with `vector` recorded, except a
   hypercall that the table in supervisor/hypercalls.py marks CPU-local (local_mask)
   while the async ring is empty: that one is done at once and the guest goes on,
   unless the handler asks to stop or the run's time is up.  A call the table also
   marks native (native_mask) is done here in C, without Python or the GIL, when its
   arguments are ones the Host accepts (native_hcall); any other is done by calling
   `local` (the same Python handler the run loop uses).  The registers are read here,
   once. */
static void intr_hook(void *uc, uint32_t intno, void *user)
{
    fuel_t *fuel = *(fuel_t *const *)user; /* the instance's cell: its CPU's fuel_t */
    if (intno == TRAP_ENTRY && fuel->ring != NULL) {
        for (int i = 0; i < 4; i++) {
            uint64_t value = 0;
            uc_reg_read_fn(uc, hcall_ids[i], &value);
            fuel->hcall[i] = (uint32_t)value;
        }
        fuel->hcall_read = 1;
        uint32_t number = fuel->hcall[0];
        if (number < 64 && (fuel->local_mask >> number & 1) &&
            fuel->ring[fuel->next_hcall] == HCALL_FREE && (fuel->native_mask >> number & 1) &&
            native_hcall(uc, fuel, number, fuel->hcall[1], fuel->hcall[2], fuel->hcall[3])) {
            fuel->native_done++;
            fuel->hcall_read = 0;
            if (now_ns() >= fuel->deadline) { /* the call is done; time is up */
                fuel->reason = REASON_BUDGET;
                fuel->emu_stop(uc);
            }
            return;
        }
        if (number < 64 && (fuel->local_mask >> number & 1) &&
            fuel->ring[fuel->next_hcall] == HCALL_FREE && fuel->local != NULL) {
            PyGILState_STATE gil = PyGILState_Ensure();
            PyObject *result = PyObject_CallFunction(fuel->local, "kkkk",
                (unsigned long)fuel->hcall[0], (unsigned long)fuel->hcall[1],
                (unsigned long)fuel->hcall[2], (unsigned long)fuel->hcall[3]);
            int stop = 1;
            if (result == NULL)
                PyErr_WriteUnraisable(fuel->local);
            else
                stop = PyObject_IsTrue(result) != 0;
            Py_XDECREF(result);
            PyGILState_Release(gil);
            fuel->hcall_read = 0;
            if (stop) {
                fuel->reason = REASON_STOP;
                fuel->emu_stop(uc);
            } else if (now_ns() >= fuel->deadline) { /* the call is done; time is up */
                fuel->reason = REASON_BUDGET;
                fuel->emu_stop(uc);
            }
            return;
        }
    }
    fuel->vector = (int32_t)intno;
    fuel->emu_stop(uc);
}

static PyObject *bind(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *start, *read, *write, *ctl;
    int eip;
    if (!PyArg_ParseTuple(args, "OOOi(iiii)iiOi(iiii)i", &start, &read, &write, &eip,
                          &hcall_ids[0], &hcall_ids[1], &hcall_ids[2], &hcall_ids[3], &cr0_id,
                          &cr3_id, &ctl, &remove_cache_request, &eflags_id, &cs_id, &esp_id,
                          &cr4_id, &flush_request))
        return NULL;
    void *s = PyLong_AsVoidPtr(start);
    void *r = PyLong_AsVoidPtr(read);
    void *w = PyLong_AsVoidPtr(write);
    void *c = PyLong_AsVoidPtr(ctl);
    if (PyErr_Occurred())
        return NULL;
    if (s == NULL || r == NULL || w == NULL || c == NULL) {
        PyErr_SetString(PyExc_ValueError, "null function address");
        return NULL;
    }
    uc_emu_start_fn = (emu_start_fn)s;
    uc_reg_read_fn = (reg_read_fn)r;
    uc_reg_write_fn = (reg_write_fn)w;
    uc_ctl_fn = (ctl_fn)c;
    eip_id = eip;
    Py_RETURN_NONE;
}

/* What run() returns: (status, vector, hcall).  `vector`: the trap that ended the run
   (None: none); `hcall`: its hypercall registers (eax, edx, ebx, ecx) if the hook read
   them, else None.  The same values stay in the fuel (vector, hcall_read, hcall); the
   tuple only spares the caller reading them back one field at a time. */
static PyObject *run_result(fuel_t *fuel, int status)
{
    /* (Built by hand: Py_BuildValue's format parsing cost more than the rest of run().) */
    PyObject *result = PyTuple_New(3);
    if (result == NULL)
        return NULL;
    PyObject *code = PyLong_FromLong(status);
    PyObject *vector = Py_None, *hcall = Py_None;
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    if (fuel->vector >= 0) {
        Py_DECREF(Py_None);
        vector = PyLong_FromLong(fuel->vector);
        if (fuel->hcall_read) {
            Py_DECREF(Py_None);
            hcall = PyTuple_New(4);
            for (int i = 0; hcall != NULL && i < 4; i++) {
                PyObject *word = PyLong_FromUnsignedLong(fuel->hcall[i]);
                if (word == NULL)
                    Py_CLEAR(hcall);
                else
                    PyTuple_SET_ITEM(hcall, i, word);
            }
        }
    }
    if (code == NULL || vector == NULL || hcall == NULL) {
        Py_XDECREF(code);
        Py_XDECREF(vector);
        Py_XDECREF(hcall);
        Py_DECREF(result);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, code);
    PyTuple_SET_ITEM(result, 1, vector);
    PyTuple_SET_ITEM(result, 2, hcall);
    return result;
}

/* run(address, until, ring, next_hcall) -> (status, vector, hcall).  Enter the fuel's
   engine at its current eip until something stops it, with the GIL released (Python
   hooks take it themselves).  `ring` and `next_hcall` are the interrupt hook's (the
   async ring's status bytes, 0: none; its next slot); `reason` starts at REASON_NONE.
   The slice's CPU-time account: the thread's CPU time since the previous run started
   (that run, and the Host's work for the guest after it) is taken off `left`, and the
   run gets a deadline `left` ns from now.  One CPU-clock read per run.  `status` is the
   uc_err of uc_emu_start (0: stopped normally), or -1 if no time was left (nothing ran;
   reason is REASON_BUDGET).  Whenever the slice's time is found spent (status -1, or
   an exit-request run the slicer ended for its deadline), `budget` becomes 0: time is
   the budget on that path.  See run_result for the rest.
   A run on the exit-request path that interrupt() stopped for an irq (REASON_IRQ, no
   trap) while `irq_native` is set is not returned: irq_in_run delivers the irq there, as
   the slice would, and the next run starts at once, still without the GIL (counted in
   irq_stops and irqs_native); what it cannot do itself returns as before.  A -1 status
   then means that the slice's time was found spent before such a next run. */
static PyObject *run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "run() takes 4 arguments (address, until, ring, next_hcall)");
        return NULL;
    }
    fuel_t *fuel = fuel_arg(args[0]);
    if (fuel == NULL)
        return NULL;
    unsigned long long until = PyLong_AsUnsignedLongLong(args[1]);
    if (until == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long ring = PyLong_AsUnsignedLongLong(args[2]);
    if (ring == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    long next_hcall = PyLong_AsLong(args[3]);
    if (next_hcall == -1 && PyErr_Occurred())
        return NULL;
    if (uc_emu_start_fn == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_fuel.bind() was not called");
        return NULL;
    }
    fuel->ring = (volatile uint8_t *)(uintptr_t)ring;
    fuel->next_hcall = (int32_t)next_hcall;
    fuel->reason = REASON_NONE;
    clockid_t clock;
    int have_clock = pthread_getcpuclockid(pthread_self(), &clock) == 0;
    int64_t used = have_clock ? clock_ns(clock) : INT64_MAX;
    if (used == INT64_MAX) {
        have_clock = 0;
        used = -1;
    }
    if (used >= 0) {
        if (fuel->mark)
            fuel->left -= used - fuel->mark;
        fuel->mark = used;
    }
    fuel->vector = -1;
    fuel->hcall_read = 0;
    if (fuel->left <= 0) {
        fuel->reason = REASON_BUDGET;
        fuel->budget = 0;
        return run_result(fuel, -1);
    }
    fuel->deadline = now_ns() + fuel->left;
    uint64_t eip = 0;
    int status = uc_reg_read_fn(fuel->uc, eip_id, &eip);
    if (status != 0)
        return run_result(fuel, status);
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        if (fuel->exit_request)
            err = do_enter(fuel, have_clock, clock, used, fuel->left);
        else
            fuel->deadline = now_ns() + fuel->left; /* (after the GIL hand-off, as above) */
        if (err != 0)
            break;
        status = uc_emu_start_fn(fuel->uc, eip & 0xFFFFFFFFu, until, 0, 0);
        if (!fuel->exit_request)
            break;
        do_leave(fuel);
        /* Stopped for an irq raised meanwhile (no trap): deliver it here and run on, as
           the slice would after the stop, without the GIL (irq_in_run). */
        if (status != 0 || fuel->reason != REASON_IRQ || fuel->vector >= 0 ||
            !fuel->irq_native || !have_clock || !irq_in_run(fuel, clock))
            break;
        fuel->irq_stops++;
        /* The next run, started as above: its CPU-time account, its deadline, eip. */
        fuel->reason = REASON_NONE;
        used = clock_ns(clock);
        pthread_mutex_lock(&lock); /* (cut() changes `left` from another thread) */
        fuel->left -= used - fuel->mark;
        fuel->mark = used;
        int64_t left = fuel->left;
        pthread_mutex_unlock(&lock);
        if (left <= 0) {
            fuel->reason = REASON_BUDGET;
            fuel->budget = 0;
            status = -1;
            break;
        }
        status = uc_reg_read_fn(fuel->uc, eip_id, &eip);
        if (status != 0)
            break;
    }
    Py_END_ALLOW_THREADS
    if (err != 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (status == 0 && fuel->exit_request && fuel->reason == REASON_BUDGET)
        fuel->budget = 0;
    return run_result(fuel, status);
}

/* ---- interrupt delivery (interrupts.set_guest_interrupt) ---------------------------
   deliver() does what interrupts.set_guest_interrupt and _push do in the common case:
   the frame (eflags with IF from lguest_data's irq_enabled, cs, eip, and an error code
   if there is one) lies within one page, whose translation lets the guest write it and
   lies inside guest memory; the guest is not in user mode; it has its lguest_data,
   and irq_enabled lies inside guest memory.  Anything else changes nothing and returns
   None: Python then does the whole delivery, so deaths and their messages come from
   its one place.  Every check is made before the first change.

   Host writes and the translated code (supervisor/codecache.py): this CPU's
   translations of what was written are dropped here, the frame's through the
   guest-virtual address it was written at, the irq_enabled word's through an alias
   found the way codecache._mapped_at finds one (reported as not dropped if there is
   none).  Other CPUs of the guest are the caller's to tell. */
#define CR0_PG 0x80000000u
#define CR4_PSE 0x10u
#define CR4_SMEP 0x100000u
#define PTE_WRITE 0x2
#define PTE_USER 0x4
#define EFLAGS_IF 0x200u
#define KERNEL_ALIAS 0xc0000000u /* codecache.KERNEL_ALIAS */

/* Lguest.read_u32: 0 if [addr, addr + 4) is not inside guest memory */
static int ram_u32(const fuel_t *fuel, uint64_t addr, uint32_t *value)
{
    if (addr + 4 > (uint64_t)fuel->pfn_limit * PAGE_SIZE)
        return 0;
    const uint8_t *p = fuel->ram + addr;
    *value = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    return 1;
}

static void ram_put32(fuel_t *fuel, uint64_t addr, uint32_t value)
{
    uint8_t *p = fuel->ram + addr;
    p[0] = (uint8_t)value;
    p[1] = (uint8_t)(value >> 8);
    p[2] = (uint8_t)(value >> 16);
    p[3] = (uint8_t)(value >> 24);
}

/* pagetables.guest_pa: translate `va`; 0 if the guest has no such mapping.  `fetch`
   (if not NULL): pagetables.fetchable, whether a supervisor-mode CPU may run code there. */
static int walk(const fuel_t *fuel, const uint32_t control[3], uint32_t va, int write,
                uint32_t *pa, int *fetch)
{
    if (fetch != NULL)
        *fetch = 1;
    if (!(control[0] & CR0_PG)) {
        *pa = va;
        return 1;
    }
    uint32_t pde, pte;
    if (!ram_u32(fuel, (uint64_t)(control[1] & ~0xfffu) + 4 * (va >> 22), &pde) ||
        !(pde & PTE_PRESENT))
        return 0;
    if ((pde & PTE_PSE) && (control[2] & CR4_PSE)) {
        if (write && !(pde & PTE_WRITE))
            return 0;
        if (fetch != NULL)
            *fetch = !((control[2] & CR4_SMEP) && (pde & PTE_USER));
        *pa = (pde & 0xffc00000u) | (va & 0x3fffff);
        return 1;
    }
    if (!ram_u32(fuel, (uint64_t)(pde & ~0xfffu) + 4 * ((va >> 12) & 0x3ff), &pte) ||
        !(pte & PTE_PRESENT))
        return 0;
    if (write && !(pte & PTE_WRITE))
        return 0;
    if (fetch != NULL)
        *fetch = !((control[2] & CR4_SMEP) && (pde & pte & PTE_USER));
    *pa = (pte & ~0xfffu) | (va & 0xfff);
    return 1;
}

/* _unicorn.remove_cache: drop this CPU's translations of guest-virtual [begin, end) */
static int remove_cache(void *uc, uint64_t begin, uint64_t end)
{
    return uc_ctl_fn(uc, remove_cache_request, begin, end) == 0;
}

/* codecache._remove_code: remove_cache, skipping the pages a supervisor-mode CPU cannot
   run code from (CR4.SMEP, user pages: see there). */
static int remove_code(const fuel_t *fuel, void *uc, const uint32_t control[3], uint64_t begin,
                       uint64_t end)
{
    if (!(control[2] & CR4_SMEP))
        return remove_cache(uc, begin, end);
    for (uint64_t page = begin; page < end;) {
        uint64_t stop = (page | 0xfff) + 1;
        if (stop > end)
            stop = end;
        uint32_t pa;
        int fetch;
        if (page <= UINT32_MAX && walk(fuel, control, (uint32_t)page, 0, &pa, &fetch) &&
            fetch && !remove_cache(uc, page, stop))
            return 0;
        page = stop;
    }
    return 1;
}

static PyObject *delivered(uint32_t frame_pa, uint32_t size, int frame_dropped, int written,
                           int dropped)
{
    PyObject *result = PyTuple_New(5);
    if (result == NULL)
        return NULL;
    PyObject *items[5] = {PyLong_FromUnsignedLong(frame_pa), PyLong_FromUnsignedLong(size),
                          PyBool_FromLong(frame_dropped), PyBool_FromLong(written),
                          PyBool_FromLong(dropped)};
    for (int i = 0; i < 5; i++) {
        if (items[i] == NULL) {
            for (int j = 0; j < 5; j++)
                Py_XDECREF(items[j]);
            Py_DECREF(result);
            return NULL;
        }
    }
    for (int i = 0; i < 5; i++)
        PyTuple_SET_ITEM(result, i, items[i]);
    return result;
}

/* What deliver_frame() did: the frame is at guest-physical [frame_pa, frame_pa + size),
   its translations dropped on this CPU if `frame_dropped`; irq_enabled was written (0,
   for an interrupt gate) if `written`, its translations dropped on this CPU if `dropped`. */
typedef struct {
    uint32_t frame_pa, size;
    int frame_dropped, written, dropped;
} delivery_t;

/* deliver()'s work, without the GIL (run() calls it too): 1 if the frame was pushed and
   esp and eip set (`out` says the rest), 0 if this is not the common case (nothing was
   changed). */
static int deliver_frame(fuel_t *fuel, uint32_t lo, uint32_t hi, long long error_code,
                         uint64_t data, uint64_t kernel, delivery_t *out)
{
    void *uc = fuel->uc;
    uint32_t irq_enabled, eflags, cs, eip, esp, control[3];
    if (fuel->ram == NULL || uc == NULL || data > UINT32_MAX ||
        !ram_u32(fuel, data, &irq_enabled))
        return 0;
    if (!reg32(uc, eflags_id, &eflags) || !reg32(uc, cs_id, &cs) || !reg32(uc, eip_id, &eip) ||
        !reg32(uc, esp_id, &esp) || !reg32(uc, cr0_id, &control[0]) ||
        !reg32(uc, cr3_id, &control[1]) || !reg32(uc, cr4_id, &control[2]))
        return 0;
    if ((cs & 3) == 3)
        return 0; /* user mode: codecache would not look up an alias either */
    if (!(irq_enabled & EFLAGS_IF))
        eflags &= ~EFLAGS_IF;
    uint32_t words[4] = {eflags, cs, eip, (uint32_t)error_code};
    uint32_t n = error_code >= 0 ? 4 : 3;
    uint32_t low = esp - 4 * n, pa;
    if (!(low < esp && low >> 12 == (esp - 1) >> 12) ||
        !walk(fuel, control, low, 1, &pa, NULL) ||
        (uint64_t)pa + 4 * n > (uint64_t)fuel->pfn_limit * PAGE_SIZE)
        return 0; /* across a page, or a push that kills: Python's */
    for (uint32_t i = 0; i < n; i++) /* in push order: the first word highest */
        ram_put32(fuel, (uint64_t)pa + 4 * (n - 1 - i), words[i]);
    set_reg32(uc, esp_id, low);
    set_reg32(uc, eip_id, (uint32_t)((lo & 0xffff) | (hi & 0xffff0000u)));
    out->frame_pa = pa;
    out->size = 4 * n;
    out->frame_dropped = remove_code(fuel, uc, control, low, (uint64_t)low + 4 * n);
    out->written = ((hi >> 8) & 0xf) == GATE_INTERRUPT;
    out->dropped = 0;
    if (out->written) {
        ram_put32(fuel, data, 0);
        uint64_t aliases[3] = {0, kernel, KERNEL_ALIAS};
        for (int i = 0; i < 3 && !out->dropped; i++) {
            uint64_t va = data + aliases[i];
            uint32_t back;
            if (va <= UINT32_MAX && walk(fuel, control, (uint32_t)va, 0, &back, NULL) &&
                back == data)
                out->dropped = remove_code(fuel, uc, control, va, va + 4);
        }
    }
    return 1;
}

/* deliver(address, lo, hi, error_code, irq_enabled, kernel_address) -> None or
   (frame_pa, frame_size, frame_dropped, data_written, data_dropped).  `error_code` < 0:
   none; `irq_enabled`: the guest-physical address of lguest_data's irq_enabled;
   `kernel_address`: Lguest.kernel_address.  Done: see delivery_t; esp and eip are set.
   The caller counts the interrupt (CpuStats) and records what was not dropped. */
static PyObject *deliver(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "deliver() takes 6 arguments");
        return NULL;
    }
    fuel_t *fuel = fuel_arg(args[0]);
    if (fuel == NULL)
        return NULL;
    unsigned long lo = PyLong_AsUnsignedLong(args[1]);
    unsigned long hi = PyLong_AsUnsignedLong(args[2]);
    long long error_code = PyLong_AsLongLong(args[3]);
    unsigned long long data = PyLong_AsUnsignedLongLong(args[4]);
    unsigned long long kernel = PyLong_AsUnsignedLongLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (uc_ctl_fn == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_fuel.bind() was not called");
        return NULL;
    }
    delivery_t d;
    if (!deliver_frame(fuel, (uint32_t)lo, (uint32_t)hi, error_code, data, kernel, &d))
        Py_RETURN_NONE;
    return delivered(d.frame_pa, d.size, d.frame_dropped, d.written, d.dropped);
}

/* An executor slice's run (irq_native set) stopped for REASON_IRQ, with no trap: do what
   the slice does next (execute._one_slice: interrupts.maybe_do_interrupt for a CPU that
   runs, so is not halted, and keep_time_for_handler) without the GIL, in the same order
   and with the same checks.  1: done, the guest may run on (the lowest deliverable irq
   was delivered, its handler given at least handler_ns of CPU time, or none can be
   delivered now: it stays pending, as in Python); 0: nothing was changed, Python must
   look (a kick, a Host write to drop, a frame deliver_frame leaves to Python).  A
   delivery whose writes this CPU could not drop translations of flushes them all, as
   codecache.drop_stale does then; a one-CPU guest has no other CPU to tell. */
#define FIRST_EXTERNAL_VECTOR 32
#define LGUEST_DATA_IRQ_ENABLED 0
#define LGUEST_DATA_BLOCKED_INTERRUPTS 4
static int irq_in_run(fuel_t *fuel, clockid_t clock)
{
    if (fuel->stop || fuel->wrote)
        return 0;
    uint64_t data = fuel->irq_data;
    uint32_t pending = __atomic_load_n(&fuel->irqs_pending, __ATOMIC_SEQ_CST);
    uint32_t blocked, enabled, eip;
    if (!ram_u32(fuel, data + LGUEST_DATA_BLOCKED_INTERRUPTS, &blocked))
        blocked = 0; /* (Lguest.read_u32's None: nothing blocked) */
    uint32_t ready = pending & ~blocked;
    if (ready == 0)
        return 1;
    if (!ram_u32(fuel, data + LGUEST_DATA_IRQ_ENABLED, &enabled) || !enabled)
        return 1;
    if (!reg32(fuel->uc, eip_id, &eip))
        return 0;
    if (fuel->noirq_start <= eip && eip < fuel->noirq_end)
        return 1;
    int irq = __builtin_ctz(ready);
    uint32_t lo = fuel->idt[FIRST_EXTERNAL_VECTOR + irq][0];
    uint32_t hi = fuel->idt[FIRST_EXTERNAL_VECTOR + irq][1];
    if (!(hi & GATE_PRESENT))
        return 1; /* the interrupt waits until the guest installs a handler */
    delivery_t d;
    if (!deliver_frame(fuel, lo, hi, -1, data + LGUEST_DATA_IRQ_ENABLED, fuel->kernel, &d))
        return 0;
    __atomic_fetch_and(&fuel->irqs_pending, ~(1u << irq), __ATOMIC_SEQ_CST);
    fuel->irqs_native++;
    if (!d.frame_dropped || (d.written && !d.dropped))
        uc_ctl_fn(fuel->uc, flush_request);
    int64_t now = clock_ns(clock);
    pthread_mutex_lock(&lock); /* (cut() changes `left` from another thread) */
    int64_t left = fuel->left - (now - fuel->mark);
    fuel->left = left > fuel->handler_ns ? left : fuel->handler_ns;
    fuel->mark = now;
    pthread_mutex_unlock(&lock);
    if (left <= fuel->handler_ns)
        fuel->handler_bound = 1;
    return 1;
}

/* drop(address, ranges, kernel_address) -> None, True or False: codecache.drop_stale's
   walk and engine calls in one call.  `ranges`: a list of guest-physical (start, end),
   merged as codecache._merged does.  Each is dropped at the first of its physical
   address, `kernel_address` + it and KERNEL_ALIAS + it that the guest maps back to its
   start.  True: all were dropped; False: the guest is in user mode or a range has no
   such alias, so the caller must flush the whole cache (ranges before it may already
   be dropped, which is harmless); None: no guest memory or engine here (the caller
   walks in Python), nothing done. */
static PyObject *drop(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3 || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "drop() takes an address, a list and an int");
        return NULL;
    }
    fuel_t *fuel = fuel_arg(args[0]);
    if (fuel == NULL)
        return NULL;
    unsigned long long kernel = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (uc_ctl_fn == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_fuel.bind() was not called");
        return NULL;
    }
    void *uc = fuel->uc;
    uint32_t cs, control[3];
    if (fuel->ram == NULL || uc == NULL || !reg32(uc, cs_id, &cs) ||
        !reg32(uc, cr0_id, &control[0]) || !reg32(uc, cr3_id, &control[1]) ||
        !reg32(uc, cr4_id, &control[2]))
        Py_RETURN_NONE;
    if ((cs & 3) == 3)
        Py_RETURN_FALSE; /* user mode: the lookup could fault */
    PyObject *ranges = args[1];
    uint64_t aliases[3] = {0, kernel, KERNEL_ALIAS};
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(ranges); i++) {
        unsigned long long start, end;
        PyObject *item = PyList_GET_ITEM(ranges, i);
        if (!PyArg_ParseTuple(item, "KK", &start, &end))
            return NULL;
        int dropped = 0;
        for (int a = 0; a < 3 && !dropped; a++) {
            uint64_t va = start + aliases[a];
            uint32_t back;
            if (va <= UINT32_MAX && walk(fuel, control, (uint32_t)va, 0, &back, NULL) &&
                back == start) {
                if (!remove_code(fuel, uc, control, va, va + (end - start)))
                    Py_RETURN_FALSE;
                dropped = 1;
            }
        }
        if (!dropped)
            Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyObject *kick(PyObject *self, PyObject *arg)
{
    (void)self;
    fuel_t *fuel = fuel_arg(arg);
    if (fuel == NULL)
        return NULL;
    lock_holding_gil();
    fuel->stop = 1;
    int wake_slicer = 0;
    if (fuel->running) {
        send_stop(fuel, REASON_STOP, now_ns());
        /* (to send it again in case it came too early) */
        wake_slicer = fuel->sent_at + resend_after(fuel) < wake_at;
    }
    unlock_and_wake(wake_slicer);
    Py_RETURN_NONE;
}

/* interrupt(address, in_slice, irq) -> bool: irq `irq` was raised for the fuel's CPU (its
   bit is set in irqs_pending first), or, with irq -1, the Host wrote its memory (`wrote`:
   a run stopped for it goes back to Python, which drops the stale code).  If a run is in
   progress on the exit-request path and nothing else stops it yet, stop it at its next
   block boundary with REASON_IRQ, so that its slice delivers the interrupt (run() itself,
   see irq_in_run) and goes on.  A run already stopped for its slice's time (or hurried)
   is left to end so: its slice ends and the next one delivers the interrupt before its
   first run.  If the CPU is between two runs of a slice (`in_slice`), its next run stops
   so at once (`irq`; the slice delivers a pending interrupt before every run anyway).
   True in these cases; otherwise nothing is sent (False): the caller wakes the CPU as for
   any other news. */
static PyObject *interrupt(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "interrupt() takes 3 arguments (address, in_slice, irq)");
        return NULL;
    }
    fuel_t *fuel = fuel_arg(args[0]);
    if (fuel == NULL)
        return NULL;
    int in_slice = PyObject_IsTrue(args[1]);
    if (in_slice < 0)
        return NULL;
    long irq = PyLong_AsLong(args[2]);
    if (irq == -1 && PyErr_Occurred())
        return NULL;
    if (irq < -1 || irq >= 32) {
        PyErr_SetString(PyExc_ValueError, "irq must be -1 or 0..31");
        return NULL;
    }
    if (irq >= 0)
        __atomic_fetch_or(&fuel->irqs_pending, 1u << irq, __ATOMIC_SEQ_CST);
    int sent = 0, wake_slicer = 0;
    lock_holding_gil();
    if (irq < 0)
        fuel->wrote = 1;
    if (fuel->exit_request && !fuel->stop) {
        if (fuel->running && (fuel->reason == REASON_NONE || fuel->reason == REASON_IRQ)) {
            send_stop(fuel, REASON_IRQ, now_ns());
            /* (to send it again in case it came too early) */
            wake_slicer = fuel->sent_at + resend_after(fuel) < wake_at;
            sent = 1;
        } else if (fuel->running && fuel->reason == REASON_BUDGET) {
            sent = 1;
        } else if (!fuel->running && in_slice) {
            fuel->irq = 1;
            sent = 1;
        }
    }
    unlock_and_wake(wake_slicer);
    return PyBool_FromLong(sent);
}

/* take_irq(address, irq): clear irq `irq`'s bit in irqs_pending (it was delivered). */
static PyObject *take_irq(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "take_irq() takes 2 arguments (address, irq)");
        return NULL;
    }
    fuel_t *fuel = fuel_arg(args[0]);
    if (fuel == NULL)
        return NULL;
    long irq = PyLong_AsLong(args[1]);
    if (irq == -1 && PyErr_Occurred())
        return NULL;
    if (irq < 0 || irq >= 32) {
        PyErr_SetString(PyExc_ValueError, "irq must be 0..31");
        return NULL;
    }
    __atomic_fetch_and(&fuel->irqs_pending, ~(1u << irq), __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

/* hurry(address) -> bool: end the fuel's run in progress at its next block boundary as if
   its slice's time were spent (REASON_BUDGET), so that the slice ends and its worker can
   take a more urgent job.  Only a run on the exit-request path that nothing else stops
   yet (True); anything else is left alone (False). */
static PyObject *hurry(PyObject *self, PyObject *arg)
{
    (void)self;
    fuel_t *fuel = fuel_arg(arg);
    if (fuel == NULL)
        return NULL;
    int sent = 0, wake_slicer = 0;
    lock_holding_gil();
    if (fuel->exit_request && fuel->running && !fuel->stop && fuel->reason == REASON_NONE) {
        send_stop(fuel, REASON_BUDGET, now_ns());
        /* (to send it again in case it came too early) */
        wake_slicer = fuel->sent_at + resend_after(fuel) < wake_at;
        sent = 1;
    }
    unlock_and_wake(wake_slicer);
    return PyBool_FromLong(sent);
}

/* cut(address) -> bool: a job waits for a worker now, so a lone slice (`lone` ns longer
   than a slice taken in turn) ends where a slice in turn would have: its `lone` ns come
   off its time left (`left`, under the slicer's lock, as run() changes it between two
   runs) and, if a run is in progress with no stop sent yet, off its deadline, span and
   latest (under the lock too; the slicer is woken if the deadline came closer than its next wake-up,
   and stretch() still gives a preempted thread its CPU time).  False: not a lone slice
   (or already cut). */
static PyObject *cut(PyObject *self, PyObject *arg)
{
    (void)self;
    fuel_t *fuel = fuel_arg(arg);
    if (fuel == NULL)
        return NULL;
    int64_t extra = fuel->lone;
    if (extra <= 0)
        Py_RETURN_FALSE;
    fuel->lone = 0;
    int wake_slicer = 0;
    lock_holding_gil();
    fuel->left -= extra; /* (under the lock: run() changes it there after an irq it delivers) */
    if (fuel->exit_request && fuel->running && !fuel->sent) {
        fuel->deadline -= extra;
        fuel->span -= extra;
        if (fuel->latest)
            fuel->latest -= MAX_STRETCH * extra; /* (latest - MAX_STRETCH * span: do_enter's) */
        wake_slicer = fuel->deadline < wake_at;
    }
    unlock_and_wake(wake_slicer);
    Py_RETURN_TRUE;
}

#ifdef HAVE_RDTSC
/* rdtsc() -> int: the host's time stamp counter, which Unicorn's guest rdtsc reads too */
static PyObject *read_tsc(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromUnsignedLongLong((unsigned long long)__rdtsc());
}
#endif

/* slicer_stats() -> (wakes, ticks, moved, resent, lock_waits): the slicer's wake-ups so
   far, the sleeps it cut short to tick, the deadlines it moved, the stops it sent again
   and the calls holding the GIL that waited for the lock, and their wait in ns.
   Read without the lock: a count may be one behind. */
static PyObject *slicer_stats(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("(KKKKKK)", wakes, ticks, moved, resent, lock_waits, lock_wait_ns);
}

static PyMethodDef fuel_methods[] = {
    {"kick", kick, METH_O, "kick(address): set `stop`; if a run is in progress, stop it now."},
    {"interrupt", (PyCFunction)(void (*)(void))interrupt, METH_FASTCALL,
     "interrupt(address, in_slice, irq) -> bool: mark irq pending (-1: a Host write) and "
     "stop a run for it (REASON_IRQ)."},
    {"take_irq", (PyCFunction)(void (*)(void))take_irq, METH_FASTCALL,
     "take_irq(address, irq): clear irq's pending bit."},
    {"hurry", hurry, METH_O,
     "hurry(address) -> bool: end a run in progress as if its time were spent (REASON_BUDGET)."},
    {"cut", cut, METH_O,
     "cut(address) -> bool: end a lone slice where a slice taken in turn would end."},
    {"bind", bind, METH_VARARGS,
     "bind(uc_emu_start, uc_reg_read, uc_reg_write, eip_id, (eax, edx, ebx, ecx), cr0_id, "
     "cr3_id, uc_ctl, remove_cache_request, (eflags, cs, esp, cr4), flush_request): the "
     "Unicorn calls and register ids run(), intr_hook and deliver() use."},
    {"deliver", (PyCFunction)(void (*)(void))deliver, METH_FASTCALL,
     "deliver(address, lo, hi, error_code, irq_enabled, kernel_address) -> None or "
     "(frame_pa, frame_size, frame_dropped, data_written, data_dropped) (see _fuel.c)."},
    {"drop", (PyCFunction)(void (*)(void))drop, METH_FASTCALL,
     "drop(address, ranges, kernel_address) -> None, True or False: drop this CPU's "
     "translations of guest-physical ranges (see _fuel.c)."},
    {"run", (PyCFunction)(void (*)(void))run, METH_FASTCALL,
     "run(address, until, ring, next_hcall) -> (uc_err or -1: no time left, vector, hcall) "
     "(see _fuel.c)."},
    {"slicer_stats", slicer_stats, METH_NOARGS,
     "slicer_stats() -> (wakes, ticks, moved, resent): the exit-request slicer's wake-ups "
     "so far, the sleeps it cut short to tick, the deadlines it moved, the stops it resent."},
#ifdef HAVE_RDTSC
    {"rdtsc", read_tsc, METH_NOARGS, "rdtsc() -> the host's time stamp counter."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fuel_module = {
    PyModuleDef_HEAD_INIT, "_fuel",
    "Native slice meters for Unicorn: the block hook and the exit-request slicer.",
    -1, fuel_methods, NULL, NULL, NULL, NULL,
};

/* Every number this file repeats from the Python side, by its name there: a test
   (tests/test_hotpath.py) holds each to its twin, so that neither side changes alone. */
static const struct {
    const char *name;
    unsigned long value;
} SHARED[] = {
    {"abi.LGUEST_TRAP_ENTRY", TRAP_ENTRY},
    {"abi.HCALL_FREE", HCALL_FREE},
    {"abi.LHCALL_FLUSH_TLB", LHCALL_FLUSH_TLB},
    {"abi.LHCALL_LOAD_IDT_ENTRY", LHCALL_LOAD_IDT_ENTRY},
    {"abi.LHCALL_SET_STACK", LHCALL_SET_STACK},
    {"abi.LHCALL_TS", LHCALL_TS},
    {"abi.LHCALL_SET_PTE", LHCALL_SET_PTE},
    {"abi.LHCALL_SET_PMD", LHCALL_SET_PMD},
    {"abi.IDT_ENTRIES", IDT_ENTRIES},
    {"abi.GUEST_PL", GUEST_PL},
    {"abi.PAGE_SIZE", PAGE_SIZE},
    {"abi.SWITCHER_ADDR", SWITCHER_ADDR},
    {"abi.SWITCHER_PGD_INDEX", SWITCHER_PGD_INDEX},
    {"abi.X86_EFLAGS_IF", EFLAGS_IF},
    {"cpu.CR0_TS", CR0_TS},
    {"cpu.CR0_PG", CR0_PG},
    {"cpu.CR4_PSE", CR4_PSE},
    {"pagetables.CR4_SMEP", CR4_SMEP},
    {"pagetables.PTE_USER", PTE_USER},
    {"interrupts.GATE_INTERRUPT", GATE_INTERRUPT},
    {"interrupts.GATE_TRAP", GATE_TRAP},
    {"interrupts.GATE_PRESENT", GATE_PRESENT},
    {"pagetables.PTRS_PER_TABLE", PTRS_PER_TABLE},
    {"pagetables.PTE_PRESENT", PTE_PRESENT},
    {"pagetables.PTE_PSE", PTE_PSE},
    {"pagetables.PTE_WRITE", PTE_WRITE},
    {"codecache.KERNEL_ALIAS", KERNEL_ALIAS},
    {"_slicing.REASON_NONE", REASON_NONE},
    {"_slicing.REASON_STOP", REASON_STOP},
    {"_slicing.REASON_BUDGET", REASON_BUDGET},
    {"_slicing.REASON_IRQ", REASON_IRQ},
    {"abi.FIRST_EXTERNAL_VECTOR", FIRST_EXTERNAL_VECTOR},
    {"abi.LGUEST_DATA_IRQ_ENABLED", LGUEST_DATA_IRQ_ENABLED},
    {"abi.LGUEST_DATA_BLOCKED_INTERRUPTS", LGUEST_DATA_BLOCKED_INTERRUPTS},
};

/* Every field of fuel_t, in order: supervisor/_slicing.py holds its ctypes mirror to
   each offset and size. */
#define FIELD(f) {#f, offsetof(fuel_t, f), sizeof(((fuel_t *)0)->f)}
static const struct {
    const char *name;
    size_t offset;
    size_t size;
} FUEL_FIELDS[] = {
    FIELD(stop), FIELD(reason), FIELD(budget), FIELD(blocks), FIELD(emu_stop),
    FIELD(deadline), FIELD(clock_mask), FIELD(uc), FIELD(running), FIELD(sent),
    FIELD(sent_at), FIELD(next), FIELD(prev), FIELD(cpu_clock), FIELD(exit_request),
    FIELD(cpu_start), FIELD(span), FIELD(latest), FIELD(left), FIELD(mark), FIELD(ring),
    FIELD(local), FIELD(local_mask), FIELD(next_hcall), FIELD(vector), FIELD(hcall),
    FIELD(hcall_read), FIELD(irq), FIELD(native_mask), FIELD(native_done), FIELD(idt),
    FIELD(stack), FIELD(ts), FIELD(ram), FIELD(pfn_limit), FIELD(pad2), FIELD(lone),
    FIELD(irqs_pending), FIELD(wrote), FIELD(irq_native), FIELD(irq_data), FIELD(noirq_start),
    FIELD(noirq_end), FIELD(kernel), FIELD(handler_bound), FIELD(handler_ns), FIELD(irq_stops),
    FIELD(irqs_native),
};
#undef FIELD

/* {field name: (offset, size)} of FUEL_FIELDS */
static PyObject *fuel_layout(void)
{
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    for (size_t i = 0; i < sizeof FUEL_FIELDS / sizeof FUEL_FIELDS[0]; i++) {
        PyObject *v = Py_BuildValue("(nn)", (Py_ssize_t)FUEL_FIELDS[i].offset,
                                    (Py_ssize_t)FUEL_FIELDS[i].size);
        int failed = v == NULL || PyDict_SetItemString(d, FUEL_FIELDS[i].name, v) < 0;
        Py_XDECREF(v);
        if (failed) {
            Py_DECREF(d);
            return NULL;
        }
    }
    return d;
}

/* {name: value} of SHARED, and "interrupts.IGNORED_VECTORS": a tuple of ignored_vector()'s */
static PyObject *shared_constants(void)
{
    PyObject *d = PyDict_New();
    PyObject *ignored = PyTuple_New(N_IGNORED);
    if (d == NULL || ignored == NULL)
        goto fail;
    for (size_t i = 0; i < N_IGNORED; i++) {
        PyObject *v = PyLong_FromUnsignedLong(IGNORED_VECTORS[i]);
        if (v == NULL)
            goto fail;
        PyTuple_SET_ITEM(ignored, i, v);
    }
    if (PyDict_SetItemString(d, "interrupts.IGNORED_VECTORS", ignored) < 0)
        goto fail;
    Py_CLEAR(ignored);
    for (size_t i = 0; i < sizeof SHARED / sizeof SHARED[0]; i++) {
        PyObject *v = PyLong_FromUnsignedLong(SHARED[i].value);
        int failed = v == NULL || PyDict_SetItemString(d, SHARED[i].name, v) < 0;
        Py_XDECREF(v);
        if (failed)
            goto fail;
    }
    return d;
fail:
    Py_XDECREF(ignored);
    Py_XDECREF(d);
    return NULL;
}

PyMODINIT_FUNC PyInit__fuel(void)
{
    init_wake();
    pthread_atfork(NULL, NULL, after_fork_child);
    PyObject *m = PyModule_Create(&fuel_module);
    if (m == NULL)
        return NULL;
    PyObject *constants = shared_constants();
    if (constants == NULL || PyModule_AddObject(m, "constants", constants) < 0) {
        Py_XDECREF(constants);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *layout = fuel_layout();
    if (layout == NULL || PyModule_AddObject(m, "fuel_layout", layout) < 0) {
        Py_XDECREF(layout);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObject(m, "block_hook", PyLong_FromVoidPtr((void *)block_hook)) < 0 ||
        PyModule_AddObject(m, "intr_hook", PyLong_FromVoidPtr((void *)intr_hook)) < 0 ||
        PyModule_AddIntConstant(m, "fuel_size", (long)sizeof(fuel_t)) < 0 ||
        PyModule_AddIntConstant(m, "native_calls", (long)NATIVE_CALLS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
