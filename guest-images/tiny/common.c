/* Shared helpers for the rvmm tiny guests: 16550 serial output, number
 * formatting, reset, and the few libc routines gcc may call. */
#include "tiny.h"

#define COM1      0x3f8
#define COM1_LSR  (COM1 + 5)
#define LSR_THRE  0x20

void print_char(char c)
{
    /* Poll "transmit holding register empty", but bounded so a VMM whose
     * LSR always reads 0 does not hang us. */
    for (int i = 0; i < 1000; i++) {
        if (inb(COM1_LSR) & LSR_THRE)
            break;
    }
    outb(COM1, (u8)c);
}

void print(const char *s)
{
    while (*s)
        print_char(*s++);
}

void print_hex(u64 v)
{
    static const char digits[] = "0123456789abcdef";
    for (int shift = 60; shift >= 0; shift -= 4)
        print_char(digits[(v >> shift) & 0xf]);
}

void print_hex8(u8 v)
{
    static const char digits[] = "0123456789abcdef";
    print_char(digits[v >> 4]);
    print_char(digits[v & 0xf]);
}

void print_dec(u64 v)
{
    char buf[21];
    int i = 0;
    do {
        buf[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i)
        print_char(buf[--i]);
}

void delay(u64 iterations)
{
    for (u64 i = 0; i < iterations; i++)
        barrier();
}

void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

void reset(void)
{
    outb(0x64, 0xfe);           /* i8042 pulse reset line -> VMM exits 0 */
    halt_forever();
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    while (n--)
        *dp++ = *sp++;
    return d;
}

void *memset(void *d, int c, size_t n)
{
    u8 *dp = d;
    while (n--)
        *dp++ = (u8)c;
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}
