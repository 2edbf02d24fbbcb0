# ticker: count one-shot clock events.
#
# Sets SET_CLOCKEVENT(period), halts, and on each timer interrupt (irq 0,
# vector 32) prints "tick N\n" (N = 1, 2, ...) and re-arms the clock event.
# After `ticks` ticks prints "done\n" and powers off with status 0.
# Defaults: ticks=5, period 10 ms (10,000,000 ns).
#
# Command line (boot info +24/+28), optional, whitespace separated, either
# key optional, decimal values:  "ticks=3 period_ms=1"
# Unknown tokens are ignored; a key without digits is ignored. Device irqs
# other than the timer get a no-op handler (console EOF etc. is harmless).
# ticks=0 prints just "done\n". period_ms=0 arms a 1 ns event; periods
# above 4294 ms saturate to 0xffffffff ns.
#
# Expected output with defaults:
#   tick 1\ntick 2\ntick 3\ntick 4\ntick 5\ndone\n      exit status 0
        .include "lguest.inc"

        .set    DEFAULT_TICKS, 5
        .set    DEFAULT_PERIOD_NS, 10000000

        LGUEST_BOOT

main:
        call    lg_init
        call    lg_console_setup

        # --- command line -------------------------------------------------
        movl    $key_ticks, %edi
        call    cmdline_get
        jc      1f
        movl    %eax, ticks_total
1:      movl    $key_period, %edi
        call    cmdline_get
        jc      2f
        movl    $1000000, %ecx
        mull    %ecx                    # edx:eax = ms * 1e6
        testl   %edx, %edx
        jz      3f
        movl    $0xffffffff, %eax
3:      testl   %eax, %eax
        jnz     4f
        movl    $1, %eax
4:      movl    %eax, period_ns
2:
        call    lg_ignore_device_irqs   # stray device irqs: no-op
        # --- timer interrupt: irq 0 -> vector 32 --------------------------
        movl    $LG_IRQ_VECTOR_BASE + 0, %eax
        movl    $timer_handler, %edx
        call    lg_set_irq_gate

        xorl    %ebx, %ebx              # ebx = ticks seen so far
        cmpl    $0, ticks_total
        je      finished
        call    arm_timer

idle:
        IRQ_OFF
        cmpl    $0, tick_pending
        jne     got_tick
        HCALL   LHCALL_HALT             # irq is delivered right after
        jmp     idle

got_tick:
        movl    $0, tick_pending
        incl    %ebx
        movl    $str_tick, %esi
        call    lg_puts
        movl    %ebx, %eax
        call    lg_print_dec
        movl    $str_nl, %esi
        call    lg_puts
        cmpl    ticks_total, %ebx
        jae     finished
        call    arm_timer
        jmp     idle

finished:
        movl    $str_done, %esi
        call    lg_puts
        xorl    %eax, %eax
        jmp     lg_poweroff

arm_timer:
        movl    period_ns, %edx
        HCALL   LHCALL_SET_CLOCKEVENT
        ret

# Interrupt gate: entered with irq_enabled = 0; just flag the tick.
timer_handler:
        movl    $1, tick_pending
        jmp     lg_irq_return

# cmdline_get: edi = NUL-terminated key including '=' (e.g. "ticks=").
# Returns CF clear and eax = decimal value if a whitespace-separated token
# starts with the key and is followed by at least one digit; CF set if not.
# Clobbers eax, ecx, edx.
cmdline_get:
        pushl   %ebx
        pushl   %esi
        movl    lg_boot_info, %edx
        movl    BI_CMDLINE(%edx), %esi
        movl    BI_CMDLINE_LEN(%edx), %ebx
        testl   %esi, %esi
        jz      .Lcg_none
        addl    %esi, %ebx              # ebx = end of command line
.Lcg_token:                             # skip separators (bytes <= ' ')
        cmpl    %ebx, %esi
        jae     .Lcg_none
        cmpb    $' ', (%esi)
        ja      .Lcg_cmp
        incl    %esi
        jmp     .Lcg_token
.Lcg_cmp:
        movl    %edi, %edx
.Lcg_cmp_loop:
        movb    (%edx), %al
        testb   %al, %al
        jz      .Lcg_value
        cmpl    %ebx, %esi
        jae     .Lcg_none
        cmpb    %al, (%esi)
        jne     .Lcg_skip
        incl    %esi
        incl    %edx
        jmp     .Lcg_cmp_loop
.Lcg_value:
        xorl    %eax, %eax
        xorl    %edx, %edx              # edx = digit count
.Lcg_digit:
        cmpl    %ebx, %esi
        jae     .Lcg_end_value
        movzbl  (%esi), %ecx
        subl    $'0', %ecx
        cmpl    $9, %ecx
        ja      .Lcg_end_value
        imull   $10, %eax, %eax
        addl    %ecx, %eax
        incl    %esi
        incl    %edx
        jmp     .Lcg_digit
.Lcg_end_value:
        testl   %edx, %edx
        jz      .Lcg_skip
        popl    %esi
        popl    %ebx
        clc
        ret
.Lcg_skip:                              # skip rest of this token
        cmpl    %ebx, %esi
        jae     .Lcg_none
        cmpb    $' ', (%esi)
        jbe     .Lcg_token
        incl    %esi
        jmp     .Lcg_skip
.Lcg_none:
        popl    %esi
        popl    %ebx
        stc
        ret

        .section .rodata
key_ticks:      .asciz "ticks="
key_period:     .asciz "period_ms="
str_tick:       .asciz "tick "
str_nl:         .asciz "\n"
str_done:       .asciz "done\n"

        .data
        .p2align 2
ticks_total:    .long DEFAULT_TICKS
period_ns:      .long DEFAULT_PERIOD_NS
tick_pending:   .long 0
        .text

        LGUEST_LIB
