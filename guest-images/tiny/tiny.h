/* Shared helpers for the rvmm tiny guests (freestanding, x86_64). */
#ifndef TINY_H
#define TINY_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long size_t;

/* boot_params (Linux zero page) offsets */
#define BP_E820_ENTRIES   0x1e8   /* u8  */
#define BP_CMD_LINE_PTR   0x228   /* u32 */
#define BP_CMDLINE_SIZE   0x238   /* u32 */
#define BP_E820_TABLE     0x2d0   /* 20-byte entries */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* compiler barrier, used in busy loops so they are not optimised away */
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* Physical (= virtual) memory accessors. The empty asm hides the address's
 * origin so gcc never emits addr32 (0x67) prefixed accesses. */
static inline u64 paddr(u64 a) { __asm__("" : "+r"(a)); return a; }
static inline u8  rd8(u64 a)  { return *(volatile u8 *)paddr(a); }
static inline u16 rd16(u64 a) { return *(volatile u16 *)paddr(a); }
static inline u32 rd32(u64 a) { return *(volatile u32 *)paddr(a); }
static inline u64 rd64(u64 a) { return *(volatile u64 *)paddr(a); }
static inline void wr8(u64 a, u8 v)   { *(volatile u8 *)paddr(a) = v; }
static inline void wr16(u64 a, u16 v) { *(volatile u16 *)paddr(a) = v; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)paddr(a) = v; }

void print_char(char c);
void print(const char *s);               /* no newline added */
void print_hex(u64 v);                  /* 16 lowercase hex digits, no "0x" */
void print_hex8(u8 v);                  /* 2 lowercase hex digits */
void print_dec(u64 v);
void delay(u64 iterations);           /* plain busy loop */
__attribute__((noreturn)) void reset(void);   /* outb 0xfe -> 0x64, then hlt loop */
__attribute__((noreturn)) void halt_forever(void);

size_t strlen(const char *s);
void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);

/* every guest implements this; called from start.S with RSI (boot_params) */
void guest_main(void *boot_params);

#endif
