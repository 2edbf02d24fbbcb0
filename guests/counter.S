# counter: count in memory and in a register, printing each count; optionally
# keep a disk of the counts.  Made for moving guests around (supervisor.cluster).
#
# For n = 1..lines: spin `spin` iterations (each: incl counter; incl %edi),
# then print "n" and "\n" as two console writes (so a pause may fall between
# them, leaving half a line), and with a writable block device of at least
# `lines` sectors write sector n-1 filled with the byte n & 0xff.
# Then print "count C R" (the memory and register totals); with the disk,
# read every sector back and print "disk ok" or "disk BAD".
#
# With gate=1 it waits for one byte of console input before each line's spin
# and before the count (any byte; end of input opens every gate): the host
# lets it print one line at a time, so it cannot end before the host allows.
#
# Command line (optional, decimal): "lines=20 spin=100000 gate=0" (the defaults).
# Exit status: 0 if C == R == lines * spin (and the disk verified);
# bit 0: a count is wrong; bit 1: the disk is wrong; 3: a disk request failed.
        .include "lguest.inc"

        .set    DEFAULT_LINES, 20
        .set    DEFAULT_SPIN, 100000

        LGUEST_BOOT

main:
        call    lg_init
        call    lg_console_setup
        call    lg_ignore_device_irqs
        movl    $key_lines, %edi
        call    cmdline_get
        jc      1f
        movl    %eax, lines_total
1:      movl    $key_spin, %edi
        call    cmdline_get
        jc      2f
        movl    %eax, spin
2:      movl    $key_gate, %edi
        call    cmdline_get
        jc      9f
        movl    %eax, gate
        call    gate_arm
9:      xorl    %ebx, %ebx              # ebx = block descriptor, 0: no disk
        movl    $DEV_TYPE_BLOCK, %eax
        call    lg_find_device
        testl   %eax, %eax
        jz      3f
        testl   $BLK_FLAG_RO, BLK_FLAGS(%eax)
        jnz     3f
        movl    lines_total, %ecx
        cmpl    %ecx, BLK_CAPACITY(%eax)
        jb      3f
        movl    %eax, %ebx
3:      xorl    %edi, %edi              # edi = the register count
        xorl    %ebp, %ebp              # ebp = n
next:
        cmpl    lines_total, %ebp
        jae     report
        incl    %ebp
        call    gate_wait
        movl    spin, %ecx
        testl   %ecx, %ecx
        jz      5f
4:      incl    counter
        incl    %edi
        decl    %ecx
        jnz     4b
5:      movl    %ebp, %eax
        call    lg_print_dec
        movl    $str_nl, %esi
        call    lg_puts
        testl   %ebx, %ebx
        jz      next
        movl    %ebp, %eax              # the sector: n & 0xff throughout
        pushl   %edi
        movl    $buf, %edi
        movl    $BLK_SECTOR_SIZE, %ecx
        rep stosb
        popl    %edi
        movl    $BLK_CMD_WRITE, %eax
        leal    -1(%ebp), %ecx
        call    blk_io
        jmp     next

report:
        call    gate_wait
        movl    $str_count, %esi
        call    lg_puts
        movl    counter, %eax
        call    lg_print_dec
        movl    $str_space, %esi
        call    lg_puts
        movl    %edi, %eax
        call    lg_print_dec
        movl    $str_nl, %esi
        call    lg_puts
        movl    lines_total, %eax
        mull    spin                    # eax = the expected count
        xorl    %esi, %esi              # esi = exit status
        cmpl    %eax, counter
        jne     6f
        cmpl    %eax, %edi
        je      7f
6:      movl    $1, %esi
7:      testl   %ebx, %ebx
        jz      finish
        xorl    %ebp, %ebp
8:      cmpl    lines_total, %ebp
        jae     disk_good
        movl    $BLK_CMD_READ, %eax
        movl    %ebp, %ecx
        call    blk_io
        incl    %ebp
        movl    %ebp, %eax
        pushl   %edi
        movl    $buf, %edi
        movl    $BLK_SECTOR_SIZE, %ecx
        repe scasb
        popl    %edi
        jne     disk_bad
        jmp     8b
disk_bad:
        pushl   %esi
        movl    $str_disk_bad, %esi
        call    lg_puts
        popl    %esi
        orl     $2, %esi
        jmp     finish
disk_good:
        pushl   %esi
        movl    $str_disk_ok, %esi
        call    lg_puts
        popl    %esi
finish:
        movl    %esi, %eax
        jmp     lg_poweroff

# blk_io: eax = command, ecx = sector; one sector at buf; ebx = descriptor.
# A failed request prints "disk error" and powers off with status 3.
blk_io:
        movl    %eax, BLK_COMMAND(%ebx)
        movl    %ecx, BLK_SECTOR(%ebx)
        movl    $1, BLK_COUNT(%ebx)
        movl    $buf, BLK_BUFFER(%ebx)
        movl    $0xffffffff, BLK_STATUS(%ebx)
        movl    %ebx, %edx
        HCALL   LHCALL_NOTIFY
        cmpl    $0, BLK_STATUS(%ebx)
        jne     1f
        ret
1:      movl    $str_disk_err, %esi
        call    lg_puts
        movl    $3, %eax
        jmp     lg_poweroff

# gate_arm: with gate=1, post a one-byte console input buffer.  Clobbers eax, edx.
gate_arm:
        cmpl    $0, gate
        je      1f
        movl    lg_console, %edx
        testl   %edx, %edx
        jz      1f
        movl    $gate_byte, CON_IN_ADDR(%edx)
        movl    $1, CON_IN_SIZE(%edx)
        movl    $0, CON_IN_LEN(%edx)
        HCALL   LHCALL_NOTIFY
1:      ret

# gate_wait: with gate=1, wait (halted) until a byte of console input has come,
# then take it and post the buffer again; return at once once input has ended.
# Clobbers eax, edx.
gate_wait:
        cmpl    $0, gate
        je      2f
        movl    lg_console, %edx
        testl   %edx, %edx
        jz      2f
1:      IRQ_OFF
        cmpl    $0, CON_IN_LEN(%edx)
        jne     3f
        testl   $CON_FLAG_EOF, CON_FLAGS(%edx)
        jnz     2f
        HCALL   LHCALL_HALT             # the console irq is delivered right after
        movl    lg_console, %edx
        jmp     1b
3:      movl    $0, CON_IN_LEN(%edx)    # taken: post it again
        HCALL   LHCALL_NOTIFY
2:      ret

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
key_lines:      .asciz "lines="
key_spin:       .asciz "spin="
key_gate:       .asciz "gate="
str_nl:         .asciz "\n"
str_space:      .asciz " "
str_count:      .asciz "count "
str_disk_ok:    .asciz "disk ok\n"
str_disk_bad:   .asciz "disk BAD\n"
str_disk_err:   .asciz "disk error\n"

        .data
        .p2align 2
lines_total:    .long DEFAULT_LINES
spin:           .long DEFAULT_SPIN
counter:        .long 0
gate:           .long 0

        .bss
        .p2align 4
buf:            .skip BLK_SECTOR_SIZE
gate_byte:      .skip 4
        .text

        LGUEST_LIB
