/* crt0.S - entry point and trap/interrupt/syscall stubs of the C guest runtime.
 *
 * _lguest_start is entered by the Host (esi = boot info page, interrupts
 * off): it clears .bss, switches to a small boot stack in .bss and calls
 * __lguest_start_c (runtime.c), which places CPU 0's real stack at the top
 * of free memory, moves onto it and never returns.
 */
        .set    BOOT_STACK, 8192
        .local  __lguest_boot_stack
        .comm   __lguest_boot_stack, BOOT_STACK, 16

        .section .text.boot, "ax"
        .code32
        .globl  _lguest_start
        .type   _lguest_start, @function
_lguest_start:
        cld
        fninit                                  /* x87 as a process gets it: control word 0x37f */
        movl    %esi, %edx                      /* boot info: kept in edx */
        movl    $__bss_start, %edi
        movl    $__bss_end, %ecx
        subl    %edi, %ecx
        xorl    %eax, %eax
        rep stosb
        movl    $__lguest_boot_stack + BOOT_STACK, %esp
        xorl    %ebp, %ebp
        pushl   %edx
        call    __lguest_start_c
1:      hlt
        jmp     1b
        .size   _lguest_start, . - _lguest_start

        .text
/* Save the registers a syscall preserves, pass them as C arguments
 * (nr, ebx, ecx, edx, esi, edi, ebp) to __lguest_syscall; result in eax. */
.macro SYSCALL_BODY
        pushl   %ebp
        pushl   %edi
        pushl   %esi
        pushl   %edx
        pushl   %ecx
        pushl   %ebx
        pushl   %ebp
        pushl   %edi
        pushl   %esi
        pushl   %edx
        pushl   %ecx
        pushl   %ebx
        pushl   %eax
        call    __lguest_syscall
        addl    $28, %esp
        popl    %ebx
        popl    %ecx
        popl    %edx
        popl    %esi
        popl    %edi
        popl    %ebp
.endm

/* musl calls *%gs:16 for a system call (AT_SYSINFO points here): a plain call. */
        .globl  __lguest_vsyscall
        .type   __lguest_vsyscall, @function
        .p2align 4
__lguest_vsyscall:
        SYSCALL_BODY
        ret
        .size   __lguest_vsyscall, . - __lguest_vsyscall

/* int $0x80 (lguest's syscall vector): a trap gate, same work, then iret. */
        .globl  __lguest_int80
        .type   __lguest_int80, @function
        .p2align 4
__lguest_int80:
        cld
        SYSCALL_BODY
        iret
        .size   __lguest_int80, . - __lguest_int80

/* Page fault: error code on the stack, then eip.  __lguest_page_fault(error,
 * eip) returns only when the faulting instruction can run again (a fetch
 * from a page it made executable); the way out is the irqs' (below), whose
 * frame has the error code where theirs has the irq number. */
        .globl  __lguest_pf_entry
        .type   __lguest_pf_entry, @function
        .p2align 4
__lguest_pf_entry:
        cld
        pushl   %eax
        pushl   %ecx
        pushl   %edx
        pushl   16(%esp)                        /* eip */
        pushl   16(%esp)                        /* error code */
        call    __lguest_page_fault
        addl    $8, %esp
        popl    %edx
        popl    %ecx
        jmp     __lguest_irq_return
        .size   __lguest_pf_entry, . - __lguest_pf_entry

/* Interrupts: one stub per irq pushes its number and jumps to the common
 * part, which calls __lguest_irq_dispatch(irq) and returns with interrupts
 * as the interrupted code had them (eflags.IF in the frame). */
        .p2align 4
        .globl  __lguest_irq_stubs
__lguest_irq_stubs:
        .set    irq, 0
        .rept   32
        pushl   $irq
        jmp     __lguest_irq_common
        .p2align 3
        .set    irq, irq + 1
        .endr

__lguest_irq_common:
        cld
        pushl   %eax
        pushl   %ecx
        pushl   %edx
        pushl   12(%esp)
        call    __lguest_irq_dispatch
        addl    $4, %esp
        popl    %edx
        popl    %ecx
/* Stack: eax, one word (the irq number, or a fault's error code), eip, cs,
 * eflags. */
__lguest_irq_return:
        testl   $0x200, 16(%esp)                /* eflags.IF of the interrupted code */
        jz      1f
        movl    %fs:4, %eax                     /* this CPU's lguest_data (struct lg_percpu) */
/* The only instructions that run with interrupts on but must not be
 * interrupted: turning this CPU's on, and up to the iret
 * (lguest_data.noirq_start/end). */
        .globl  __lguest_noirq_start, __lguest_noirq_end
__lguest_noirq_start:
        movl    $512, (%eax)                    /* irq_enabled */
        popl    %eax
        leal    4(%esp), %esp                   /* the irq number */
        iret
__lguest_noirq_end:
1:      popl    %eax
        addl    $4, %esp                        /* the irq number */
        iret

/* A CPU started by lg_start_cpu (LHCALL_START_CPU): eax = its number, esp =
 * the top of its own stack, interrupts off (it has no lguest_data yet).
 * __lguest_secondary_c never returns. */
        .globl  __lguest_secondary_entry
        .type   __lguest_secondary_entry, @function
        .p2align 4
__lguest_secondary_entry:
        cld
        fninit
        xorl    %ebp, %ebp
        pushl   %eax
        call    __lguest_secondary_c
2:      hlt
        jmp     2b
        .size   __lguest_secondary_entry, . - __lguest_secondary_entry


/* int __clock_gettime64(clockid_t, struct timespec *) - musl's clock_gettime
 * on i386 (64-bit time_t), the monotonic clocks without a store but the
 * result's: under emulation every store is a slow-path call, so the whole
 * computation stays in registers (SSE2 for the 64-bit products).  The same
 * arithmetic as runtime.c's mono_ns and div_1e9:
 *   ns  = tsc_hi * mult + (tsc_lo * mult >> 32)   (tsc_scale: mult, shift 32)
 *   sec = ((ns >> 9) * 0x44b82fa09b5a53) >> 75,  nsec = ns - sec * 10^9
 * Anything else (another clock, a scale to compute, a NULL pointer) goes to
 * the C version, __lguest_clock_gettime. */
        .set    LGD_TSC_KHZ, 1112
        .set    MONOTONIC_CLOCKS, 0xd2          /* 1 MONOTONIC, 4 _RAW, 6 _COARSE, 7 BOOTTIME */
        .section .rodata
        .p2align 4
__lguest_clock_consts:
        .long   0xa09b5a53, 0, 0x0044b82f, 0    /* 10^9's reciprocal, low and high halves */
        .long   1000000000, 0, 0xffffffff, 0    /* 10^9; a low-half mask */
        .text
        .globl  __clock_gettime64
        .type   __clock_gettime64, @function
        .p2align 4
__clock_gettime64:
        movl    4(%esp), %ecx                   /* clk */
        cmpl    $7, %ecx
        ja      9f
        movl    $MONOTONIC_CLOCKS, %eax
        btl     %ecx, %eax
        jnc     9f
        cmpl    $0, 8(%esp)
        je      9f
        movl    lguest_data + LGD_TSC_KHZ, %ecx
        movq    tsc_scale, %xmm3                /* {khz | shift << 26, mult}: one load */
        movd    %xmm3, %eax
        orl     $(32 << 26), %ecx
        cmpl    %ecx, %eax                      /* this khz's scale, shift 32 */
        jne     9f
        psrlq   $32, %xmm3                      /* mult */
        rdtsc
        movd    %eax, %xmm0
        movd    %edx, %xmm1
        pmuludq %xmm3, %xmm0                    /* tsc_lo * mult */
        pmuludq %xmm3, %xmm1                    /* tsc_hi * mult */
        psrlq   $32, %xmm0
        paddq   %xmm0, %xmm1                    /* ns */
        movdqa  %xmm1, %xmm2
        psrlq   $9, %xmm2                       /* x = ns >> 9 */
        movdqa  %xmm2, %xmm4
        psrlq   $32, %xmm4                      /* x_hi */
        movd    __lguest_clock_consts, %xmm5    /* m_lo */
        movd    __lguest_clock_consts + 8, %xmm6 /* m_hi */
        movdqa  %xmm2, %xmm0
        pmuludq %xmm5, %xmm0                    /* ll = x_lo * m_lo */
        movdqa  %xmm2, %xmm7
        pmuludq %xmm6, %xmm7                    /* lh = x_lo * m_hi */
        pmuludq %xmm4, %xmm5                    /* hl = x_hi * m_lo */
        pmuludq %xmm6, %xmm4                    /* hh = x_hi * m_hi */
        movq    __lguest_clock_consts + 24, %xmm6 /* 0xffffffff */
        psrlq   $32, %xmm0                      /* ll >> 32 */
        movdqa  %xmm7, %xmm2
        pand    %xmm6, %xmm2
        paddq   %xmm2, %xmm0                    /* + lo(lh) */
        movdqa  %xmm5, %xmm2
        pand    %xmm6, %xmm2
        paddq   %xmm2, %xmm0                    /* + lo(hl): mid */
        psrlq   $32, %xmm0
        psrlq   $32, %xmm7
        psrlq   $32, %xmm5
        paddq   %xmm7, %xmm4
        paddq   %xmm5, %xmm4
        paddq   %xmm0, %xmm4                    /* high 64 bits of x * m */
        psrlq   $11, %xmm4                      /* sec */
        movd    __lguest_clock_consts + 16, %xmm5 /* 10^9 */
        movdqa  %xmm4, %xmm2
        pmuludq %xmm5, %xmm2                    /* sec_lo * 10^9 */
        movdqa  %xmm4, %xmm0
        psrlq   $32, %xmm0
        pmuludq %xmm5, %xmm0                    /* sec_hi * 10^9 */
        psllq   $32, %xmm0
        paddq   %xmm0, %xmm2                    /* sec * 10^9 */
        psubq   %xmm2, %xmm1                    /* nsec (< 10^9: its high half is 0) */
        punpcklqdq %xmm1, %xmm4                 /* {sec, nsec | pad 0} */
        movl    8(%esp), %ecx
        movdqu  %xmm4, (%ecx)
        xorl    %eax, %eax
        ret
9:      jmp     __lguest_clock_gettime
        .size   __clock_gettime64, . - __clock_gettime64

        .section .note.GNU-stack, "", @progbits
