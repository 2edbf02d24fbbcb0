# echo: console echo until a line "quit" or end of input.
#
# Posts a console input buffer (in_addr/in_size, in_len = 0, NOTIFY), then
# idles (irq off, check, HALT). Each chunk of input is written back
# byte-for-byte (the whole chunk, as received), then scanned line-wise:
# bytes are accumulated until '\n'; a line exactly equal to "quit" (no '\r'
# stripping) makes it print "bye\n" and power off with status 0 (the rest of
# that chunk has already been echoed). Lines may arrive split across chunks.
# After each chunk: in_len = 0 and NOTIFY to re-arm.
# On input EOF (flags bit0, after any pending data) it powers off with
# status 0 without printing anything more.
# No console device: SHUTDOWN crash "no console".
        .include "lguest.inc"

        .set    INBUF_SIZE, 256
        .set    LINE_KEEP, 8            # bytes of a line we keep (>= 4)

        LGUEST_BOOT

main:
        call    lg_init
        call    lg_console_setup
        movl    lg_console, %ebx        # ebx = console descriptor
        testl   %ebx, %ebx
        jnz     1f
        movl    $str_no_console, %edx
        jmp     lg_crash
1:
        call    lg_ignore_device_irqs   # stray device irqs: no-op
        movl    DEV_IRQ(%ebx), %eax
        addl    $LG_IRQ_VECTOR_BASE, %eax
        movl    $console_handler, %edx
        call    lg_set_irq_gate

        # post the input buffer
        movl    $inbuf, CON_IN_ADDR(%ebx)
        movl    $INBUF_SIZE, CON_IN_SIZE(%ebx)
        movl    $0, CON_IN_LEN(%ebx)
        movl    %ebx, %edx
        HCALL   LHCALL_NOTIFY

idle:
        IRQ_OFF
        movl    CON_IN_LEN(%ebx), %ecx
        testl   %ecx, %ecx
        jnz     got_input
        testl   $CON_FLAG_EOF, CON_FLAGS(%ebx)
        jnz     eof
        HCALL   LHCALL_HALT             # console irq is delivered right after
        jmp     idle

got_input:
        cmpl    $INBUF_SIZE, %ecx       # never trust in_len beyond in_size
        jbe     1f
        movl    $INBUF_SIZE, %ecx
1:      movl    %ecx, %edi              # edi = chunk length
        movl    $inbuf, %esi
        call    lg_write                # echo exactly what we got

        movl    $inbuf, %esi
scan:
        testl   %edi, %edi
        jz      chunk_done
        decl    %edi
        lodsb
        cmpb    $'\n', %al
        je      end_of_line
        movl    line_len, %edx
        cmpl    $LINE_KEEP, %edx
        jae     2f
        movb    %al, linebuf(%edx)
2:      cmpl    $0x7fffffff, %edx       # saturate
        je      scan
        incl    line_len
        jmp     scan

end_of_line:
        cmpl    $4, line_len
        jne     3f
        cmpl    $0x74697571, linebuf    # "quit" little-endian
        je      quit
3:      movl    $0, line_len
        jmp     scan

chunk_done:
        movl    $0, CON_IN_LEN(%ebx)    # consumed: re-arm
        movl    %ebx, %edx
        HCALL   LHCALL_NOTIFY
        jmp     idle

quit:
        movl    $str_bye, %esi
        call    lg_puts
        xorl    %eax, %eax
        jmp     lg_poweroff

eof:
        xorl    %eax, %eax
        jmp     lg_poweroff

# Interrupt gate: nothing to do, the main loop polls in_len/flags.
console_handler:
        incl    console_irqs
        jmp     lg_irq_return

        .section .rodata
str_bye:        .asciz "bye\n"
str_no_console: .asciz "no console"

        .data
        .p2align 2
line_len:       .long 0
console_irqs:   .long 0
linebuf:        .skip LINE_KEEP

        .bss
        .p2align 4
inbuf:          .skip INBUF_SIZE
        .text

        LGUEST_LIB
