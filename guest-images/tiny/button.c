/* button: runs until rvmm presses the guest's power button, then resets, as Linux does when
 * the i8042's Ctrl-Alt-Del (rvmm's power button) asks it to shut down. A reset after the power
 * button is the guest's power-off for rvmm, also where a reset alone reboots the guest. */
#include "tiny.h"

#define I8042_DATA   0x60
#define I8042_STATUS 0x64
#define I8042_OUTPUT_FULL 0x01

void guest_main(void *boot_params)
{
    (void)boot_params;
    print("rvmm-tiny button: waiting for the power button\n");
    while (!(inb(I8042_STATUS) & I8042_OUTPUT_FULL))
        delay(10000);
    /* Take the whole key sequence, as a keyboard driver would. */
    while (inb(I8042_STATUS) & I8042_OUTPUT_FULL)
        (void)inb(I8042_DATA);
    print("rvmm-tiny button: pressed, shutting down\n");
    reset();
}
