# blockcopy: copy sectors 0..7 to 8..15 on the block device and verify.
#
#   read 0..7 -> buf_a; write buf_a -> 8..15; fill buf_b with 0xa5;
#   read 8..15 -> buf_b; compare buf_a == buf_b.
# Output / exit status:
#   "blockcopy ok\n"             0   success
#   "blockcopy FAILED\n"         1   a request status != 0, or mismatch
#   "no block device\n"          2   no type-2 descriptor
#   "read-only block device\n"   3   flags bit0 set
#   "block device too small\n"   4   capacity < 16 sectors
# All exits are SHUTDOWN POWEROFF with reason "power off".
        .include "lguest.inc"

        .set    NSECT, 8
        .set    BUF_BYTES, NSECT * BLK_SECTOR_SIZE

        LGUEST_BOOT

main:
        call    lg_init
        call    lg_console_setup
        movl    $DEV_TYPE_BLOCK, %eax
        call    lg_find_device
        testl   %eax, %eax
        jz      no_dev
        movl    %eax, %ebx              # ebx = block descriptor
        testl   $BLK_FLAG_RO, BLK_FLAGS(%ebx)
        jnz     read_only
        cmpl    $2 * NSECT, BLK_CAPACITY(%ebx)
        jb      too_small

        movl    $BLK_CMD_READ, %eax
        xorl    %ecx, %ecx
        movl    $buf_a, %edx
        call    blk_io

        movl    $BLK_CMD_WRITE, %eax
        movl    $NSECT, %ecx
        movl    $buf_a, %edx
        call    blk_io

        movl    $buf_b, %edi            # poison the read-back buffer
        movl    $0xa5a5a5a5, %eax
        movl    $(BUF_BYTES >> 2), %ecx
        rep stosl

        movl    $BLK_CMD_READ, %eax
        movl    $NSECT, %ecx
        movl    $buf_b, %edx
        call    blk_io

        movl    $buf_a, %esi
        movl    $buf_b, %edi
        movl    $(BUF_BYTES >> 2), %ecx
        repe cmpsl
        jne     failed

        movl    $str_ok, %esi
        xorl    %ebp, %ebp
        jmp     finish
failed:
        movl    $str_failed, %esi
        movl    $1, %ebp
        jmp     finish
no_dev:
        movl    $str_no_dev, %esi
        movl    $2, %ebp
        jmp     finish
read_only:
        movl    $str_ro, %esi
        movl    $3, %ebp
        jmp     finish
too_small:
        movl    $str_small, %esi
        movl    $4, %ebp
finish:
        call    lg_puts
        movl    %ebp, %eax
        jmp     lg_poweroff

# blk_io: eax = command, ecx = first sector, edx = buffer; NSECT sectors.
# ebx = descriptor. Synchronous (NOTIFY). Jumps to `failed` if status != 0.
blk_io:
        movl    %eax, BLK_COMMAND(%ebx)
        movl    %ecx, BLK_SECTOR(%ebx)
        movl    $NSECT, BLK_COUNT(%ebx)
        movl    %edx, BLK_BUFFER(%ebx)
        movl    $0xffffffff, BLK_STATUS(%ebx)
        movl    %ebx, %edx
        HCALL   LHCALL_NOTIFY
        cmpl    $0, BLK_STATUS(%ebx)
        jne     1f
        ret
1:      addl    $4, %esp                # drop return address
        jmp     failed

        .section .rodata
str_ok:         .asciz "blockcopy ok\n"
str_failed:     .asciz "blockcopy FAILED\n"
str_no_dev:     .asciz "no block device\n"
str_ro:         .asciz "read-only block device\n"
str_small:      .asciz "block device too small\n"

        .bss
        .p2align 4
buf_a:          .skip BUF_BYTES
buf_b:          .skip BUF_BYTES
        .text

        LGUEST_LIB
