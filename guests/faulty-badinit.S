# faulty-badinit: LGUEST_INIT whose lguest_data address 0xFFFFF000 lies
# outside guest memory. Expected: killed by the Launcher.
        .include "lguest.inc"

        LGUEST_BOOT

main:
        movl    $0xfffff000, %edx
        HCALL   LHCALL_LGUEST_INIT
        jmp     survived

# Still alive? The Launcher should have killed us: report it distinctly.
survived:
        movl    $99, %eax
        jmp     lg_poweroff

        LGUEST_LIB
