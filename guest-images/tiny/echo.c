/* echo: answers each line it receives on COM1 with "echo: <line>", so tests can check that
 * host input reaches the guest. It polls the line status register's data-ready bit (no
 * interrupts); the line "bye" resets the guest. */
#include "tiny.h"

#define COM1      0x3f8
#define COM1_LSR  (COM1 + 5)
#define LSR_DR    0x01

void guest_main(void *boot_params)
{
    char line[80];
    u64 len = 0;

    (void)boot_params;
    print("rvmm-tiny echo: ready\n");
    for (;;) {
        if (!(inb(COM1_LSR) & LSR_DR)) {
            delay(1000);
            continue;
        }
        char c = (char)inb(COM1);
        if (c == '\r')
            continue;
        if (c != '\n') {
            if (len < sizeof(line) - 1)
                line[len++] = c;
            continue;
        }
        line[len] = 0;
        print("echo: ");
        print(line);
        print("\n");
        if (len == 3 && memcmp(line, "bye", 3) == 0)
            reset();
        len = 0;
    }
}
