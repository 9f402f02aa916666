/* memtest: rewrites a memory area again and again, each pass stamping every page with the pass
 * number, and checks before each rewrite that the area still holds the previous pass. A
 * snapshot, restore or migration that loses, mixes up or stales a page shows as a CORRUPT
 * line. A guest that went back in time or rebooted shows as a pass number that does not
 * follow on, or a second start line.
 *
 * Area: memtest.mib=N MiB (default 8) from 16 MiB. Prints "memtest: pass N ok" after each pass
 * ("memtest: start" first), and "memtest: CORRUPT page=<n> got=<hex> want=<hex>" once per bad
 * pass. memtest.delay=N busy-loops N iterations between passes (default 20000). */
#include "virtio.h"

#define AREA_BASE (16UL << 20)
#define PAGE 4096UL

static u64 value(const char *key, u64 fallback)
{
    const char *s = cmdline_value(key);
    u64 v = 0;
    int digits = 0;
    for (; s && *s >= '0' && *s <= '9'; s++, digits++)
        v = v * 10 + (u64)(*s - '0');
    return digits ? v : fallback;
}

static u64 stamp(u64 pass, u64 page) { return (pass << 32) | page; }

void guest_main(void *boot_params)
{
    read_cmdline((u64)boot_params);
    u64 pages = value("memtest.mib=", 8) * (1UL << 20) / PAGE;
    u64 pause = value("memtest.delay=", 20000);
    print("memtest: start\n");
    for (u64 pass = 1;; pass++) {
        int bad = 0;
        for (u64 p = 0; p < pages; p++) {
            volatile u64 *w = (volatile u64 *)(AREA_BASE + p * PAGE);
            if (pass > 1 && !bad) {
                u64 want = stamp(pass - 1, p);
                u64 got = w[0];
                if (got != want || w[PAGE / 8 - 1] != ~want) {
                    print("memtest: CORRUPT page=");
                    print_dec(p);
                    print(" got=");
                    print_hex(got);
                    print(" want=");
                    print_hex(want);
                    print("\n");
                    bad = 1;
                }
            }
            w[0] = stamp(pass, p);
            w[PAGE / 8 - 1] = ~stamp(pass, p);
        }
        print("memtest: pass ");
        print_dec(pass);
        print(bad ? " bad\n" : " ok\n");
        delay(pause);
    }
}
