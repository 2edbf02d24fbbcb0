/* blockcopy: the C version of blockcopy.S, with lguest.h's block device.
 * Copies sectors 0..7 to 8..15 and reads them back.
 *   "blockcopy ok"            0    "blockcopy FAILED"        1
 *   "no block device"         2    "read-only block device"  3
 *   "block device too small"  4 (capacity < 16 sectors) */
#include <lguest.h>
#include <stdio.h>
#include <string.h>

#define NSECT 8

static unsigned char buf_a[NSECT * LGUEST_BLOCK_SECTOR_SIZE];
static unsigned char buf_b[NSECT * LGUEST_BLOCK_SECTOR_SIZE];

int main(void)
{
    struct lguest_block *blk = lguest_block();
    if (!blk) {
        puts("no block device");
        return 2;
    }
    if (blk->flags & LGUEST_BLOCK_READONLY) {
        puts("read-only block device");
        return 3;
    }
    if (blk->capacity < 2 * NSECT) {
        puts("block device too small");
        return 4;
    }
    int ok = lguest_block_read(blk, 0, NSECT, buf_a) == LGUEST_BLOCK_OK;
    ok = ok && lguest_block_write(blk, NSECT, NSECT, buf_a) == LGUEST_BLOCK_OK;
    memset(buf_b, 0xa5, sizeof buf_b);
    ok = ok && lguest_block_read(blk, NSECT, NSECT, buf_b) == LGUEST_BLOCK_OK;
    ok = ok && memcmp(buf_a, buf_b, sizeof buf_a) == 0;
    puts(ok ? "blockcopy ok" : "blockcopy FAILED");
    return ok ? 0 : 1;
}
