/* virtio-blk: minimal virtio-mmio (MMIO version 2, virtio 1.x) block driver.
 *
 * Finds the device from the first "virtio_mmio.device=<size>@<base>:<irq>"
 * token on the kernel command line whose device is a block device (as Linux
 * does, see virtio.c), brings it up (virtio 1.x §3.1.1,
 * §4.2.3), sets up queue 0 with 8 entries in our own .bss, and runs
 * read / write / flush / read-back / get-id / out-of-range requests, polling
 * the used ring with interrupts disabled. */
#include "virtio.h"

#define F_BLK_FLUSH       (1UL << 9)

#define BLK_T_IN          0
#define BLK_T_OUT         1
#define BLK_T_FLUSH       4
#define BLK_T_GET_ID      8
#define SECTOR_SIZE       512
#define ID_BYTES          20

static struct virtq vq;         /* queue 0 */

static struct { u32 type; u32 reserved; u64 sector; } req_hdr __attribute__((aligned(16)));
static u8 req_status;
static u8 rbuf[SECTOR_SIZE] __attribute__((aligned(16)));
static u8 wbuf[SECTOR_SIZE] __attribute__((aligned(16)));
static u8 idbuf[ID_BYTES] __attribute__((aligned(16)));

/* One request: header, optional data buffer, status byte (descriptors 0..2,
 * head 0). Returns the status byte the device wrote (0xff if it did not). */
static u8 blk_request(const char *op, u32 type, u64 sector, void *data, u32 len, int device_writes)
{
    int n = 0;
    u32 id, used_len;

    req_hdr.type = type;
    req_hdr.reserved = 0;
    req_hdr.sector = sector;
    req_status = 0xff;

    vq_set_desc(&vq, n, &req_hdr, sizeof(req_hdr), 0, n + 1);
    n++;
    if (len) {
        vq_set_desc(&vq, n, data, len, device_writes ? DESC_F_WRITE : 0, n + 1);
        n++;
    }
    vq_set_desc(&vq, n, &req_status, 1, DESC_F_WRITE, -1);     /* end of chain */

    vq_push(&vq, 0);                            /* chain head */
    vq_kick(&vq);

    for (u32 i = 0; i < POLL_MAX && VOL(vq.used.idx) == vq.used_seen; i++)
        (void)mr(VM_INT_STATUS);
    if (!vq_pop(&vq, &id, &used_len)) {
        print("virtio-blk: FAIL timeout waiting for ");
        print(op);
        print_char('\n');
        reset();
    }
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
    u64 features = virtio_negotiate(F_BLK_FLUSH);
    virtio_setup_queue(0, &vq);
    virtio_driver_ok();
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

    virtio_name = "virtio-blk";
    read_cmdline((u64)boot_params);
    virtio_find(VIRTIO_ID_BLOCK, &irq);
    print("virtio-blk: device at 0x");
    print_hex_short(virtio_base);
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

    /* rvmm.hold=1: stop here, before any flush, and idle until the VMM ends the VM (the
     * shutdown tests check that this unflushed write still reaches the disk file). */
    if (cmdline_value("rvmm.hold=")) {
        print("virtio-blk: holding\n");
        for (u64 n = 0;; n++) {
            print("virtio-blk: tick ");
            print_dec(n);
            print_char('\n');
            delay(20000);
        }
    }

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
