/* cpuid: prints the CPUID words the VMM's CPU profiles change, as the guest sees them, so
 * tests can check that a profile really reaches the guest. */
#include "tiny.h"

static void show(const char *name, u32 leaf, u32 subleaf)
{
    u32 a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(subleaf));
    print("cpuid: ");
    print(name);
    print(" eax=0x");
    print_hex(a);
    print(" ebx=0x");
    print_hex(b);
    print(" ecx=0x");
    print_hex(c);
    print(" edx=0x");
    print_hex(d);
    print("\n");
}

void guest_main(void *boot_params)
{
    (void)boot_params;
    show("leaf1", 1, 0);
    show("leaf7", 7, 0);
    show("leafd", 0xd, 0);
    show("leaf80000001", 0x80000001, 0);
    show("leaf80000008", 0x80000008, 0);
    print("cpuid: done\n");
    reset();
}
