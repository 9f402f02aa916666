/* Minimal virtio-mmio (MMIO version 2, virtio 1.x) driver core shared by the
 * virtio tiny guests (virtio 1.x §3.1.1, §4.2.3). Only aligned 32-bit MMIO
 * accesses to the registers; polling only, interrupts stay disabled. */
#include "virtio.h"

#define CMDLINE_MAX       4096

const char *virtio_name = "virtio";
const char *virtio_step;
u64 virtio_base;
char cmdline[CMDLINE_MAX + 1];

void print_hex_short(u64 v)
{
    static const char digits[] = "0123456789abcdef";
    int shift = 60;
    while (shift > 0 && !((v >> shift) & 0xf))
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        print_char(digits[(v >> shift) & 0xf]);
}

void virtio_fail_begin(void)
{
    print(virtio_name);
    print(": FAIL ");
    if (virtio_step) {
        print(virtio_step);
        print(": ");
    }
}

void virtio_fail(const char *what)
{
    virtio_fail_begin();
    print(what);
    print_char('\n');
    reset();
}

void virtio_fail_status(const char *what, u32 status)
{
    virtio_fail_begin();
    print(what);
    print(", status ");
    print_dec(status);
    print_char('\n');
    mw(VM_STATUS, status | ST_FAILED);
    reset();
}

static __attribute__((noreturn)) void fail_num(const char *what, u64 v, int hex)
{
    virtio_fail_begin();
    print(what);
    if (hex) {
        print("0x");
        print_hex_short(v);
    } else {
        print_dec(v);
    }
    print_char('\n');
    reset();
}

/* ---- command line ---- */

void read_cmdline(u64 bp)
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

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n'; }

/* Start of the token after `s` that begins with key, or NULL. */
static const char *next_token(const char *s, const char *key)
{
    size_t klen = strlen(key);
    for (;;) {
        while (is_space(*s))
            s++;
        if (!*s)
            return 0;
        if (memcmp(s, key, klen) == 0)
            return s;
        while (*s && !is_space(*s))
            s++;
    }
}

const char *cmdline_value(const char *key)
{
    const char *s = next_token(cmdline, key);
    return s ? s + strlen(key) : 0;
}

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

/* <size>@<base>:<irq>[:<id>] -> base, irq; 0 if it does not parse */
static int parse_device(const char *s, u64 *base_out, u64 *irq_out)
{
    u64 size;
    s = parse_num(s, &size);
    if (!s)
        return 0;
    if (*s == 'K' || *s == 'k' || *s == 'M' || *s == 'm' || *s == 'G' || *s == 'g')
        s++;                    /* size itself is not needed */
    if (*s++ != '@' || !(s = parse_num(s, base_out)) || *s++ != ':' || !parse_num(s, irq_out))
        return 0;
    return 1;
}

void virtio_find(u32 want_id, u64 *irq)
{
    static const char key[] = "virtio_mmio.device=";
    const char *s = cmdline;
    u32 ntokens = 0, first_why = 0, first_val = 0;
    u64 base, dirq;

    while ((s = next_token(s, key)) != 0) {
        s += sizeof(key) - 1;
        if (!parse_device(s, &base, &dirq))
            virtio_fail("cannot parse virtio_mmio.device= (want <size>@<base>:<irq>)");
        u32 why = 0, v = rd32(base + VM_MAGIC);
        if (v != VIRTIO_MAGIC)
            why = 1;
        else if ((v = rd32(base + VM_VERSION)) != 2)
            why = 2;
        else if ((v = rd32(base + VM_DEVICE_ID)) != want_id)
            why = 3;
        if (!why) {
            virtio_base = base;
            *irq = dirq;
            return;
        }
        if (ntokens++ == 0) {
            first_why = why;
            first_val = v;
        }
    }
    if (ntokens == 0)
        virtio_fail("no virtio_mmio.device= on the command line");
    if (ntokens > 1)
        fail_num("no virtio_mmio.device= token for device id ", want_id, 0);
    if (first_why == 1)
        fail_num("bad magic ", first_val, 1);
    if (first_why == 2)
        fail_num("mmio version ", first_val, 0);
    fail_num("device id ", first_val, 0);
}

/* ---- bring-up ---- */

u64 virtio_negotiate(u64 wanted)
{
    u32 v;
    mw(VM_STATUS, 0);
    for (u32 i = 0; i < 1000 && (v = mr(VM_STATUS)) != 0; i++)
        ;
    if (v != 0)
        virtio_fail_status("reset", v);
    mw(VM_STATUS, ST_ACKNOWLEDGE);
    mw(VM_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);

    mw(VM_DEV_FEAT_SEL, 0);
    u64 features = mr(VM_DEV_FEATURES);
    mw(VM_DEV_FEAT_SEL, 1);
    features |= (u64)mr(VM_DEV_FEATURES) << 32;
    if (!(features & F_VERSION_1))
        virtio_fail_status("device does not offer VIRTIO_F_VERSION_1", mr(VM_STATUS));
    features &= F_VERSION_1 | wanted;
    mw(VM_DRV_FEAT_SEL, 0);
    mw(VM_DRV_FEATURES, (u32)features);
    mw(VM_DRV_FEAT_SEL, 1);
    mw(VM_DRV_FEATURES, (u32)(features >> 32));

    mw(VM_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
    v = mr(VM_STATUS);
    if (!(v & ST_FEATURES_OK))
        virtio_fail_status("FEATURES_OK not accepted", v);
    return features;
}

void virtio_setup_queue(u32 index, struct virtq *q)
{
    q->index = (u16)index;
    mw(VM_QUEUE_SEL, index);
    if (mr(VM_QUEUE_READY) != 0) {
        virtio_fail_begin();
        print("queue ");
        print_dec(index);
        print(" already ready, status ");
        u32 st = mr(VM_STATUS);
        print_dec(st);
        print_char('\n');
        mw(VM_STATUS, st | ST_FAILED);
        reset();
    }
    u32 qmax = mr(VM_QUEUE_NUM_MAX);
    if (qmax < QSIZE) {
        virtio_fail_begin();
        print("queue ");
        print_dec(index);
        print(" QueueNumMax ");
        print_dec(qmax);
        print_char('\n');
        reset();
    }
    mw(VM_QUEUE_NUM, QSIZE);
    mw(VM_QUEUE_DESC, (u32)(u64)&q->desc);
    mw(VM_QUEUE_DESC + 4, (u32)((u64)&q->desc >> 32));
    mw(VM_QUEUE_DRIVER, (u32)(u64)&q->avail);
    mw(VM_QUEUE_DRIVER + 4, (u32)((u64)&q->avail >> 32));
    mw(VM_QUEUE_DEVICE, (u32)(u64)&q->used);
    mw(VM_QUEUE_DEVICE + 4, (u32)((u64)&q->used >> 32));
    mw(VM_QUEUE_READY, 1);
}

void virtio_driver_ok(void)
{
    mw(VM_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    u32 v = mr(VM_STATUS);
    if (v != (ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK))
        virtio_fail_status("DRIVER_OK", v);
}

/* ---- virtqueues ---- */

void vq_set_desc(struct virtq *q, int i, const void *buf, u32 len, u16 flags, int next)
{
    q->desc[i].addr = (u64)buf;
    q->desc[i].len = len;
    q->desc[i].flags = next >= 0 ? (u16)(flags | DESC_F_NEXT) : flags;
    q->desc[i].next = next >= 0 ? (u16)next : 0;
}

void vq_push(struct virtq *q, u16 head)
{
    q->avail.ring[q->avail_idx % QSIZE] = head;
    barrier();                                  /* ring + descriptors before idx */
    VOL(q->avail.idx) = ++q->avail_idx;
    barrier();
}

int vq_pop(struct virtq *q, u32 *id, u32 *len)
{
    if (VOL(q->used.idx) == q->used_seen)
        return 0;
    barrier();                                  /* used->idx before the element */
    struct vring_used_elem *e = &q->used.ring[q->used_seen % QSIZE];
    *id = VOL(e->id);
    *len = VOL(e->len);
    q->used_seen++;
    return 1;
}

void virtio_ack_irq(void)
{
    u32 isr = mr(VM_INT_STATUS);
    if (isr)
        mw(VM_INT_ACK, isr);
}
