/* ticker: runs until the VMM stops it, printing "tick: <n>" now and then, so tests can
 * watch pause, resume and stop from the host. */
#include "tiny.h"

void guest_main(void *boot_params)
{
    (void)boot_params;
    for (u64 n = 0;; n++) {
        print("tick: ");
        print_dec(n);
        print("\n");
        delay(20000);
    }
}
