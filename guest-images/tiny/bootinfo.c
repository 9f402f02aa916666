/* bootinfo: dump the kernel command line and the e820 map from boot_params. */
#include "tiny.h"

#define CMDLINE_MAX 4096
#define E820_MAX    128

void guest_main(void *boot_params)
{
    u64 bp = (u64)boot_params;

    u64 cmd_ptr = rd32(bp + BP_CMD_LINE_PTR);
    u32 cmd_size = rd32(bp + BP_CMDLINE_SIZE);
    if (cmd_size == 0 || cmd_size > CMDLINE_MAX)
        cmd_size = CMDLINE_MAX;

    print("cmdline: ");
    if (cmd_ptr) {
        for (u32 i = 0; i < cmd_size; i++) {
            char c = (char)rd8(cmd_ptr + i);
            if (!c)
                break;
            print_char(c);
        }
    }
    print_char('\n');

    u32 n = rd8(bp + BP_E820_ENTRIES);
    if (n > E820_MAX)
        n = E820_MAX;
    for (u32 i = 0; i < n; i++) {
        u64 e = bp + BP_E820_TABLE + (u64)i * 20;
        u64 addr = rd32(e) | ((u64)rd32(e + 4) << 32);
        u64 size = rd32(e + 8) | ((u64)rd32(e + 12) << 32);
        u32 type = rd32(e + 16);
        print("e820: addr=0x");
        print_hex(addr);
        print(" size=0x");
        print_hex(size);
        print(" type=");
        print_dec(type);
        print_char('\n');
    }

    print("bootinfo: done\n");
    reset();
}
