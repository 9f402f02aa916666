/* smp: parse the MP table, bring up the APs with INIT/SIPI/SIPI through the
 * local APIC (x2APIC if CPUID says so, xAPIC MMIO otherwise), report who
 * arrived. Trampoline: smp-tramp.S. */
#include "tiny.h"

#define TRAMP_PHYS    0x10000UL
#define AP_COUNT      0x11000UL     /* u32, see smp-tramp.S */
#define AP_SLOTS      0x11010UL     /* u16[AP_SLOTS_MAX] */
#define AP_SLOTS_MAX  1000

#define DEFAULT_WAIT  2000000UL     /* poll iterations (~9 s under the emulator,
                                       measured); override: smp_wait=N */

#define MSR_APIC_BASE 0x1b
#define X2APIC_ID     0x802
#define X2APIC_SVR    0x80f
#define X2APIC_ICR    0x830

#define ICR_INIT      0x000c4500u   /* all-excluding-self, assert, INIT */
#define ICR_SIPI      0x000c4600u   /* all-excluding-self, assert, SIPI | vector */

extern const u8 tramp_start[], tramp_end[];

static int use_x2apic;
static u64 xapic_base;

/* ---------------------------------------------------------------- MP table */

static u8 checksum(u64 addr, u32 len)
{
    u8 sum = 0;
    for (u32 i = 0; i < len; i++)
        sum += rd8(addr + i);
    return sum;
}

static u64 scan_mpfp(u64 start, u64 end)
{
    for (u64 a = start; a + 16 <= end; a += 16)
        if (rd32(a) == 0x5f504d5f)          /* "_MP_" */
            return a;
    return 0;
}

struct mpinfo {
    u32 cpus;       /* enabled processor entries */
    int bsp;        /* APIC id of the entry with the BSP flag, -1 if none */
};

static int parse_mptable(struct mpinfo *mi)
{
    mi->cpus = 0;
    mi->bsp = -1;

    u64 fp = scan_mpfp(0x9fc00, 0xa0000);
    if (!fp)
        fp = scan_mpfp(0xf0000, 0x100000);
    if (!fp) {
        print("mptable: not found\n");
        return -1;
    }
    u32 fplen = rd8(fp + 8) * 16u;
    if (checksum(fp, fplen ? fplen : 16) != 0)
        print("mptable: warning: bad floating pointer checksum\n");

    u64 ct = rd32(fp + 4);
    if (!ct || rd32(ct) != 0x504d4350) {    /* "PCMP" */
        print("mptable: no PCMP config table\n");
        return -1;
    }
    u32 base_len = rd16(ct + 4);
    u32 count = rd16(ct + 34);
    if (checksum(ct, base_len) != 0)
        print("mptable: warning: bad config table checksum\n");

    u64 p = ct + 44, end = ct + base_len;
    for (u32 i = 0; i < count && p < end; i++) {
        u8 type = rd8(p);
        if (type == 0) {                    /* processor */
            u8 id = rd8(p + 1), flags = rd8(p + 3);
            if (flags & 1)
                mi->cpus++;
            if (flags & 2)
                mi->bsp = id;
            p += 20;
        } else if (type <= 4) {             /* bus, ioapic, ioint, lint */
            p += 8;
        } else {
            print("mptable: warning: unknown entry type ");
            print_dec(type);
            print_char('\n');
            break;
        }
    }
    return 0;
}

/* -------------------------------------------------------------- local APIC */

static u32 apic_init(void)
{
    u32 a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    u64 base = rdmsr(MSR_APIC_BASE);

    if (!(base & 0x800)) {                  /* xAPIC globally disabled? */
        base |= 0x800;
        wrmsr(MSR_APIC_BASE, base);
    }
    if (c & (1u << 21)) {
        use_x2apic = 1;
        wrmsr(MSR_APIC_BASE, base | 0xc00); /* EN | EXTD */
        wrmsr(X2APIC_SVR, rdmsr(X2APIC_SVR) | 0x1ff);
        print("apic: x2apic\n");
        return (u32)rdmsr(X2APIC_ID);
    }
    xapic_base = base & 0xfffff000UL;
    wr32(xapic_base + 0xf0, rd32(xapic_base + 0xf0) | 0x1ff);
    print("apic: xapic\n");
    return rd32(xapic_base + 0x20) >> 24;
}

static void send_ipi(u32 icr_low)
{
    if (use_x2apic) {
        wrmsr(X2APIC_ICR, icr_low);         /* destination (edx) ignored */
        return;
    }
    wr32(xapic_base + 0x310, 0);
    wr32(xapic_base + 0x300, icr_low);
    for (int i = 0; i < 100000 && (rd32(xapic_base + 0x300) & (1u << 12)); i++)
        ;                                   /* delivery status pending */
}

/* ----------------------------------------------------------------- cmdline */

/* value of "smp_wait=<decimal>" on the command line, or DEFAULT_WAIT */
static u64 wait_budget(u64 bp)
{
    static const char key[] = "smp_wait=";
    u64 s = rd32(bp + BP_CMD_LINE_PTR);
    if (!s)
        return DEFAULT_WAIT;
    for (u32 i = 0; i < 4096 && rd8(s + i); i++) {
        if (i && rd8(s + i - 1) != ' ')
            continue;
        u32 k = 0;
        while (key[k] && rd8(s + i + k) == (u8)key[k])
            k++;
        if (key[k])
            continue;
        u64 v = 0;
        for (u64 q = s + i + k; rd8(q) >= '0' && rd8(q) <= '9'; q++)
            v = v * 10 + (rd8(q) - '0');
        return v ? v : DEFAULT_WAIT;
    }
    return DEFAULT_WAIT;
}

/* -------------------------------------------------------------------- main */

static int all_arrived(u32 expected)
{
    if (rd32(AP_COUNT) < expected)
        return 0;
    for (u32 i = 0; i < expected && i < AP_SLOTS_MAX; i++)
        if (!(rd16(AP_SLOTS + 2 * i) & 0x100))
            return 0;
    return 1;
}

void guest_main(void *boot_params)
{
    struct mpinfo mi;
    u32 ncpus = 1;

    if (parse_mptable(&mi) == 0) {
        print("mptable: cpus=");
        print_dec(mi.cpus);
        print_char('\n');
        print("mptable: bsp=");
        if (mi.bsp >= 0)
            print_dec((u64)mi.bsp);
        else
            print("none");
        print_char('\n');
        if (mi.cpus > 0)
            ncpus = mi.cpus;
    }

    u32 my_id = apic_init();
    print("cpu: apic_id=");
    print_dec(my_id);
    print(" bsp\n");

    u32 expected = ncpus - 1;
    if (expected) {
        memcpy((void *)TRAMP_PHYS, tramp_start, (size_t)(tramp_end - tramp_start));
        wr32(AP_COUNT, 0);
        for (u32 i = 0; i < AP_SLOTS_MAX; i++)
            wr16(AP_SLOTS + 2 * i, 0);
        barrier();

        u32 sipi = ICR_SIPI | (u32)(TRAMP_PHYS >> 12);
        send_ipi(ICR_INIT);
        delay(10000);
        send_ipi(sipi);
        delay(2000);
        send_ipi(sipi);

        u64 budget = wait_budget((u64)boot_params);
        for (u64 i = 0; i < budget && !all_arrived(expected); i++)
            barrier();
    }

    u32 arrived = expected ? rd32(AP_COUNT) : 0;
    if (arrived > AP_SLOTS_MAX)
        arrived = AP_SLOTS_MAX;
    u32 up = 1;
    for (u32 i = 0; i < arrived; i++) {
        u16 s = rd16(AP_SLOTS + 2 * i);
        print("cpu: apic_id=");
        if (s & 0x100) {
            print_dec(s & 0xff);
            up++;
        } else {
            print("? (slot not written)");
        }
        print_char('\n');
    }

    print("smp: ");
    print_dec(up);
    print(" of ");
    print_dec(ncpus);
    print(" cpus up\n");
    reset();
}
