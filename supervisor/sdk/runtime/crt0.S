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

/* Page fault: error code on the stack, then eip.  Never returns. */
        .globl  __lguest_pf_entry
        .type   __lguest_pf_entry, @function
        .p2align 4
__lguest_pf_entry:
        cld
        movl    4(%esp), %eax                   /* eip */
        movl    (%esp), %edx                    /* error code */
        pushl   %eax
        pushl   %edx
        call    __lguest_page_fault
1:      hlt
        jmp     1b
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

        .section .note.GNU-stack, "", @progbits
