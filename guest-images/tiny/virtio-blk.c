/* virtio-blk: minimal virtio-mmio (MMIO version 2, virtio 1.x) block driver.
 *
 * Finds the device from "virtio_mmio.device=<size>@<base>:<irq>" on the
 * kernel command line (as Linux does), brings it up (virtio 1.x §3.1.1,
 * §4.2.3), sets up queue 0 with 8 entries in our own .bss, and runs
 * read / write / flush / read-back / get-id / out-of-range requests, polling
 * the used ring with interrupts disabled. */
#include "tiny.h"

/* virtio-mmio registers (offsets from the device base) */
#define VM_MAGIC          0x000     /* "virt" */
#define VM_VERSION        0x004
#define VM_DEVICE_ID      0x008
#define VM_DEV_FEATURES   0x010
#define VM_DEV_FEAT_SEL   0x014
#define VM_DRV_FEATURES   0x020
#define VM_DRV_FEAT_SEL   0x024
#define VM_QUEUE_SEL      0x030
#define VM_QUEUE_NUM_MAX  0x034
#define VM_QUEUE_NUM      0x038
#define VM_QUEUE_READY    0x044
#define VM_QUEUE_NOTIFY   0x050
#define VM_INT_STATUS     0x060
#define VM_INT_ACK        0x064
#define VM_STATUS         0x070
#define VM_QUEUE_DESC     0x080     /* low, high at +4 */
#define VM_QUEUE_DRIVER   0x090     /* avail ring */
#define VM_QUEUE_DEVICE   0x0a0     /* used ring */
#define VM_CONFIG_GEN     0x0fc
#define VM_CONFIG         0x100     /* virtio_blk_config: u64 capacity first */

#define VIRTIO_MAGIC      0x74726976
#define VIRTIO_ID_BLOCK   2

/* device status bits */
#define ST_ACKNOWLEDGE    1
#define ST_DRIVER         2
#define ST_DRIVER_OK      4
#define ST_FEATURES_OK    8
#define ST_FAILED         0x80

#define F_BLK_FLUSH       (1UL << 9)
#define F_VERSION_1       (1UL << 32)

/* split virtqueue */
#define QSIZE             8
#define DESC_F_NEXT       1
#define DESC_F_WRITE      2     /* device writes this buffer */

#define BLK_T_IN          0
#define BLK_T_OUT         1
#define BLK_T_FLUSH       4
#define BLK_T_GET_ID      8
#define SECTOR_SIZE       512
#define ID_BYTES          20

/* Each poll also reads InterruptStatus (one VM exit), so this bound is a
 * few seconds on hardware and under the instruction emulator alike. */
#define POLL_MAX          500000

#define CMDLINE_MAX       4096

/* volatile access to a plain object (ring fields the device writes) */
#define VOL(x) (*(volatile __typeof__(x) *)&(x))

struct vring_desc  { u64 addr; u32 len; u16 flags; u16 next; };
struct vring_avail { u16 flags; u16 idx; u16 ring[QSIZE]; u16 used_event; };
struct vring_used_elem { u32 id; u32 len; };
struct vring_used  { u16 flags; u16 idx; struct vring_used_elem ring[QSIZE]; u16 avail_event; };

/* Queue 0, in one page of our own .bss. */
static struct {
    struct vring_desc desc[QSIZE];                          /* 16-byte aligned */
    struct vring_avail avail;                               /* 2-byte aligned */
    struct vring_used used __attribute__((aligned(4)));     /* 4-byte aligned */
} vq __attribute__((aligned(4096)));

static struct { u32 type; u32 reserved; u64 sector; } req_hdr __attribute__((aligned(16)));
static u8 req_status;
static u8 rbuf[SECTOR_SIZE] __attribute__((aligned(16)));
static u8 wbuf[SECTOR_SIZE] __attribute__((aligned(16)));
static u8 idbuf[ID_BYTES] __attribute__((aligned(16)));
static char cmdline[CMDLINE_MAX + 1];

static u64 base;                /* MMIO base of the device */
static u16 avail_idx;           /* our copy of avail->idx */
static u16 used_seen;           /* used->idx we have consumed up to */

static u32 mr(u32 off) { return rd32(base + off); }
static void mw(u32 off, u32 v) { wr32(base + off, v); }

static void print_hex_short(u64 v)     /* lowercase hex, no leading zeros */
{
    static const char digits[] = "0123456789abcdef";
    int shift = 60;
    while (shift > 0 && !((v >> shift) & 0xf))
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        print_char(digits[(v >> shift) & 0xf]);
}

static __attribute__((noreturn)) void fail(const char *what)
{
    print("virtio-blk: FAIL ");
    print(what);
    print_char('\n');
    reset();
}

/* Device-side failure: name the step and the device status, set FAILED. */
static __attribute__((noreturn)) void fail_status(const char *what, u32 status)
{
    print("virtio-blk: FAIL ");
    print(what);
    print(", status ");
    print_dec(status);
    print_char('\n');
    mw(VM_STATUS, status | ST_FAILED);
    reset();
}

/* ---- command line: virtio_mmio.device=<size>@<base>:<irq>[:<id>] ---- */

/* Number with optional 0x prefix (hex) else decimal; NULL if no digits. */
static const char *parse_num(const char *s, u64 *out)
{
    u64 v = 0;
    u32 radix = 10, ndigits = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        radix = 16;
        s += 2;
    }
    for (;; s++, ndigits++) {
        char c = *s;
        u32 d;
        if (c >= '0' && c <= '9')
            d = (u32)(c - '0');
        else if (radix == 16 && c >= 'a' && c <= 'f')
            d = (u32)(c - 'a' + 10);
        else if (radix == 16 && c >= 'A' && c <= 'F')
            d = (u32)(c - 'A' + 10);
        else
            break;
        v = v * radix + d;
    }
    *out = v;
    return ndigits ? s : 0;
}

static void read_cmdline(u64 bp)
{
    u64 ptr = rd32(bp + BP_CMD_LINE_PTR);
    u32 size = rd32(bp + BP_CMDLINE_SIZE);
    if (size == 0 || size > CMDLINE_MAX)
        size = CMDLINE_MAX;
    for (u32 i = 0; ptr && i < size; i++) {
        cmdline[i] = (char)rd8(ptr + i);
        if (!cmdline[i])
            break;
    }
}

/* Returns 1 and fills *base_out / *irq_out from the first token. */
static int find_device(u64 *base_out, u64 *irq_out)
{
    static const char key[] = "virtio_mmio.device=";
    size_t klen = sizeof(key) - 1;
    const char *s = cmdline;

    for (;;) {
        while (*s == ' ' || *s == '\t')
            s++;
        if (!*s)
            return 0;
        if (memcmp(s, key, klen) == 0)
            break;
        while (*s && *s != ' ' && *s != '\t')
            s++;
    }
    s += klen;

    u64 size;
    s = parse_num(s, &size);
    if (!s)
        return -1;
    if (*s == 'K' || *s == 'k' || *s == 'M' || *s == 'm' || *s == 'G' || *s == 'g')
        s++;                    /* size itself is not needed */
    if (*s++ != '@' || !(s = parse_num(s, base_out)) || *s++ != ':' || !parse_num(s, irq_out))
        return -1;
    return 1;
}

/* ---- virtqueue requests ---- */

static void set_desc(int i, void *buf, u32 len, u16 flags)
{
    vq.desc[i].addr = (u64)buf;
    vq.desc[i].len = len;
    vq.desc[i].flags = flags | DESC_F_NEXT;
    vq.desc[i].next = (u16)(i + 1);
}

/* One request: header, optional data buffer, status byte (descriptors 0..2,
 * head 0). Returns the status byte the device wrote (0xff if it did not). */
static u8 blk_request(const char *op, u32 type, u64 sector, void *data, u32 len, int device_writes)
{
    int n = 0;

    req_hdr.type = type;
    req_hdr.reserved = 0;
    req_hdr.sector = sector;
    req_status = 0xff;

    set_desc(n++, &req_hdr, sizeof(req_hdr), 0);
    if (len)
        set_desc(n++, data, len, device_writes ? DESC_F_WRITE : 0);
    set_desc(n++, &req_status, 1, DESC_F_WRITE);
    vq.desc[n - 1].flags = DESC_F_WRITE;        /* end of chain */
    vq.desc[n - 1].next = 0;

    vq.avail.ring[avail_idx % QSIZE] = 0;       /* chain head */
    barrier();                                  /* ring + descriptors before idx */
    VOL(vq.avail.idx) = ++avail_idx;
    barrier();
    mw(VM_QUEUE_NOTIFY, 0);

    for (u32 i = 0; i < POLL_MAX && VOL(vq.used.idx) == used_seen; i++)
        (void)mr(VM_INT_STATUS);
    if (VOL(vq.used.idx) == used_seen) {
        print("virtio-blk: FAIL timeout waiting for ");
        print(op);
        print_char('\n');
        reset();
    }
    barrier();                                  /* used->idx before the data */
    u32 id = VOL(vq.used.ring[used_seen % QSIZE].id);
    used_seen++;
    mw(VM_INT_ACK, mr(VM_INT_STATUS));
    if (id != 0) {
        print("virtio-blk: FAIL used ring id ");
        print_dec(id);
        print(" for ");
        print(op);
        print_char('\n');
        reset();
    }
    return VOL(req_status);
}

static void print_status(const char *what, u8 status)
{
    print("virtio-blk: ");
    print(what);
    print(" status ");
    print_dec(status);
    print_char('\n');
}

/* ---- device bring-up ---- */

static u64 init_device(void)
{
    u32 v = mr(VM_MAGIC);
    if (v != VIRTIO_MAGIC) {
        print("virtio-blk: FAIL bad magic 0x");
        print_hex_short(v);
        print_char('\n');
        reset();
    }
    if ((v = mr(VM_VERSION)) != 2) {
        print("virtio-blk: FAIL mmio version ");
        print_dec(v);
        print_char('\n');
        reset();
    }
    if ((v = mr(VM_DEVICE_ID)) != VIRTIO_ID_BLOCK) {
        print("virtio-blk: FAIL device id ");
        print_dec(v);
        print_char('\n');
        reset();
    }

    mw(VM_STATUS, 0);
    for (u32 i = 0; i < 1000 && (v = mr(VM_STATUS)) != 0; i++)
        ;
    if (v != 0)
        fail_status("reset", v);
    mw(VM_STATUS, ST_ACKNOWLEDGE);
    mw(VM_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);

    mw(VM_DEV_FEAT_SEL, 0);
    u64 features = mr(VM_DEV_FEATURES);
    mw(VM_DEV_FEAT_SEL, 1);
    features |= (u64)mr(VM_DEV_FEATURES) << 32;
    if (!(features & F_VERSION_1))
        fail_status("device does not offer VIRTIO_F_VERSION_1", mr(VM_STATUS));
    features &= F_VERSION_1 | F_BLK_FLUSH;
    mw(VM_DRV_FEAT_SEL, 0);
    mw(VM_DRV_FEATURES, (u32)features);
    mw(VM_DRV_FEAT_SEL, 1);
    mw(VM_DRV_FEATURES, (u32)(features >> 32));

    mw(VM_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
    v = mr(VM_STATUS);
    if (!(v & ST_FEATURES_OK))
        fail_status("FEATURES_OK not accepted", v);

    mw(VM_QUEUE_SEL, 0);
    if (mr(VM_QUEUE_READY) != 0)
        fail_status("queue 0 already ready", mr(VM_STATUS));
    u32 qmax = mr(VM_QUEUE_NUM_MAX);
    if (qmax < QSIZE) {
        print("virtio-blk: FAIL queue 0 QueueNumMax ");
        print_dec(qmax);
        print_char('\n');
        reset();
    }
    mw(VM_QUEUE_NUM, QSIZE);
    mw(VM_QUEUE_DESC, (u32)(u64)&vq.desc);
    mw(VM_QUEUE_DESC + 4, (u32)((u64)&vq.desc >> 32));
    mw(VM_QUEUE_DRIVER, (u32)(u64)&vq.avail);
    mw(VM_QUEUE_DRIVER + 4, (u32)((u64)&vq.avail >> 32));
    mw(VM_QUEUE_DEVICE, (u32)(u64)&vq.used);
    mw(VM_QUEUE_DEVICE + 4, (u32)((u64)&vq.used >> 32));
    mw(VM_QUEUE_READY, 1);

    mw(VM_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    v = mr(VM_STATUS);
    if (v != (ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK))
        fail_status("DRIVER_OK", v);
    return features;
}

/* capacity (512-byte sectors): two 32-bit reads, retried if the config
 * generation changed in between */
static u64 read_capacity(void)
{
    u32 gen, lo, hi, tries = 0;
    do {
        gen = mr(VM_CONFIG_GEN);
        lo = mr(VM_CONFIG);
        hi = mr(VM_CONFIG + 4);
    } while (gen != mr(VM_CONFIG_GEN) && ++tries < 10);
    return ((u64)hi << 32) | lo;
}

void guest_main(void *boot_params)
{
    static const char pattern[] = "rvmm-tiny-write!";     /* 16 bytes */
    u64 irq;

    read_cmdline((u64)boot_params);
    int found = find_device(&base, &irq);
    if (found == 0)
        fail("no virtio_mmio.device= on the command line");
    if (found < 0)
        fail("cannot parse virtio_mmio.device= (want <size>@<base>:<irq>)");
    print("virtio-blk: device at 0x");
    print_hex_short(base);
    print(" irq ");
    print_dec(irq);
    print_char('\n');

    u64 features = init_device();
    u64 capacity = read_capacity();
    print("virtio-blk: capacity ");
    print_dec(capacity);
    print(" sectors\n");
    print("virtio-blk: features ok\n");

    /* 1. read sector 0 */
    u8 st = blk_request("read", BLK_T_IN, 0, rbuf, SECTOR_SIZE, 1);
    print("virtio-blk: sector0 ");
    for (int i = 0; i < 16; i++)
        print_hex8(rbuf[i]);
    print_char('\n');
    print_status("read", st);

    /* 2. write the pattern to sector 1 */
    for (int i = 0; i < SECTOR_SIZE; i++)
        wbuf[i] = (u8)pattern[i % 16];
    print_status("write", blk_request("write", BLK_T_OUT, 1, wbuf, SECTOR_SIZE, 0));

    /* 3. flush (only if negotiated) */
    if (features & F_BLK_FLUSH)
        print_status("flush", blk_request("flush", BLK_T_FLUSH, 0, 0, 0, 0));
    else
        print("virtio-blk: flush not offered\n");

    /* 4. read sector 1 back */
    memset(rbuf, 0, SECTOR_SIZE);
    st = blk_request("readback", BLK_T_IN, 1, rbuf, SECTOR_SIZE, 1);
    if (st == 0 && memcmp(rbuf, wbuf, SECTOR_SIZE) == 0)
        print("virtio-blk: readback ok\n");
    else
        print("virtio-blk: readback FAIL\n");

    /* 5. device id */
    st = blk_request("get-id", BLK_T_GET_ID, 0, idbuf, ID_BYTES, 1);
    print("virtio-blk: id ");
    for (int i = 0; i < ID_BYTES && idbuf[i]; i++)
        print_char(idbuf[i] >= 0x20 && idbuf[i] < 0x7f ? (char)idbuf[i] : '?');
    print_char('\n');
    if (st != 0)
        print_status("id", st);

    /* 6. one sector past the end must fail (VIRTIO_BLK_S_IOERR = 1) */
    st = blk_request("out-of-range write", BLK_T_OUT, capacity, wbuf, SECTOR_SIZE, 0);
    print_status("out-of-range write", st);

    mw(VM_STATUS, 0);
    print("virtio-blk: done\n");
    reset();
}
