/* triple: force a triple fault (VMM should see a shutdown exit). */
#include "tiny.h"

struct __attribute__((packed)) idtr {
    u16 limit;
    u64 base;
};

void guest_main(void *boot_params)
{
    static const struct idtr null_idt = { 0, 0 };

    (void)boot_params;
    print("triple: about to triple-fault\n");
    /* Empty IDT: #UD cannot be delivered -> #GP -> #DF -> triple fault. */
    __asm__ volatile("lidt %0\n\tud2" :: "m"(null_idt) : "memory");

    /* Not reached on a correct VMM. Do NOT reset: just say so and hang. */
    print("triple: ERROR: still running after ud2\n");
    halt_forever();
}
