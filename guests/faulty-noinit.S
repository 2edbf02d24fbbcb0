# faulty-noinit: HALT (hypercall 10) before LGUEST_INIT.
# Expected: killed by the Launcher (first hypercall must be LGUEST_INIT).
        .include "lguest.inc"

        LGUEST_BOOT

main:
        HCALL   LHCALL_HALT
        jmp     survived

# Still alive? The Launcher should have killed us: report it distinctly.
survived:
        movl    $99, %eax
        jmp     lg_poweroff

        LGUEST_LIB
