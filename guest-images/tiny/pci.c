/* pci: probe rvmm's PCI root complex and drive a virtio-rng over virtio-pci,
 * polling only (IF stays 0): configuration space through 0xCF8/0xCFC and
 * ECAM, BAR sizing, the capability list, feature negotiation and a queue
 * through the common configuration, a request notified through the notify
 * BAR (a KVM ioeventfd) with INTx (ISR), then with MSI-X (the vector shows up
 * pending in the local APIC's IRR: KVM's MSI route and irqfd delivered it),
 * masking (pending bit, delivered on unmask), a device reset and re-init;
 * then malformed accesses of every kind, after which the device must still
 * work. See README.md for the lines it prints.
 *
 * pci.beat=1 instead keeps the device in use for snapshot and migration tests:
 * after the probe it moves BAR 0, enables MSI-X and ACPI's power button
 * event, and beats, each beat an entropy request whose MSI-X interrupt must
 * reach the local APIC on a vector of its own, until the power button. */
#include "tiny.h"
#include "virtio.h"

#define CONFIG_ADDRESS  0xcf8
#define CONFIG_DATA     0xcfc
#define ECAM_BASE       0xe0000000UL
#define WINDOW_UNUSED   0xc0100000UL    /* in the 32-bit PCI window, past every BAR */
#define OUTSIDE_WINDOWS 0xf0000000UL

#define VENDOR_VIRTIO   0x1af4
#define DEVICE_RNG      0x1044

#define CMD_MEMORY      0x0002
#define CMD_MASTER      0x0004
#define CAP_MSIX        0x11
#define CAP_VENDOR      0x09
#define MSIX_ENABLE     0x8000
#define MSIX_MASKALL    0x4000

/* virtio_pci_common_cfg */
#define CC_DFSELECT     0x00
#define CC_DF           0x04
#define CC_GFSELECT     0x08
#define CC_GF           0x0c
#define CC_MSIX_CONFIG  0x10
#define CC_NUM_QUEUES   0x12
#define CC_STATUS       0x14
#define CC_Q_SELECT     0x16
#define CC_Q_SIZE       0x18
#define CC_Q_MSIX       0x1a
#define CC_Q_ENABLE     0x1c
#define CC_Q_NOTIFY_OFF 0x1e
#define CC_Q_DESC       0x20
#define CC_Q_DRIVER     0x28
#define CC_Q_DEVICE     0x30
#define NO_VECTOR       0xffff

#define MSR_APIC_BASE   0x1b
#define X2APIC_SVR      0x80f
#define X2APIC_IRR      0x820
#define VECTOR_A        0x41
#define VECTOR_B        0x42
#define VECTOR_BEAT     0x50            /* beat n raises 0x50 + n */
#define BEATS           0xa0            /* up to vector 0xef */
#define BAR_MOVED       0xc0010000UL    /* in the 32-bit window, away from firmware's choice */

#define PM1_STS         0x600
#define PM1_EN          0x602
#define PWRBTN          0x0100

static u32 dev;                 /* slot of the virtio-rng function */
static u64 bar;                 /* its BAR 0 */
static u64 common, isr, notify, msix_table, msix_pba;
static u32 notify_mult, msix_cap;
static struct virtq q;
static u8 entropy[16];

/* ---------------------------------------------------------- configuration */

static void cfg_select(u32 slot, u32 reg) { outl(CONFIG_ADDRESS, 0x80000000u | slot << 11 | (reg & 0xfc)); }
static u32 cfg_read32(u32 slot, u32 reg) { cfg_select(slot, reg); return inl(CONFIG_DATA); }
static u16 cfg_read16(u32 slot, u32 reg) { cfg_select(slot, reg); return inw(CONFIG_DATA + (reg & 2)); }
static u8 cfg_read8(u32 slot, u32 reg) { cfg_select(slot, reg); return inb(CONFIG_DATA + (reg & 3)); }
static void cfg_write32(u32 slot, u32 reg, u32 v) { cfg_select(slot, reg); outl(CONFIG_DATA, v); }
static void cfg_write16(u32 slot, u32 reg, u16 v) { cfg_select(slot, reg); outw(CONFIG_DATA + (reg & 2), v); }
static u32 ecam_read32(u32 slot, u32 reg) { return rd32(ECAM_BASE + ((u64)slot << 15) + reg); }

__attribute__((noreturn)) static void fail(const char *what, u64 v)
{
    print("pci: FAIL ");
    print(what);
    print(" 0x");
    print_hex_short(v);
    print_char('\n');
    reset();
}

static void expect(int ok, const char *what, u64 v)
{
    if (!ok)
        fail(what, v);
}

static void probe(void)
{
    u32 id = cfg_read32(0, 0);
    expect(id == 0x00081b36, "host bridge id", id);
    expect(cfg_read32(0, 0x08) >> 8 == 0x060000, "host bridge class", cfg_read32(0, 0x08));
    print("pci: host bridge 1b36:0008 class 060000\n");
    dev = 0;
    for (u32 slot = 1; slot < 32; slot++) {
        id = cfg_read32(slot, 0);
        if (id == 0xffffffff)
            continue;
        print("pci: 00:");
        print_hex8((u8)slot);
        print(".0 ");
        print_hex_short(id & 0xffff);
        print_char(':');
        print_hex_short(id >> 16);
        print(" class ");
        print_hex_short(cfg_read32(slot, 0x08) >> 8);
        print_char('\n');
        if (ecam_read32(slot, 0) != id || ecam_read32(slot, 0x08) != cfg_read32(slot, 0x08))
            fail("ecam differs from cf8 at slot", slot);
        if (id == (DEVICE_RNG << 16 | VENDOR_VIRTIO))
            dev = slot;
    }
    expect(dev != 0, "no virtio-rng function, slots scanned", 31);
    /* Other buses and functions are empty. */
    outl(CONFIG_ADDRESS, 0x80010000u);
    expect(inl(CONFIG_DATA) == 0xffffffff, "bus 1 answers", inl(CONFIG_DATA));
    print("pci: ecam matches cf8\n");
}

/* Sizes BAR 0 the way Linux does: decoding off, all ones, read, restore. */
static void size_bar(void)
{
    u32 lo = cfg_read32(dev, 0x10), hi = cfg_read32(dev, 0x14);
    expect((lo & 0xf) == 0x4, "BAR 0 is not 64-bit memory", lo);
    cfg_write16(dev, 0x04, 0);
    cfg_write32(dev, 0x10, 0xffffffff);
    cfg_write32(dev, 0x14, 0xffffffff);
    u32 mask_lo = cfg_read32(dev, 0x10), mask_hi = cfg_read32(dev, 0x14);
    cfg_write32(dev, 0x10, lo);
    cfg_write32(dev, 0x14, hi);
    expect(mask_hi == 0xffffffff, "BAR 0 size above 4 GiB", mask_hi);
    u32 size = ~(mask_lo & ~0xfu) + 1;
    print("pci: bar0 size 0x");
    print_hex_short(size);
    print(" 64-bit\n");
    bar = (u64)hi << 32 | (lo & ~0xfu);
    expect(bar < (4UL << 30), "BAR 0 above the identity map", bar);
}

static void find_capabilities(void)
{
    u32 found = 0;
    for (u32 ptr = cfg_read8(dev, 0x34); ptr; ptr = cfg_read8(dev, ptr + 1)) {
        u8 id = cfg_read8(dev, ptr);
        if (id == CAP_MSIX) {
            msix_cap = ptr;
            u32 table = cfg_read32(dev, ptr + 4), pba = cfg_read32(dev, ptr + 8);
            msix_table = bar + (table & ~7u);
            msix_pba = bar + (pba & ~7u);
            print("pci: msix table size ");
            print_dec((cfg_read16(dev, ptr + 2) & 0x7ff) + 1u);
            print(" at bar offset 0x");
            print_hex_short(table & ~7u);
            print_char('\n');
            continue;
        }
        if (id != CAP_VENDOR)
            continue;
        u8 type = cfg_read8(dev, ptr + 3);
        u64 where = bar + cfg_read32(dev, ptr + 8);
        found |= 1u << type;
        if (type == 1)
            common = where;
        else if (type == 2) {
            notify = where;
            notify_mult = cfg_read32(dev, ptr + 16);
        } else if (type == 3)
            isr = where;
    }
    expect(msix_cap != 0, "no MSI-X capability", 0);
    expect((found & 0x3e) == 0x3e, "virtio capabilities found", found);
    print("pci: virtio capabilities common notify isr device pci-cfg\n");
}

/* ----------------------------------------------------------------- virtio */

static void status(u8 v) { wr8(common + CC_STATUS, v); }

static void bring_up(void)
{
    status(0);
    for (u32 i = 0; i < 1000 && rd8(common + CC_STATUS) != 0; i++)
        ;
    expect(rd8(common + CC_STATUS) == 0, "reset, status", rd8(common + CC_STATUS));
    status(ST_ACKNOWLEDGE);
    status(ST_ACKNOWLEDGE | ST_DRIVER);
    wr32(common + CC_DFSELECT, 1);
    expect(rd32(common + CC_DF) & 1, "no VIRTIO_F_VERSION_1", rd32(common + CC_DF));
    wr32(common + CC_GFSELECT, 0);
    wr32(common + CC_GF, 0);
    wr32(common + CC_GFSELECT, 1);
    wr32(common + CC_GF, 1);
    status(ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
    expect(rd8(common + CC_STATUS) & ST_FEATURES_OK, "FEATURES_OK, status", rd8(common + CC_STATUS));
    expect(rd16(common + CC_NUM_QUEUES) == 1, "num_queues", rd16(common + CC_NUM_QUEUES));
    memset(&q, 0, sizeof(q));
    wr16(common + CC_Q_SELECT, 0);
    expect(rd16(common + CC_Q_SIZE) >= QSIZE, "queue size", rd16(common + CC_Q_SIZE));
    wr16(common + CC_Q_SIZE, QSIZE);
    wr16(common + CC_Q_MSIX, 0);
    wr16(common + CC_MSIX_CONFIG, NO_VECTOR);
    wr32(common + CC_Q_DESC, (u32)(u64)&q.desc);
    wr32(common + CC_Q_DESC + 4, 0);
    wr32(common + CC_Q_DRIVER, (u32)(u64)&q.avail);
    wr32(common + CC_Q_DRIVER + 4, 0);
    wr32(common + CC_Q_DEVICE, (u32)(u64)&q.used);
    wr32(common + CC_Q_DEVICE + 4, 0);
    wr16(common + CC_Q_ENABLE, 1);
    status(ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    u8 st = rd8(common + CC_STATUS);
    expect(st == (ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK), "DRIVER_OK, status", st);
}

/* One entropy request, notified through the notify BAR; polls the used ring. */
static void request(void)
{
    memset(entropy, 0, sizeof(entropy));
    vq_set_desc(&q, 0, entropy, sizeof(entropy), DESC_F_WRITE, -1);
    vq_push(&q, 0);
    wr16(notify + rd16(common + CC_Q_NOTIFY_OFF) * notify_mult, 0);
    u32 id, len;
    for (u32 i = 0; i < POLL_MAX; i++) {
        if (vq_pop(&q, &id, &len)) {
            expect(id == 0 && len == sizeof(entropy), "used element", (u64)id << 32 | len);
            return;
        }
    }
    fail("timeout waiting for entropy, status", rd8(common + CC_STATUS));
}

/* ----------------------------------------------------------------- MSI-X */

static void apic_enable(void)
{
    u32 a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    expect(c & (1u << 21), "no x2APIC", c);
    wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | 0xc00);
    wrmsr(X2APIC_SVR, rdmsr(X2APIC_SVR) | 0x1ff);
}

static int irr(u32 vector)
{
    return (rdmsr(X2APIC_IRR + vector / 32) >> (vector % 32)) & 1;
}

/* The device's worker raises the interrupt just after the used ring update the
 * guest polls for: give it a bounded moment. */
static int wait_irr(u32 vector)
{
    for (u32 i = 0; i < POLL_MAX; i++)
        if (irr(vector))
            return 1;
    return 0;
}

static u8 wait_isr(void)
{
    u8 v = 0;
    for (u32 i = 0; i < POLL_MAX && v == 0; i++)
        v = rd8(isr);
    return v;
}

static u32 wait_pending(void)
{
    u32 v = 0;
    for (u32 i = 0; i < POLL_MAX && v == 0; i++)
        v = rd32(msix_pba) & 1;
    return v;
}

static void msix_entry(u32 vector, u32 data, u32 masked)
{
    u64 e = msix_table + vector * 16;
    wr32(e, 0xfee00000u);      /* local APIC 0, physical */
    wr32(e + 4, 0);
    wr32(e + 8, data);         /* fixed delivery, edge */
    wr32(e + 12, masked);
}

static void msix(void)
{
    apic_enable();
    expect(!irr(VECTOR_A) && !irr(VECTOR_B), "vectors pending before the test", 0);
    msix_entry(0, VECTOR_A, 0);
    cfg_write16(dev, msix_cap + 2, MSIX_ENABLE);
    request();
    expect(wait_irr(VECTOR_A), "MSI-X vector not pending in the local APIC, IRR", rdmsr(X2APIC_IRR + 2));
    expect(rd8(isr) == 0, "ISR set with MSI-X", 0);
    print("pci: msix vector 0x41 pending in the local APIC\n");
    /* Masked: nothing delivered, the pending bit set; unmasked: delivered. */
    msix_entry(0, VECTOR_B, 1);
    request();
    expect(wait_pending(), "pending bit", rd32(msix_pba));
    expect(!irr(VECTOR_B), "masked vector delivered", 0);
    wr32(msix_table + 12, 0);
    expect(wait_irr(VECTOR_B), "pending vector not delivered on unmask", rdmsr(X2APIC_IRR + 2));
    expect((rd32(msix_pba) & 1) == 0, "pending bit after unmask", rd32(msix_pba));
    print("pci: masked vector pending, delivered on unmask\n");
    cfg_write16(dev, msix_cap + 2, 0);
}

/* ------------------------------------------------------------- malformed */

/* Each access rvmm must count and ignore; the counts are in README.md. */
static void malformed(void)
{
    /* Configuration: a dword across the data port, an unaligned ECAM word,
     * a write to a function that does not exist. */
    cfg_select(dev, 0);
    (void)inl(CONFIG_DATA + 1);
    (void)rd16(ECAM_BASE + ((u64)dev << 15) + 1);
    cfg_write32(20, 0x04, 0xffffffff);
    /* BAR: past the registers, a read-only field written, a field at the
     * wrong width, window space no BAR decodes. */
    (void)rd32(bar + 0x7000);
    wr16(common + CC_NUM_QUEUES, 7);
    (void)rd32(common + CC_STATUS);
    (void)rd32(WINDOW_UNUSED);
    /* MSI-X: a byte of the table, a write to the pending bits. */
    wr8(msix_table + 1, 0xff);
    wr32(msix_pba, 0xffffffff);
    /* A BAR moved out of the windows decodes nowhere: the access is counted
     * as window space without a BAR; moved back, it works again. */
    cfg_write32(dev, 0x10, (u32)OUTSIDE_WINDOWS);
    (void)rd8(common + CC_STATUS);
    cfg_write32(dev, 0x10, (u32)bar);
    expect(rd16(common + CC_NUM_QUEUES) == 1, "num_queues after the malformed accesses", rd16(common + CC_NUM_QUEUES));
    expect(cfg_read32(dev, 0) == (DEVICE_RNG << 16 | VENDOR_VIRTIO), "id after the malformed accesses", cfg_read32(dev, 0));
}

/* ------------------------------------------------------------------ beat */

static u64 beat_delay(void)
{
    const char *s = cmdline_value("pci.delay=");
    u64 v = 0;
    for (; s && *s >= '0' && *s <= '9'; s++)
        v = v * 10 + (u64)(*s - '0');
    return v ? v : 500000;
}

/* The table entry of a beat's vector is written right after the previous beat,
 * so the beat after a restore or migration raises the vector through the route
 * and irqfd as they were saved; the request's notification reaches the device
 * at the moved BAR. The power button (PM1_EN kept across the snapshot) ends it. */
__attribute__((noreturn)) static void beat(void)
{
    u64 pause = beat_delay();
    cfg_write16(dev, 0x04, 0);
    cfg_write32(dev, 0x10, (u32)BAR_MOVED);
    cfg_write32(dev, 0x14, 0);
    cfg_write16(dev, 0x04, CMD_MEMORY | CMD_MASTER);
    common += BAR_MOVED - bar;
    isr += BAR_MOVED - bar;
    notify += BAR_MOVED - bar;
    msix_table += BAR_MOVED - bar;
    msix_pba += BAR_MOVED - bar;
    bar = BAR_MOVED;
    bring_up();
    apic_enable();
    msix_entry(0, VECTOR_BEAT, 0);
    cfg_write16(dev, msix_cap + 2, MSIX_ENABLE);
    outw(PM1_EN, PWRBTN);
    print("pci: beating\n");
    for (u32 n = 0; n < BEATS; n++) {
        request();
        expect(wait_irr(VECTOR_BEAT + n), "beat vector not in the local APIC, beat", n);
        print("pci: beat ");
        print_dec(n);
        print_char('\n');
        if (n + 1 < BEATS)
            msix_entry(0, VECTOR_BEAT + n + 1, 0);
        for (u64 i = 0; i < pause; i += 10000) {
            if (inw(PM1_STS) & PWRBTN) {
                print("pci: power button\n");
                reset();
            }
            delay(10000);
        }
    }
    print("pci: out of vectors\n");
    halt_forever();
}

void guest_main(void *boot_params)
{
    read_cmdline((u64)boot_params);
    virtio_name = "pci";
    probe();
    size_bar();
    find_capabilities();
    cfg_write16(dev, 0x04, CMD_MEMORY | CMD_MASTER);
    if (cmdline_value("pci.beat="))
        beat();

    bring_up();
    request();
    u8 status_isr = wait_isr();
    expect(status_isr == 1, "ISR after a request without MSI-X", status_isr);
    expect(rd8(isr) == 0, "ISR not cleared by reading it", 0);
    print("pci: entropy through intx, isr 0x1\n");

    msix();

    bring_up();
    request();
    print("pci: reset and brought up again\n");

    malformed();
    bring_up();
    request();
    print("pci: survived malformed accesses\n");
    print("pci: done\n");
    if (cmdline_value("pci.hold="))
        halt_forever();
    reset();
}
