/* Minimal virtio-mmio (MMIO version 2, virtio 1.x) driver core shared by the
 * virtio tiny guests: kernel command line parsing, device discovery from
 * "virtio_mmio.device=" tokens, bring-up and split virtqueues (polling only). */
#ifndef VIRTIO_H
#define VIRTIO_H

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
#define VM_CONFIG         0x100     /* device-specific config space */

#define VIRTIO_MAGIC      0x74726976
#define VIRTIO_ID_NET     1
#define VIRTIO_ID_BLOCK   2

/* device status bits */
#define ST_ACKNOWLEDGE    1
#define ST_DRIVER         2
#define ST_DRIVER_OK      4
#define ST_FEATURES_OK    8
#define ST_FAILED         0x80

#define F_VERSION_1       (1UL << 32)

/* split virtqueue, always 8 entries */
#define QSIZE             8
#define DESC_F_NEXT       1
#define DESC_F_WRITE      2     /* device writes this buffer */

/* Each poll also reads InterruptStatus (one VM exit), so this bound is a
 * few seconds on hardware and about 10 s under the instruction emulator. */
#define POLL_MAX          500000

/* volatile access to a plain object (ring fields the device writes) */
#define VOL(x) (*(volatile __typeof__(x) *)&(x))

struct vring_desc  { u64 addr; u32 len; u16 flags; u16 next; };
struct vring_avail { u16 flags; u16 idx; u16 ring[QSIZE]; u16 used_event; };
struct vring_used_elem { u32 id; u32 len; };
struct vring_used  { u16 flags; u16 idx; struct vring_used_elem ring[QSIZE]; u16 avail_event; };

/* One queue: rings in one 4 KiB-aligned page, driver state after them. */
struct virtq {
    struct vring_desc desc[QSIZE];                          /* 16-byte aligned */
    struct vring_avail avail;                               /* 2-byte aligned */
    struct vring_used used __attribute__((aligned(4)));     /* 4-byte aligned */
    u16 avail_idx;              /* our copy of avail->idx */
    u16 used_seen;              /* used->idx we have consumed up to */
    u16 index;                  /* queue number */
} __attribute__((aligned(4096)));

/* Set by the guest before anything else: message prefix ("virtio-blk"), and
 * optionally the current step, printed as "<name>: FAIL <step>: <what>". */
extern const char *virtio_name;
extern const char *virtio_step;
extern u64 virtio_base;         /* MMIO base of the device in use */
extern char cmdline[];

static inline u32 mr(u32 off) { return rd32(virtio_base + off); }
static inline void mw(u32 off, u32 v) { wr32(virtio_base + off, v); }

void print_hex_short(u64 v);    /* lowercase hex, no leading zeros */
__attribute__((noreturn)) void virtio_fail(const char *what);
/* Device-side failure: name the step and the device status, set FAILED. */
__attribute__((noreturn)) void virtio_fail_status(const char *what, u32 status);
/* "<name>: FAIL [<step>: ]" without a newline; finish the line and reset() */
void virtio_fail_begin(void);

/* Copy the kernel command line from boot_params into cmdline[]. */
void read_cmdline(u64 boot_params);
/* Value of the first "<key>" token (key includes the '='), NULL if none;
 * the value ends at a space, tab or NUL. */
const char *cmdline_value(const char *key);

/* Find the first virtio_mmio.device=<size>@<base>:<irq>[:<id>] token whose
 * device has magic "virt", version 2 and DeviceID want_id; sets virtio_base
 * and *irq. Fails (via virtio_fail) if there is none; the message then
 * describes the first token's device. */
void virtio_find(u32 want_id, u64 *irq);

/* Reset, ACKNOWLEDGE, DRIVER, negotiate (VERSION_1 required, plus the
 * `wanted` bits the device offers), FEATURES_OK. Returns the features. */
u64 virtio_negotiate(u64 wanted);
/* Check QueueNumMax >= QSIZE, program queue `index` with q's rings, QueueReady. */
void virtio_setup_queue(u32 index, struct virtq *q);
void virtio_driver_ok(void);

/* Virtqueue operations */
void vq_set_desc(struct virtq *q, int i, const void *buf, u32 len, u16 flags, int next);
void vq_push(struct virtq *q, u16 head);            /* make chain `head` available */
static inline void vq_kick(struct virtq *q) { mw(VM_QUEUE_NOTIFY, q->index); }
/* Consume one used element if there is one: 1 and *id / *len, else 0. */
int vq_pop(struct virtq *q, u32 *id, u32 *len);
/* Read InterruptStatus and acknowledge whatever it shows. */
void virtio_ack_irq(void);

#endif
