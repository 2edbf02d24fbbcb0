# flood: flood the console forever (a hostile neighbour for isolation tests).
# Fills a 64 KiB buffer with 2-byte lines ("f\n"), then NOTIFYs all of it
# in a loop: 32,768 lines per NOTIFY.  Never exits on its own.
        .include "lguest.inc"

        .set    FLOOD_BUF, 0x40000      # guest-physical, inside any RAM >= 512K
        .set    FLOOD_SIZE, 0x10000

        LGUEST_BOOT

main:
        call    lg_init
        call    lg_console_setup
        movl    $FLOOD_BUF, %edi
        movl    $(FLOOD_SIZE / 2), %edx
1:      movl    $1, %ecx
        movb    $'f', %al
        rep stosb
        movb    $10, %al
        stosb
        decl    %edx
        jnz     1b
2:      movl    $FLOOD_BUF, %esi
        movl    $FLOOD_SIZE, %ecx
        call    lg_write
        jmp     2b

        LGUEST_LIB
