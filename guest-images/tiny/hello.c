/* hello: smallest possible liveness check. */
#include "tiny.h"

void guest_main(void *boot_params)
{
    (void)boot_params;
    print("rvmm-tiny hello: guest is alive\n");
    reset();
}
