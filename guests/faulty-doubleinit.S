# faulty-doubleinit: LGUEST_INIT twice.
# Expected: killed by the Launcher on the second LGUEST_INIT.
        .include "lguest.inc"

        LGUEST_BOOT

main:
        call    lg_init
        call    lg_init
        jmp     survived

# Still alive? The Launcher should have killed us: report it distinctly.
survived:
        movl    $99, %eax
        jmp     lg_poweroff

        LGUEST_LIB
