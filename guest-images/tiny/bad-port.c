/* bad-port: poke unassigned I/O ports and an unassigned MMIO address; the
 * VMM must handle these exits gracefully (ignore writes, reads return
 * something) and keep running. */
#include "tiny.h"

#define BAD_MMIO 0xd0000000UL    /* inside the 4 GiB identity map, no device */

void guest_main(void *boot_params)
{
    (void)boot_params;

    outb(0x80, 0x42);            /* POST code port */
    outb(0x1234, 0x55);
    outw(0x1234, 0xbeef);
    outl(0x1234, 0xdeadbeef);
    u8 b = inb(0x5678);
    u16 w = inw(0x5678);
    u32 l = inl(0x5678);

    wr32(BAD_MMIO, 0x12345678);
    wr8(BAD_MMIO + 0x10, 0xab);
    u32 m = rd32(BAD_MMIO);
    u8 mb = rd8(BAD_MMIO + 0x10);

    print("bad-port: inb(0x5678)=0x");
    print_hex8(b);
    print(" inw=0x");
    print_hex(w);
    print(" inl=0x");
    print_hex(l);
    print_char('\n');
    print("bad-port: mmio read32(0xd0000000)=0x");
    print_hex(m);
    print(" read8=0x");
    print_hex8(mb);
    print_char('\n');
    print("bad-port: survived\n");
    reset();
}
