# hello: print a greeting on the console, then power off with status 0.
# Expected console output: "Hello from an lguest guest!\n"
# Exit: SHUTDOWN POWEROFF, status 0, reason "power off".
        .include "lguest.inc"

        LGUEST_BOOT

main:
        call    lg_init
        call    lg_console_setup
        movl    $msg, %esi
        call    lg_puts
        xorl    %eax, %eax
        jmp     lg_poweroff

        .section .rodata
msg:    .asciz  "Hello from an lguest guest!\n"
        .text

        LGUEST_LIB
