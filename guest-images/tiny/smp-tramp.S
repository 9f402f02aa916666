/* Real-mode AP trampoline for the "smp" guest.
 *
 * These bytes are only data in the ELF: the BSP copies them to physical
 * 0x10000 and sends SIPI vector 0x10, so each AP starts here with
 * CS = 0x1000, IP = 0. The code is position independent (relative jumps
 * only); data lives at fixed offsets in the same 64 KiB segment:
 *   ds:0x1000 (phys 0x11000)  u32 arrival counter (lock xadd)
 *   ds:0x1010 (phys 0x11010)  u16 slot[i] = 0x100 | initial APIC id
 *                             (bit 8 = "slot written"), i = arrival order
 * Keep in sync with AP_COUNT / AP_SLOTS / AP_SLOTS_MAX in smp.c.
 */
#define AP_COUNT_OFF   0x1000
#define AP_SLOTS_OFF   0x1010
#define AP_SLOTS_MAX   1000

    .section .rodata.tramp, "a"
    .code16
    .globl tramp_start, tramp_end
tramp_start:
    cli
    mov     %cs, %ax
    mov     %ax, %ds

    mov     $1, %eax                /* CPUID.1:EBX[31:24] = initial APIC id */
    xor     %ecx, %ecx
    cpuid
    shr     $24, %ebx
    or      $0x100, %bx             /* mark the slot as written */

    mov     $1, %eax
    lock xaddl %eax, AP_COUNT_OFF   /* eax = my arrival index */
    cmp     $AP_SLOTS_MAX, %eax
    jae     1f
    mov     %ax, %si
    add     %si, %si
    mov     %bx, AP_SLOTS_OFF(%si)
1:  cli
    hlt
    jmp     1b
tramp_end:

    .code64
    .section .note.GNU-stack, "", @progbits
