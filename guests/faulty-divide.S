# faulty-divide: LGUEST_INIT, then divides by zero (#DE, vector 0) with no
# IDT entry installed. Expected: killed (unhandled trap 0).
        .include "lguest.inc"

        LGUEST_BOOT

main:
        call    lg_init
        movl    $1, %eax
        xorl    %edx, %edx
        xorl    %ecx, %ecx
        divl    %ecx
        jmp     survived

# Still alive? The Launcher should have killed us: report it distinctly.
survived:
        movl    $99, %eax
        jmp     lg_poweroff

        LGUEST_LIB
