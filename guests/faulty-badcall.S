# faulty-badcall: LGUEST_INIT, then the unknown hypercall 99.
# Expected: killed by the Launcher (bad hypercall). No console output.
        .include "lguest.inc"

        LGUEST_BOOT

main:
        call    lg_init
        HCALL   99
        jmp     survived

# Still alive? The Launcher should have killed us: report it distinctly.
survived:
        movl    $99, %eax
        jmp     lg_poweroff

        LGUEST_LIB
