/* Common 64-bit entry point for the rvmm tiny guests.
 * Entered in long mode, paging on, interrupts off, RSI = &boot_params. */
    .section .text.start, "ax"
    .code64
    .globl _start
_start:
    cli
    cld
    mov     %rsi, %r12              /* keep boot_params pointer */

    /* zero .bss (includes our stack) with a simple loop */
    mov     $__bss_start, %rdi
    mov     $__bss_end, %rcx
1:  cmp     %rcx, %rdi
    jae     2f
    movq    $0, (%rdi)
    add     $8, %rdi
    jmp     1b
2:
    mov     $stack_top, %rsp
    xor     %ebp, %ebp
    mov     %r12, %rdi              /* guest_main(boot_params) */
    call    guest_main
    call    reset                   /* never returns */
3:  cli
    hlt
    jmp     3b

    .section .bss
    .balign 16
stack:
    .skip   16384
stack_top:

    .section .note.GNU-stack, "", @progbits
