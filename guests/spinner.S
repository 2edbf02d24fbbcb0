# spinner: LGUEST_INIT, then increment a u32 counter forever.
# The counter lives at the fixed guest-physical (== virtual) address 0x9000
# (symbol spin_counter, also exported as an absolute symbol in the ELF),
# so tests can watch it advance. No console output, never exits on its own.
# Interrupts stay disabled (irq_enabled = 0) and no IDT entries are set.
        .include "lguest.inc"

        .set    SPIN_COUNTER_ADDR, 0x9000
        .globl  spin_counter
        .set    spin_counter, SPIN_COUNTER_ADDR

        LGUEST_BOOT

main:
        call    lg_init
        movl    $0, SPIN_COUNTER_ADDR
        .globl  spin_loop
spin_loop:
        incl    SPIN_COUNTER_ADDR
        jmp     spin_loop

        LGUEST_LIB
