/* virtio-net: minimal virtio-mmio (MMIO version 2, virtio 1.x) network
 * driver that checks the device end to end against a peer (the host's tap):
 * ARP for the peer, then one ICMP echo request / reply.
 *
 * Our address and the peer's come from "rvmm.ip=<a.b.c.d>" and
 * "rvmm.peer=<a.b.c.d>" on the kernel command line; the device from the
 * first "virtio_mmio.device=" token whose device is a network device.
 * Features: VIRTIO_F_VERSION_1 and VIRTIO_NET_F_MAC only (no offloads, no
 * mergeable rx buffers), so every packet carries a 12-byte virtio_net_hdr_v1
 * and every rx buffer (2 KiB) holds a whole frame. Polling only. */
#include "virtio.h"

#define F_NET_MAC         (1UL << 5)

#define NET_HDR_LEN       12        /* virtio_net_hdr_v1 */
#define BUF_SIZE          2048
#define ETH_HLEN          14
#define ETH_P_IP          0x0800
#define ETH_P_ARP         0x0806
#define ARP_LEN           28
#define ETH_MIN_FRAME     60        /* without FCS; shorter frames are padded */

#define PING_ID           0x1234
#define PING_SEQ          1
#define PING_PAYLOAD      "rvmm-tiny-ping-payload-0123456!!"   /* 32 bytes */
#define PING_PAYLOAD_LEN  32

static struct virtq rxq;        /* queue 0 */
static struct virtq txq;        /* queue 1 */
static u8 rxbuf[QSIZE][BUF_SIZE] __attribute__((aligned(4096)));
static u8 txhdr[NET_HDR_LEN] __attribute__((aligned(16)));
static u8 txbuf[BUF_SIZE] __attribute__((aligned(16)));

static u8 my_mac[6], peer_mac[6];
static u8 my_ip[4], peer_ip[4];

/* what the rx path has seen */
static int got_arp_reply, got_ping_reply;
static u32 arp_requests_answered, frames_ignored;

/* ---- printing ---- */

static void print_ip(const u8 *ip)
{
    for (int i = 0; i < 4; i++) {
        if (i)
            print_char('.');
        print_dec(ip[i]);
    }
}

static void print_mac(const u8 *mac)
{
    for (int i = 0; i < 6; i++) {
        if (i)
            print_char(':');
        print_hex8(mac[i]);
    }
}

static __attribute__((noreturn)) void fail_step(const char *step, const char *what)
{
    virtio_step = step;
    virtio_fail(what);
}

/* ---- byte order and checksums ---- */

static u16 get16(const u8 *p) { return (u16)((p[0] << 8) | p[1]); }
static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }

/* Internet checksum (RFC 1071) of len bytes; 0 when a packet that includes
 * its own checksum field is intact. */
static u16 inet_csum(const u8 *p, u32 len)
{
    u32 sum = 0;
    for (u32 i = 0; i + 1 < len; i += 2)
        sum += get16(p + i);
    if (len & 1)
        sum += (u32)p[len - 1] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

/* ---- command line: rvmm.ip= / rvmm.peer= ---- */

/* a.b.c.d ending at a space, tab or NUL; 1 on success */
static int parse_ip(const char *s, u8 *ip)
{
    if (!s)
        return 0;
    for (int i = 0; i < 4; i++) {
        u32 v = 0, nd = 0;
        while (*s >= '0' && *s <= '9' && nd < 4) {
            v = v * 10 + (u32)(*s++ - '0');
            nd++;
        }
        if (nd == 0 || v > 255)
            return 0;
        ip[i] = (u8)v;
        if (i < 3 && *s++ != '.')
            return 0;
    }
    return *s == 0 || *s == ' ' || *s == '\t' || *s == '\n';
}

/* ---- transmit: header and frame in one or two descriptors, head 0 ---- */

static void send_frame(const char *what, u32 len, int split)
{
    u32 id, used_len;

    memset(txhdr, 0, NET_HDR_LEN);
    if (len < ETH_MIN_FRAME) {
        memset(txbuf + NET_HDR_LEN + len, 0, ETH_MIN_FRAME - len);
        len = ETH_MIN_FRAME;
    }
    if (split) {
        vq_set_desc(&txq, 0, txhdr, NET_HDR_LEN, 0, 1);
        vq_set_desc(&txq, 1, txbuf + NET_HDR_LEN, len, 0, -1);
    } else {
        memset(txbuf, 0, NET_HDR_LEN);          /* header right before the frame */
        vq_set_desc(&txq, 0, txbuf, NET_HDR_LEN + len, 0, -1);
    }
    vq_push(&txq, 0);
    vq_kick(&txq);

    u32 i;
    for (i = 0; i < POLL_MAX && !vq_pop(&txq, &id, &used_len); i++)
        virtio_ack_irq();
    if (i == POLL_MAX) {
        virtio_fail_begin();
        print("tx timeout sending ");
        print(what);
        print_char('\n');
        reset();
    }
    if (id != 0) {
        virtio_fail_begin();
        print("tx used ring id ");
        print_dec(id);
        print(" sending ");
        print(what);
        print_char('\n');
        reset();
    }
}

/* Ethernet header into txbuf (after the virtio-net header); returns a
 * pointer to the payload. */
static u8 *eth_header(const u8 *dst, u16 type)
{
    u8 *f = txbuf + NET_HDR_LEN;
    memcpy(f, dst, 6);
    memcpy(f + 6, my_mac, 6);
    put16(f + 12, type);
    return f + ETH_HLEN;
}

static void send_arp(u16 op, const u8 *eth_dst, const u8 *tha, const u8 *tpa)
{
    u8 *a = eth_header(eth_dst, ETH_P_ARP);
    put16(a, 1);                    /* htype Ethernet */
    put16(a + 2, ETH_P_IP);         /* ptype */
    a[4] = 6;
    a[5] = 4;
    put16(a + 6, op);
    memcpy(a + 8, my_mac, 6);       /* sender */
    memcpy(a + 14, my_ip, 4);
    memcpy(a + 18, tha, 6);         /* target */
    memcpy(a + 24, tpa, 4);
    send_frame(op == 1 ? "arp request" : "arp reply", ETH_HLEN + ARP_LEN, 1);
}

static void send_ping(void)
{
    static const char payload[] = PING_PAYLOAD;
    u8 *ip = eth_header(peer_mac, ETH_P_IP);
    u8 *icmp = ip + 20;

    ip[0] = 0x45;                   /* IPv4, 20-byte header */
    ip[1] = 0;
    put16(ip + 2, 20 + 8 + PING_PAYLOAD_LEN);
    put16(ip + 4, 1);               /* identification */
    put16(ip + 6, 0x4000);          /* DF */
    ip[8] = 64;                     /* TTL */
    ip[9] = 1;                      /* ICMP */
    put16(ip + 10, 0);
    memcpy(ip + 12, my_ip, 4);
    memcpy(ip + 16, peer_ip, 4);
    put16(ip + 10, inet_csum(ip, 20));

    icmp[0] = 8;                    /* echo request */
    icmp[1] = 0;
    put16(icmp + 2, 0);
    put16(icmp + 4, PING_ID);
    put16(icmp + 6, PING_SEQ);
    memcpy(icmp + 8, payload, PING_PAYLOAD_LEN);
    put16(icmp + 2, inet_csum(icmp, 8 + PING_PAYLOAD_LEN));

    send_frame("echo request", ETH_HLEN + 20 + 8 + PING_PAYLOAD_LEN, 0);
}

/* ---- receive ---- */

static void rx_arp(const u8 *a, u32 len)
{
    static const u8 arp_hdr[6] = { 0, 1, 8, 0, 6, 4 };
    if (len < ARP_LEN || memcmp(a, arp_hdr, 6) != 0) {
        frames_ignored++;
        return;
    }
    u16 op = get16(a + 6);
    if (op == 1 && memcmp(a + 24, my_ip, 4) == 0) {
        /* who-has <our ip>: answer, the peer may need it for its reply */
        u8 sha[6], spa[4];
        memcpy(sha, a + 8, 6);
        memcpy(spa, a + 14, 4);
        send_arp(2, sha, sha, spa);
        arp_requests_answered++;
    } else if (op == 2 && memcmp(a + 14, peer_ip, 4) == 0) {
        memcpy(peer_mac, a + 8, 6);
        got_arp_reply = 1;
    } else {
        frames_ignored++;
    }
}

static void rx_ipv4(const u8 *ip, u32 len)
{
    static const char payload[] = PING_PAYLOAD;
    u32 ihl = (u32)(ip[0] & 0xf) * 4;
    if (len < 20 || (ip[0] >> 4) != 4 || ihl < 20 || len < ihl + 8 || ip[9] != 1 ||
        memcmp(ip + 12, peer_ip, 4) != 0 || memcmp(ip + 16, my_ip, 4) != 0) {
        frames_ignored++;
        return;
    }
    u32 tot = get16(ip + 2);
    const u8 *icmp = ip + ihl;
    if (tot > len || tot < ihl + 8 || icmp[0] != 0 ||
        get16(icmp + 4) != PING_ID || get16(icmp + 6) != PING_SEQ) {
        frames_ignored++;
        return;
    }
    /* our echo reply: check it in full */
    if (inet_csum(ip, ihl) != 0)
        fail_step("ping", "echo reply has a bad IP header checksum");
    if (inet_csum(icmp, tot - ihl) != 0)
        fail_step("ping", "echo reply has a bad ICMP checksum");
    if (tot - ihl != 8 + PING_PAYLOAD_LEN || memcmp(icmp + 8, payload, PING_PAYLOAD_LEN) != 0)
        fail_step("ping", "echo reply payload differs from the request's");
    got_ping_reply = 1;
}

static void rx_frame(const u8 *f, u32 len)
{
    if (len < ETH_HLEN) {
        frames_ignored++;
        return;
    }
    u16 type = get16(f + 12);
    if (type == ETH_P_ARP)
        rx_arp(f + ETH_HLEN, len - ETH_HLEN);
    else if (type == ETH_P_IP)
        rx_ipv4(f + ETH_HLEN, len - ETH_HLEN);
    else
        frames_ignored++;       /* IPv6 router solicitations etc. */
}

/* One poll: read and ack InterruptStatus, handle every used rx buffer and
 * post it again. */
static void rx_poll(void)
{
    u32 id, len, reposted = 0;

    virtio_ack_irq();
    while (vq_pop(&rxq, &id, &len)) {
        if (id >= QSIZE) {
            virtio_fail_begin();
            print("rx used ring id ");
            print_dec(id);
            print_char('\n');
            reset();
        }
        if (len > BUF_SIZE) {
            virtio_fail_begin();
            print("rx used length ");
            print_dec(len);
            print(" > buffer size\n");
            reset();
        }
        if (len >= NET_HDR_LEN)
            rx_frame(rxbuf[id] + NET_HDR_LEN, len - NET_HDR_LEN);
        else
            frames_ignored++;
        vq_push(&rxq, (u16)id);  /* descriptor id still points at rxbuf[id] */
        reposted++;
    }
    if (reposted)
        vq_kick(&rxq);
}

static void wait_for(int *flag, const char *what)
{
    for (u32 i = 0; i < POLL_MAX; i++) {
        rx_poll();
        if (VOL(*flag))
            return;
    }
    virtio_fail_begin();
    print("timeout waiting for ");
    print(what);
    print(" (ignored ");
    print_dec(frames_ignored);
    print(" frames, answered ");
    print_dec(arp_requests_answered);
    print(" arp requests)\n");
    mw(VM_STATUS, 0);
    reset();
}

/* ---- device bring-up ---- */

static void init_device(void)
{
    virtio_step = "init";
    u64 features = virtio_negotiate(F_NET_MAC);
    if (!(features & F_NET_MAC))
        virtio_fail_status("device does not offer VIRTIO_NET_F_MAC", mr(VM_STATUS));

    /* MAC: 8-bit config reads, retried if the config generation changed */
    u32 gen, tries = 0;
    do {
        gen = mr(VM_CONFIG_GEN);
        for (int i = 0; i < 6; i++)
            my_mac[i] = rd8(virtio_base + VM_CONFIG + (u32)i);
    } while (gen != mr(VM_CONFIG_GEN) && ++tries < 10);
    print("virtio-net: mac ");
    print_mac(my_mac);
    print_char('\n');

    /* rx: every descriptor one device-writable 2 KiB buffer, all posted */
    for (int i = 0; i < QSIZE; i++) {
        vq_set_desc(&rxq, i, rxbuf[i], BUF_SIZE, DESC_F_WRITE, -1);
        rxq.avail.ring[i] = (u16)i;
    }
    barrier();
    rxq.avail_idx = QSIZE;
    VOL(rxq.avail.idx) = QSIZE;
    barrier();

    virtio_setup_queue(0, &rxq);
    virtio_setup_queue(1, &txq);
    virtio_driver_ok();
    vq_kick(&rxq);
}

void guest_main(void *boot_params)
{
    static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    static const u8 zero_mac[6];
    u64 irq;

    virtio_name = "virtio-net";
    read_cmdline((u64)boot_params);
    if (!parse_ip(cmdline_value("rvmm.ip="), my_ip))
        fail_step("cmdline", "need rvmm.ip=<a.b.c.d> (our address) on the command line");
    if (!parse_ip(cmdline_value("rvmm.peer="), peer_ip))
        fail_step("cmdline", "need rvmm.peer=<a.b.c.d> (the host's address) on the command line");

    virtio_step = "device";
    virtio_find(VIRTIO_ID_NET, &irq);
    print("virtio-net: device at 0x");
    print_hex_short(virtio_base);
    print(" irq ");
    print_dec(irq);
    print_char('\n');

    init_device();

    virtio_step = "arp";
    send_arp(1, bcast, zero_mac, peer_ip);
    wait_for(&got_arp_reply, "the arp reply");
    print("virtio-net: arp reply from ");
    print_ip(peer_ip);
    print(" is ");
    print_mac(peer_mac);
    print_char('\n');

    virtio_step = "ping";
    send_ping();
    wait_for(&got_ping_reply, "the echo reply");
    print("virtio-net: ping reply from ");
    print_ip(peer_ip);
    print(" seq 1 ok\n");

    mw(VM_STATUS, 0);
    print("virtio-net: done\n");
    reset();
}
