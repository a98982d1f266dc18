/* wiretun.wireguard._wgcrypto: WireGuard transport packets in batches, with the GIL released.
 *
 * The cipher is OpenSSL's (libcrypto) ChaCha20-Poly1305; nothing here is a cipher of its own. What this
 * module adds is the batch around it, so that Python pays once per super-packet or UDP train instead of
 * once per packet:
 *
 *   seal_super(key, receiver, counter, header, packet, mtu) -> (train, count, datagram_size)
 *       one TUN read of an offload session (virtio-net header + IP packet, possibly a TCP/UDP
 *       super-packet) cut into wire packets exactly as wiretun.offload.split does, each padded as
 *       WireGuard pads (to 16, never past the MTU) and sealed as a transport message (type 4,
 *       receiver index, counter, counters consecutive from `counter`), laid end to end in one bytes
 *       object: a UDP GSO train whose datagrams are all `datagram_size` bytes but the last.
 *   open_train(key, receiver, data, segment, ring, last, limit, out, udp) -> tuple
 *       the transport messages for `receiver` at the front of a UDP GRO train (datagrams of `segment`
 *       bytes, the last may be shorter) opened, checked against the replay window (`ring`, one byte per
 *       counter, and `last`, as wiretun.wireguard.replay.ReplayFilter keeps them), validated as IP and
 *       coalesced into TCP (and with `udp`, UDP) super-packets written to `out`.
 *
 * wiretun.wireguard.batch has the pure-Python twins with the same results; tests compare the two.
 * Callers serialise calls that share a replay window (the device holds its core lock).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#define VNET_HDR_LEN 10
#define F_NEEDS_CSUM 0x01
#define GSO_NONE 0x00
#define GSO_TCPV4 0x01
#define GSO_UDP 0x03
#define GSO_TCPV6 0x04
#define GSO_UDP_L4 0x05
#define GSO_ECN 0x80
#define PROTO_TCP 6
#define PROTO_UDP 17
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_CWR 0x80
#define MAX_SUPER 0xFFFF
#define MAX_SEGMENTS 64
#define HEADER_LEN 16
#define TAG_LEN 16
#define MIN_MESSAGE 32
#define RING_BITS 8192
#define WINDOW_SIZE (RING_BITS - 64)

static inline uint16_t get16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t get32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

/* One's-complement sum of big-endian 16-bit words (an odd last byte is a high byte), unfolded. */
static uint64_t sum16(const uint8_t *p, size_t n, uint64_t acc) {
    size_t i = 0;
    for (; i + 1 < n; i += 2)
        acc += (uint32_t)((p[i] << 8) | p[i + 1]);
    if (i < n)
        acc += (uint32_t)p[i] << 8;
    return acc;
}

static inline uint32_t fold(uint64_t s) {
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return (uint32_t)s;
}

/* The stored Internet checksum: complement of the folded sum; 0 becomes 0xFFFF (as offload.py does). */
static inline uint32_t finish(uint64_t s) {
    uint32_t v = ~fold(s) & 0xFFFF;
    return v ? v : 0xFFFF;
}

/* WireGuard's padding (wireguard-go's calculatePaddingSize), as core.py computes it. */
static inline size_t padded_len(size_t n, size_t mtu) {
    size_t last, padded;
    if (mtu == 0)
        return (n + 15) & ~(size_t)15;
    last = n > mtu ? n % mtu : n;
    padded = (last + 15) & ~(size_t)15;
    if (padded > mtu)
        padded = mtu;
    return n - last + padded;
}

typedef struct {
    uint8_t flags, gso_type;
    uint16_t hdr_len, gso_size, csum_start, csum_offset;
} vnet_hdr;

/* ------------------------------------------------------------------------------------------ seal */

typedef struct {
    size_t count, ip_len, hdr_len;
    int is_v4, is_tcp;
} layout;

/* Mirrors offload._layout: NULL when fine, else the reason (InvalidData in Python). */
static const char *check_layout(const vnet_hdr *h, const uint8_t *pkt, size_t n, layout *out) {
    int gso = h->gso_type & ~GSO_ECN, version, proto;
    size_t cs = h->csum_start, l4, data;
    if (gso == GSO_UDP)
        return "legacy UFO super-packets (gso_type 3) are not supported";
    if (gso != GSO_TCPV4 && gso != GSO_TCPV6 && gso != GSO_UDP_L4)
        return "unknown gso_type";
    if (!(h->flags & F_NEEDS_CSUM))
        return "GSO super-packet without NEEDS_CSUM";
    if (h->gso_size == 0)
        return "GSO super-packet with gso_size 0";
    if (n == 0)
        return "empty GSO super-packet";
    version = pkt[0] >> 4;
    if (version == 4) {
        size_t ihl;
        if (gso == GSO_TCPV6)
            return "gso_type TCPV6 on an IPv4 packet";
        if (n < 20)
            return "IPv4 super-packet shorter than its header";
        ihl = (size_t)(pkt[0] & 0x0F) * 4;
        if (ihl < 20 || cs != ihl)
            return "csum_start does not match the IPv4 header length";
        proto = pkt[9];
    } else if (version == 6) {
        if (gso == GSO_TCPV4)
            return "gso_type TCPV4 on an IPv6 packet";
        if (n < 40)
            return "IPv6 super-packet shorter than its header";
        if (cs < 40)
            return "csum_start inside the IPv6 header";
        proto = cs == 40 ? pkt[6] : -1;
    } else {
        return "IP version in a GSO super-packet is not 4 or 6";
    }
    out->is_tcp = gso != GSO_UDP_L4;
    if (proto != -1 && proto != (out->is_tcp ? PROTO_TCP : PROTO_UDP))
        return "gso_type does not match the packet's protocol";
    if (out->is_tcp) {
        if (h->csum_offset != 16)
            return "csum_offset is not the TCP checksum's 16";
        if (cs + 20 > n)
            return "TCP header overruns the packet";
        l4 = (size_t)(pkt[cs + 12] >> 4) * 4;
        if (l4 < 20)
            return "TCP data offset below 20";
    } else {
        if (h->csum_offset != 6)
            return "csum_offset is not the UDP checksum's 6";
        l4 = 8;
    }
    if (cs + l4 > n)
        return "headers overrun the packet";
    data = n - cs - l4;
    out->count = data ? (data + h->gso_size - 1) / h->gso_size : 1;
    out->ip_len = cs;
    out->hdr_len = cs + l4;
    out->is_v4 = version == 4;
    return NULL;
}

/* Seal `len` bytes of plaintext already at dgram + 16 (padding included) in place, header in front. */
static int seal_one(EVP_CIPHER_CTX *ctx, uint8_t *dgram, size_t len, uint32_t receiver, uint64_t counter) {
    uint8_t nonce[12];
    int outl = 0, fin = 0, i;
    dgram[0] = 4; dgram[1] = dgram[2] = dgram[3] = 0;
    for (i = 0; i < 4; i++) dgram[4 + i] = (uint8_t)(receiver >> (8 * i));
    for (i = 0; i < 8; i++) dgram[8 + i] = (uint8_t)(counter >> (8 * i));
    memset(nonce, 0, 4);
    memcpy(nonce + 4, dgram + 8, 8);
    if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1)
        return -1;
    if (len && EVP_EncryptUpdate(ctx, dgram + HEADER_LEN, &outl, dgram + HEADER_LEN, (int)len) != 1)
        return -1;
    if (EVP_EncryptFinal_ex(ctx, dgram + HEADER_LEN + outl, &fin) != 1)
        return -1;
    return EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, dgram + HEADER_LEN + len) == 1 ? 0 : -1;
}

static int parse_header(Py_buffer *hb, vnet_hdr *h) {
    const uint8_t *p = hb->buf;
    if (hb->len != VNET_HDR_LEN) {
        PyErr_Format(PyExc_ValueError, "virtio-net header must be %d bytes, not %zd", VNET_HDR_LEN, hb->len);
        return -1;
    }
    h->flags = p[0];
    h->gso_type = p[1];
    memcpy(&h->hdr_len, p + 2, 2);  /* native order, as TUN writes it */
    memcpy(&h->gso_size, p + 4, 2);
    memcpy(&h->csum_start, p + 6, 2);
    memcpy(&h->csum_offset, p + 8, 2);
    return 0;
}

static EVP_CIPHER_CTX *new_ctx(const uint8_t *key, int encrypt) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return NULL;
    if (EVP_CipherInit_ex(ctx, EVP_chacha20_poly1305(), NULL, key, NULL, encrypt) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

/* Cut the packet (per its header) into wire packets at dst + i * stride + 16, pad each, seal each. */
static int seal_segments(EVP_CIPHER_CTX *ctx, const vnet_hdr *h, const layout *lay, const uint8_t *pkt,
                         size_t n, size_t mtu, uint32_t receiver, uint64_t counter, uint8_t *dst,
                         size_t stride) {
    size_t i, start = lay->hdr_len, cs = lay->ip_len, hlen = lay->hdr_len, gso = h->gso_size;
    size_t csum_at = cs + (lay->is_tcp ? 16 : 6);
    uint64_t addr = lay->is_v4 ? sum16(pkt + 12, 8, 0) : sum16(pkt + 8, 32, 0);
    uint32_t ip_id0 = lay->is_v4 ? get16(pkt + 4) : 0, seq0 = lay->is_tcp ? get32(pkt + cs + 4) : 0;
    uint8_t flags0 = lay->is_tcp ? pkt[cs + 13] : 0;
    addr += lay->is_tcp ? PROTO_TCP : PROTO_UDP;
    for (i = 0; i < lay->count; i++) {
        size_t end = start + gso < n ? start + gso : n, size = hlen + (end - start), l4_len = size - cs, plen;
        uint8_t *seg = dst + i * stride + HEADER_LEN;
        memcpy(seg, pkt, hlen);
        memcpy(seg + hlen, pkt + start, end - start);
        seg[csum_at] = seg[csum_at + 1] = 0;
        if (lay->is_v4) {
            put16(seg + 2, (uint32_t)size);
            put16(seg + 4, (ip_id0 + (uint32_t)i) & 0xFFFF);
            seg[10] = seg[11] = 0;
            put16(seg + 10, ~fold(sum16(seg, cs, 0)) & 0xFFFF);
        } else {
            put16(seg + 4, (uint32_t)(size - 40));
        }
        if (lay->is_tcp) {
            uint8_t flags = flags0;
            put32(seg + cs + 4, seq0 + (uint32_t)(i * gso));
            if (i != lay->count - 1)
                flags &= ~(TCP_FIN | TCP_PSH);
            if (i != 0)
                flags &= ~TCP_CWR;
            seg[cs + 13] = flags;
        } else {
            put16(seg + cs + 4, (uint32_t)l4_len);
        }
        put16(seg + csum_at, finish(sum16(seg + cs, l4_len, addr + l4_len)));
        plen = padded_len(size, mtu);
        memset(seg + size, 0, plen - size);
        if (seal_one(ctx, seg - HEADER_LEN, plen, receiver, counter + i) < 0)
            return -1;
        start = end;
    }
    return 0;
}

static PyObject *seal_super(PyObject *self, PyObject *args) {
    Py_buffer kb, hb, pb;
    unsigned long receiver;
    unsigned long long counter;
    Py_ssize_t mtu;
    vnet_hdr h;
    layout lay = {0, 0, 0, 0, 0};
    const char *why = NULL;
    PyObject *train = NULL;
    size_t n, first_len, first_dg, last_dg, total;
    EVP_CIPHER_CTX *ctx = NULL;
    int failed = 0;

    if (!PyArg_ParseTuple(args, "y*kKy*y*n", &kb, &receiver, &counter, &hb, &pb, &mtu))
        return NULL;
    if (kb.len != 32) {
        PyErr_SetString(PyExc_ValueError, "key must be 32 bytes");
        goto done;
    }
    if (mtu < 0 || mtu > 65535) {
        PyErr_Format(PyExc_ValueError, "mtu %zd is outside 0..65535", mtu);
        goto done;
    }
    if (parse_header(&hb, &h) < 0)
        goto done;
    n = (size_t)pb.len;
    if (n == 0 || n > MAX_SUPER) {
        PyErr_Format(PyExc_ValueError, "packet of %zu bytes is outside 1..65535", n);
        goto done;
    }
    if ((h.gso_type & ~GSO_ECN) == GSO_NONE) {
        lay.count = 1;
        lay.ip_len = lay.hdr_len = 0;
        if (h.flags & F_NEEDS_CSUM && (size_t)h.csum_start + h.csum_offset + 2 > n)
            why = "checksum field lies beyond the packet";
        first_len = n;
    } else {
        why = check_layout(&h, pb.buf, n, &lay);
        first_len = why ? 0 : lay.hdr_len + (lay.count > 1 ? h.gso_size : n - lay.hdr_len);
    }
    if (why != NULL) {
        PyErr_SetString(PyExc_ValueError, why);
        goto done;
    }
    first_dg = HEADER_LEN + padded_len(first_len, (size_t)mtu) + TAG_LEN;
    if (lay.count > 1) {
        size_t last_len = lay.hdr_len + (n - lay.hdr_len - (lay.count - 1) * h.gso_size);
        last_dg = HEADER_LEN + padded_len(last_len, (size_t)mtu) + TAG_LEN;
    } else {
        last_dg = first_dg;
    }
    total = first_dg * (lay.count - 1) + last_dg;
    if (counter + lay.count < counter) {
        PyErr_SetString(PyExc_ValueError, "counter overflow");
        goto done;
    }
    train = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (train == NULL)
        goto done;
    ctx = new_ctx(kb.buf, 1);
    if (ctx == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "libcrypto: cannot set up ChaCha20-Poly1305");
        Py_CLEAR(train);
        goto done;
    }
    {
        uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(train);
        const uint8_t *pkt = pb.buf;
        Py_BEGIN_ALLOW_THREADS
        if ((h.gso_type & ~GSO_ECN) == GSO_NONE) {
            size_t plen = padded_len(n, (size_t)mtu);
            memcpy(dst + HEADER_LEN, pkt, n);
            memset(dst + HEADER_LEN + n, 0, plen - n);
            if (h.flags & F_NEEDS_CSUM) {
                uint8_t *seg = dst + HEADER_LEN;
                size_t at = (size_t)h.csum_start + h.csum_offset;
                uint64_t initial = get16(seg + at);
                seg[at] = seg[at + 1] = 0;
                put16(seg + at, finish(sum16(seg + h.csum_start, n - h.csum_start, initial)));
            }
            failed = seal_one(ctx, dst, plen, (uint32_t)receiver, counter) < 0;
        } else {
            failed = seal_segments(ctx, &h, &lay, pkt, n, (size_t)mtu, (uint32_t)receiver, counter, dst,
                                   first_dg) < 0;
        }
        Py_END_ALLOW_THREADS
    }
    if (failed) {
        PyErr_SetString(PyExc_RuntimeError, "libcrypto: ChaCha20-Poly1305 seal failed");
        Py_CLEAR(train);
        goto done;
    }
done:
    if (ctx)
        EVP_CIPHER_CTX_free(ctx);
    PyBuffer_Release(&kb);
    PyBuffer_Release(&hb);
    PyBuffer_Release(&pb);
    if (train == NULL)
        return NULL;
    return Py_BuildValue("(Nnn)", train, (Py_ssize_t)lay.count, (Py_ssize_t)first_dg);
}

/* ------------------------------------------------------------------------------------------ open */

typedef struct {
    size_t start, len;          /* in out */
    size_t ip_len, hdr_len, gso_size;
    unsigned count;
    uint32_t next_seq;
    int is_v4, is_tcp, psh, closed, open;
} group;

/* Whether a valid IP packet may head or join a group: fills ip_len/hdr_len/is_v4/is_tcp/seq/psh. */
static int mergeable(const uint8_t *p, size_t n, int udp, group *g, uint32_t *seq, int *psh) {
    int proto;
    size_t ip_len, hdr_len;
    uint64_t s;
    if (n < 28)
        return 0;
    if (p[0] >> 4 == 4) {
        proto = p[9];
        ip_len = (size_t)(p[0] & 0x0F) * 4;
        if (ip_len != 20 || (p[6] & 0x3F) || p[7] || get16(p + 2) != n)
            return 0;
        if (fold(sum16(p, 20, 0)) != 0xFFFF)
            return 0;
        g->is_v4 = 1;
        s = sum16(p + 12, 8, 0);
    } else {
        proto = p[6];
        ip_len = 40;
        if (n < 48 || get16(p + 4) != n - 40)
            return 0;
        g->is_v4 = 0;
        s = sum16(p + 8, 32, 0);
    }
    if (proto == PROTO_TCP) {
        if (n < ip_len + 20)
            return 0;
        hdr_len = ip_len + (size_t)(p[ip_len + 12] >> 4) * 4;
        if (hdr_len < ip_len + 20 || hdr_len >= n)
            return 0;
        if (p[ip_len + 13] != TCP_ACK && p[ip_len + 13] != (TCP_ACK | TCP_PSH))
            return 0;
        *psh = p[ip_len + 13] == (TCP_ACK | TCP_PSH);
        *seq = get32(p + ip_len + 4);
        g->is_tcp = 1;
    } else if (proto == PROTO_UDP && udp) {
        hdr_len = ip_len + 8;
        if (hdr_len >= n || get16(p + ip_len + 4) != n - ip_len || !(p[ip_len + 6] | p[ip_len + 7]))
            return 0;
        *psh = 0;
        *seq = 0;
        g->is_tcp = 0;
    } else {
        return 0;
    }
    /* The kernel trusts a NEEDS_CSUM super-packet: merge only packets whose checksum is right. */
    if (fold(sum16(p + ip_len, n - ip_len, s + (unsigned)proto + (n - ip_len))) != 0xFFFF)
        return 0;
    g->ip_len = ip_len;
    g->hdr_len = hdr_len;
    return 1;
}

/* Same flow and same unchanging header fields as the group's first packet `h`. */
static int same_flow(const uint8_t *h, const uint8_t *p, const group *g, const group *c) {
    size_t ip = g->ip_len;
    if (c->is_v4 != g->is_v4 || c->is_tcp != g->is_tcp || c->hdr_len != g->hdr_len)
        return 0;
    if (g->is_v4) {
        if (memcmp(h + 12, p + 12, 8) || h[1] != p[1] || (h[6] & 0xE0) != (p[6] & 0xE0) || h[8] != p[8])
            return 0;
    } else {
        if (memcmp(h + 8, p + 8, 32) || memcmp(h, p, 4) || h[7] != p[7])
            return 0;
    }
    if (memcmp(h + ip, p + ip, 4))  /* ports */
        return 0;
    if (g->is_tcp) {
        /* ACK number and data offset, window, urgent pointer and options (not flags or checksum) */
        if (memcmp(h + ip + 8, p + ip + 8, 5) || memcmp(h + ip + 14, p + ip + 14, 2) ||
            memcmp(h + ip + 18, p + ip + 18, g->hdr_len - ip - 18))
            return 0;
    }
    return 1;
}

/* Give a group of several packets its super-packet headers; its virtio-net header into hdr. */
static void finish_group(uint8_t *out, const group *g, uint8_t *hdr) {
    uint8_t *sp = out + g->start;
    size_t total = g->len, cs = g->ip_len, l4_len = total - cs;
    uint64_t s;
    uint16_t v;
    memset(hdr, 0, VNET_HDR_LEN);
    if (g->count < 2)
        return;
    if (g->is_v4) {
        put16(sp + 2, (uint32_t)total);
        sp[10] = sp[11] = 0;
        put16(sp + 10, ~fold(sum16(sp, 20, 0)) & 0xFFFF);
        s = sum16(sp + 12, 8, 0);
    } else {
        put16(sp + 4, (uint32_t)(total - 40));
        s = sum16(sp + 8, 32, 0);
    }
    if (g->is_tcp) {
        if (g->psh)
            sp[cs + 13] |= TCP_PSH;
        s += PROTO_TCP;
    } else {
        put16(sp + cs + 4, (uint32_t)l4_len);
        s += PROTO_UDP;
    }
    put16(sp + cs + (g->is_tcp ? 16 : 6), fold(s + l4_len));  /* partial: pseudo header, not inverted */
    hdr[0] = F_NEEDS_CSUM;
    hdr[1] = g->is_tcp ? (g->is_v4 ? GSO_TCPV4 : GSO_TCPV6) : GSO_UDP_L4;
    v = (uint16_t)g->hdr_len; memcpy(hdr + 2, &v, 2);
    v = (uint16_t)g->gso_size; memcpy(hdr + 4, &v, 2);
    v = (uint16_t)cs; memcpy(hdr + 6, &v, 2);
    v = g->is_tcp ? 16 : 6; memcpy(hdr + 8, &v, 2);
}

enum { RES_OK, RES_KEEPALIVE, RES_BAD_TAG, RES_REPLAY, RES_BAD_IP, RES_COUNT };

typedef struct {
    size_t consumed, bytes, nframes;
    uint64_t last;
    size_t counts[RES_COUNT];
    size_t *fstart, *flen;
    uint8_t *fhdr;
    int failed;
} open_result;

static int replay_ok(uint8_t *ring, uint64_t *last, uint64_t counter, uint64_t limit) {
    uint64_t l = *last;
    if (counter >= limit)
        return 0;
    if (counter > l) {
        uint64_t gap = counter - l;
        if (gap > 1) {
            if (gap >= RING_BITS) {
                memset(ring, 0, RING_BITS);
            } else {
                size_t start = (size_t)((l + 1) & (RING_BITS - 1)), end = (size_t)(counter & (RING_BITS - 1));
                if (start <= end) {
                    memset(ring + start, 0, end - start);
                } else {
                    memset(ring + start, 0, RING_BITS - start);
                    memset(ring, 0, end);
                }
            }
        }
        *last = counter;
        ring[counter & (RING_BITS - 1)] = 1;
        return 1;
    }
    if (l - counter > WINDOW_SIZE)
        return 0;
    if (ring[counter & (RING_BITS - 1)])
        return 0;
    ring[counter & (RING_BITS - 1)] = 1;
    return 1;
}

static void open_loop(EVP_CIPHER_CTX *ctx, uint32_t receiver, const uint8_t *data, size_t n, size_t segment,
                      uint8_t *ring, uint64_t limit, uint8_t *out, size_t out_len, int udp, open_result *r) {
    size_t pos = 0, end = 0;
    group g;
    uint8_t nonce[12];
    memset(&g, 0, sizeof g);
    memset(nonce, 0, sizeof nonce);
    while (pos < n) {
        size_t len = n - pos < segment ? n - pos : segment, clen, plen;
        const uint8_t *d = data + pos;
        uint32_t idx;
        uint64_t counter = 0;
        int outl = 0, fin = 0, i;
        uint8_t *dst;
        if (len < MIN_MESSAGE || d[0] != 4 || d[1] || d[2] || d[3])
            break;
        idx = (uint32_t)d[4] | ((uint32_t)d[5] << 8) | ((uint32_t)d[6] << 16) | ((uint32_t)d[7] << 24);
        if (idx != receiver)
            break;
        clen = len - HEADER_LEN - TAG_LEN;
        if (end + clen > out_len)
            break;  /* cannot happen with out >= data; stop rather than overrun */
        pos += len;
        r->consumed++;
        for (i = 7; i >= 0; i--) counter = (counter << 8) | d[8 + i];
        memcpy(nonce + 4, d + 8, 8);
        dst = out + end;
        if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1 ||
            (clen && EVP_DecryptUpdate(ctx, dst, &outl, d + HEADER_LEN, (int)clen) != 1) ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, (void *)(d + len - TAG_LEN)) != 1) {
            r->failed = 1;
            break;
        }
        if (EVP_DecryptFinal_ex(ctx, dst + outl, &fin) <= 0) {
            r->counts[RES_BAD_TAG]++;
            continue;
        }
        if (!replay_ok(ring, &r->last, counter, limit)) {
            r->counts[RES_REPLAY]++;
            continue;
        }
        r->bytes += len;
        if (clen == 0) {
            r->counts[RES_KEEPALIVE]++;
            continue;
        }
        /* IP validation, as core.py's _transport_received */
        if (dst[0] >> 4 == 4) {
            if (clen < 20 || get16(dst + 2) > clen || get16(dst + 2) < 20) {
                r->counts[RES_BAD_IP]++;
                continue;
            }
            plen = get16(dst + 2);
        } else if (dst[0] >> 4 == 6) {
            if (clen < 40 || (size_t)get16(dst + 4) + 40 > clen) {
                r->counts[RES_BAD_IP]++;
                continue;
            }
            plen = (size_t)get16(dst + 4) + 40;
        } else {
            r->counts[RES_BAD_IP]++;
            continue;
        }
        r->counts[RES_OK]++;
        {
            group c;
            uint32_t seq = 0;
            int psh = 0, can = mergeable(dst, plen, udp, &c, &seq, &psh);
            if (can && g.open && !g.closed && g.count < MAX_SEGMENTS && same_flow(out + g.start, dst, &g, &c)) {
                size_t payload = plen - c.hdr_len;
                if (payload <= g.gso_size && g.len + payload <= MAX_SUPER && (!g.is_tcp || seq == g.next_seq)) {
                    memmove(out + g.start + g.len, dst + c.hdr_len, payload);
                    g.len += payload;
                    g.count++;
                    g.next_seq = seq + (uint32_t)payload;
                    g.psh = psh;
                    g.closed = psh || payload < g.gso_size;
                    r->flen[r->nframes - 1] = g.len;
                    end = g.start + g.len;
                    continue;
                }
            }
            if (g.open)
                finish_group(out, &g, r->fhdr + (r->nframes - 1) * VNET_HDR_LEN);
            g.open = 0;
            r->fstart[r->nframes] = end;
            r->flen[r->nframes] = plen;
            memset(r->fhdr + r->nframes * VNET_HDR_LEN, 0, VNET_HDR_LEN);
            r->nframes++;
            if (can) {
                g = c;
                g.start = end;
                g.len = plen;
                g.gso_size = plen - c.hdr_len;
                g.count = 1;
                g.next_seq = seq + (uint32_t)g.gso_size;
                g.psh = psh;
                g.closed = psh;
                g.open = 1;
            }
            end += plen;
        }
    }
    if (g.open)
        finish_group(out, &g, r->fhdr + (r->nframes - 1) * VNET_HDR_LEN);
}

static PyObject *open_train(PyObject *self, PyObject *args) {
    Py_buffer kb, db, rb, ob;
    unsigned long receiver;
    Py_ssize_t segment;
    unsigned long long last, limit;
    int udp;
    open_result r;
    EVP_CIPHER_CTX *ctx = NULL;
    PyObject *frames = NULL, *result = NULL;
    size_t max_frames, i;

    if (!PyArg_ParseTuple(args, "y*ky*nw*KKw*p", &kb, &receiver, &db, &segment, &rb, &last, &limit, &ob, &udp))
        return NULL;
    memset(&r, 0, sizeof r);
    if (kb.len != 32 || rb.len != RING_BITS || segment < 1) {
        PyErr_SetString(PyExc_ValueError, "open_train: key must be 32 bytes, ring 8192, segment >= 1");
        goto done;
    }
    if (ob.len < db.len) {
        PyErr_SetString(PyExc_ValueError, "open_train: out must be at least as large as data");
        goto done;
    }
    max_frames = (size_t)db.len / MIN_MESSAGE + 1;
    r.fstart = PyMem_Malloc(max_frames * sizeof(size_t));
    r.flen = PyMem_Malloc(max_frames * sizeof(size_t));
    r.fhdr = PyMem_Malloc(max_frames * VNET_HDR_LEN);
    if (!r.fstart || !r.flen || !r.fhdr) {
        PyErr_NoMemory();
        goto done;
    }
    ctx = new_ctx(kb.buf, 0);
    if (ctx == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "libcrypto: cannot set up ChaCha20-Poly1305");
        goto done;
    }
    r.last = last;
    Py_BEGIN_ALLOW_THREADS
    open_loop(ctx, (uint32_t)receiver, db.buf, (size_t)db.len, (size_t)segment, rb.buf, limit, ob.buf,
              (size_t)ob.len, udp, &r);
    Py_END_ALLOW_THREADS
    if (r.failed) {
        PyErr_SetString(PyExc_RuntimeError, "libcrypto: ChaCha20-Poly1305 open failed");
        goto done;
    }
    frames = PyList_New((Py_ssize_t)r.nframes);
    if (frames == NULL)
        goto done;
    for (i = 0; i < r.nframes; i++) {
        PyObject *item = Py_BuildValue("(y#nn)", (const char *)r.fhdr + i * VNET_HDR_LEN, (Py_ssize_t)VNET_HDR_LEN,
                                       (Py_ssize_t)r.fstart[i], (Py_ssize_t)(r.fstart[i] + r.flen[i]));
        if (item == NULL)
            goto done;
        PyList_SET_ITEM(frames, (Py_ssize_t)i, item);
    }
    result = Py_BuildValue("(nKnnnnnnO)", (Py_ssize_t)r.consumed, (unsigned long long)r.last, (Py_ssize_t)r.bytes,
                           (Py_ssize_t)r.counts[RES_OK], (Py_ssize_t)r.counts[RES_KEEPALIVE],
                           (Py_ssize_t)r.counts[RES_BAD_TAG], (Py_ssize_t)r.counts[RES_REPLAY],
                           (Py_ssize_t)r.counts[RES_BAD_IP], frames);
done:
    Py_XDECREF(frames);
    if (ctx)
        EVP_CIPHER_CTX_free(ctx);
    PyMem_Free(r.fstart);
    PyMem_Free(r.flen);
    PyMem_Free(r.fhdr);
    PyBuffer_Release(&kb);
    PyBuffer_Release(&db);
    PyBuffer_Release(&rb);
    PyBuffer_Release(&ob);
    return result;
}

PyDoc_STRVAR(seal_super_doc,
"seal_super(key, receiver, counter, header, packet, mtu) -> (train, count, datagram_size)\n\n"
"Split one offload read (10-byte virtio-net header + IP packet) into wire packets, pad and seal each as a\n"
"WireGuard transport message with counters counter.. counter+count-1, end to end in one bytes object.\n"
"ValueError for a header and packet that disagree.");

PyDoc_STRVAR(open_train_doc,
"open_train(key, receiver, data, segment, ring, last, limit, out, udp)\n"
"    -> (consumed, last, bytes, ok, keepalives, bad_tag, replay, bad_ip, frames)\n\n"
"Open the transport messages for `receiver` at the front of a train of `segment`-byte datagrams, check\n"
"the replay window, validate IP and coalesce into `out`; frames are (virtio-net header, start, end).");

static PyMethodDef methods[] = {
    {"seal_super", seal_super, METH_VARARGS, seal_super_doc},
    {"open_train", open_train, METH_VARARGS, open_train_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "wiretun.wireguard._wgcrypto",
    "WireGuard transport packets in batches (libcrypto ChaCha20-Poly1305, GIL released).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__wgcrypto(void) { return PyModule_Create(&moduledef); }
