# faulty-pagefault: LGUEST_INIT, no IDT entry for vector 14, then reads
# the unmapped virtual address 0x80000000 (only 0.. and 0xC0000000.. are
# mapped). Expected: killed (unhandled page fault, cr2 = 0x80000000).
        .include "lguest.inc"

        LGUEST_BOOT

main:
        call    lg_init
        movl    0x80000000, %eax
        jmp     survived

# Still alive? The Launcher should have killed us: report it distinctly.
survived:
        movl    $99, %eax
        jmp     lg_poweroff

        LGUEST_LIB
