# faulty-crash: LGUEST_INIT, then SHUTDOWN with ebx = 0 (crash) and the
# reason "guest panic". Expected: guest dies as crashed, reason "guest panic".
        .include "lguest.inc"

        LGUEST_BOOT

main:
        call    lg_init
        movl    $str_panic, %edx
        jmp     lg_crash
        jmp     survived

        .section .rodata
str_panic:      .asciz "guest panic"
        .text

# Still alive? The Launcher should have killed us: report it distinctly.
survived:
        movl    $99, %eax
        jmp     lg_poweroff

        LGUEST_LIB
