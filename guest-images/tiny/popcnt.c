/* popcnt: executes one instruction KVM's emulator does not implement. On hardware KVM it
 * runs and the guest resets; on a PVM host (guest code emulated) the VMM must stop with a
 * KVM_EXIT_INTERNAL_ERROR message naming the registers. */
#include "tiny.h"

void guest_main(void *boot_params)
{
    (void)boot_params;
    u64 value = 0xf0f0, bits;
    print("popcnt: executing\n");
    __asm__ volatile("popcnt %1, %0" : "=r"(bits) : "r"(value));
    print("popcnt: result ");
    print_dec(bits);
    print("\n");
    reset();
}
