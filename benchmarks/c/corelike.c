/* corelike: CoreMark's four kinds of work, written for this project's benchmarks
 * (not CoreMark's code): a linked list reversed, searched and merge-sorted, a
 * small integer matrix multiplied and summed, a byte-driven state machine over a
 * generated input, and a CRC-16 over every result.  Prints "corelike iterations=N"
 * before it starts and "crc XXXX" at the end.  Command line: iterations=N. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LIST 256
#define MAT 12
#define INPUT 512

struct node {
    struct node *next;
    int32_t value;
};

static struct node pool[LIST];

static uint16_t crc16(uint16_t crc, uint32_t data)
{
    for (int i = 0; i < 32; i++) {
        int bit = (int)((data >> i) & 1) ^ (crc & 1);
        crc >>= 1;
        if (bit) crc ^= 0xA001;
    }
    return crc;
}

static struct node *merge_sort(struct node *head)
{
    if (!head || !head->next) return head;
    struct node *slow = head, *fast = head->next;
    while (fast && fast->next) slow = slow->next, fast = fast->next->next;
    struct node *right = slow->next;
    slow->next = NULL;
    struct node *a = merge_sort(head), *b = merge_sort(right), dummy, *tail = &dummy;
    while (a && b) {
        if (a->value <= b->value) tail->next = a, a = a->next;
        else tail->next = b, b = b->next;
        tail = tail->next;
    }
    tail->next = a ? a : b;
    return dummy.next;
}

static uint32_t list_work(uint32_t seed)
{
    for (int i = 0; i < LIST; i++) {
        seed = seed * 1103515245u + 12345u;
        pool[i].value = (int32_t)(seed >> 8) & 0xFFFF;
        pool[i].next = i + 1 < LIST ? &pool[i + 1] : NULL;
    }
    struct node *head = &pool[0], *prev = NULL;
    while (head) { /* reverse */
        struct node *next = head->next;
        head->next = prev, prev = head, head = next;
    }
    head = merge_sort(prev);
    uint32_t found = 0;
    for (struct node *n = head; n; n = n->next)
        if ((n->value & 0xFF) == (int32_t)(seed & 0xFF)) found += (uint32_t)n->value;
    return found ^ (uint32_t)head->value;
}

static uint32_t matrix_work(uint32_t seed)
{
    static int32_t a[MAT][MAT], b[MAT][MAT], c[MAT][MAT];
    for (int i = 0; i < MAT; i++)
        for (int j = 0; j < MAT; j++) {
            seed = seed * 1664525u + 1013904223u;
            a[i][j] = (int32_t)(seed >> 20) - 2048;
            b[i][j] = (int32_t)(seed & 0xFFF) - 2048;
        }
    uint32_t sum = 0;
    for (int i = 0; i < MAT; i++)
        for (int j = 0; j < MAT; j++) {
            int32_t acc = 0;
            for (int k = 0; k < MAT; k++) acc += a[i][k] * b[k][j];
            c[i][j] = acc;
            sum += (uint32_t)acc;
        }
    return sum;
}

static uint32_t state_work(uint32_t seed)
{
    static char input[INPUT];
    static const char alphabet[] = "0123456789+-.eE ,x";
    for (int i = 0; i < INPUT; i++) {
        seed = seed * 22695477u + 1u;
        input[i] = alphabet[(seed >> 16) % (sizeof alphabet - 1)];
    }
    enum { START, INT, FRAC, EXP, SIGN, BAD } state = START;
    uint32_t counts[6] = {0};
    for (int i = 0; i < INPUT; i++) {
        char ch = input[i];
        if (ch == ',' || ch == ' ') {
            counts[state]++;
            state = START;
            continue;
        }
        switch (state) {
        case START: state = (ch >= '0' && ch <= '9') ? INT : (ch == '+' || ch == '-') ? SIGN : BAD; break;
        case SIGN: state = (ch >= '0' && ch <= '9') ? INT : BAD; break;
        case INT: state = (ch >= '0' && ch <= '9') ? INT : ch == '.' ? FRAC : (ch == 'e' || ch == 'E') ? EXP : BAD; break;
        case FRAC: state = (ch >= '0' && ch <= '9') ? FRAC : (ch == 'e' || ch == 'E') ? EXP : BAD; break;
        case EXP: state = (ch >= '0' && ch <= '9') ? EXP : BAD; break;
        case BAD: break;
        }
    }
    uint32_t r = 0;
    for (int i = 0; i < 6; i++) r = r * 31u + counts[i];
    return r;
}

int main(int argc, char **argv)
{
    unsigned long iterations = 200;
    for (int i = 1; i < argc; i++)
        if (strncmp(argv[i], "iterations=", 11) == 0) iterations = strtoul(argv[i] + 11, NULL, 10);
    printf("corelike iterations=%lu\n", iterations);
    fflush(stdout);
    uint16_t crc = 0;
    for (unsigned long it = 0; it < iterations; it++) {
        uint32_t seed = (uint32_t)it * 2654435761u;
        crc = crc16(crc, list_work(seed));
        crc = crc16(crc, matrix_work(seed));
        crc = crc16(crc, state_work(seed));
    }
    printf("crc %04x\n", crc);
    return 0;
}
