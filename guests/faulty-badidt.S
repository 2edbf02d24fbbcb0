# faulty-badidt: LGUEST_INIT, then LOAD_IDT_ENTRY for vector 300 (> 255)
# with an otherwise valid interrupt gate. Expected: killed.
        .include "lguest.inc"

        LGUEST_BOOT

main:
        call    lg_init
        movl    $300, %eax
        movl    $survived, %edx
        call    lg_set_irq_gate
        jmp     survived

# Still alive? The Launcher should have killed us: report it distinctly.
survived:
        movl    $99, %eax
        jmp     lg_poweroff

        LGUEST_LIB
