/*
 * serve.c - libFuzzer target: request frames into serve's fast path
 * (aoe_srv_pump) over an export in a memfd, checked frame by frame against a
 * model of what AoeTarget.handle would do.
 *
 * The memfd holds a guard region, the export (at base, sectors long) and a
 * second guard region.  The harness's end of a datagram socketpair sends the
 * input's frames in batches of at most BATCH_MAX, pumps once, and checks:
 *   - the frames handed to aoe.py are exactly the batch's slow frames, byte for
 *     byte, in order (the harness drops them, as if aoe.py answered them);
 *   - the answers are exactly the model's, byte for byte, one per fast frame;
 *   - the whole memfd equals the model: the guards never change, the export
 *     only where valid writes asked;
 *   - every counter equals the model's, and frames_recv = fast + slow + drops.
 *
 * Input (bytes past its end read as 0):
 *   configuration, 13 bytes
 *     [0]     bit 0: jumbo frames (frame_max 9014, else 1514); bit 1: read-only;
 *             bit 2: mask list on; bit 3: reservation list on (the lists: [10], [11]);
 *             bit 4: the file ends [12] * 67 bytes before the export does (no guard
 *             after it): reads past its end are answered UNC, writes there grow it
 *     [1]     scnt: bit 7 clear: the most frame_max allows, as aoe.py sets it;
 *             set: (bits 0-6) modulo that plus one
 *     [2..3]  shelf (big-endian), [4] slot, [5] the last byte of the target's MAC
 *     [6..7]  base: 64 + (value % 8193) bytes of guard before the export
 *     [8..9]  sectors: value % 513
 *             (two-byte values are big-endian, as harness.h reads them)
 *     [10]    mask list, [11] reservation list: a bit per initiator (8 MACs)
 *     [12]    see bit 4 of [0]
 *   then records, by the low 2 bits of their first byte:
 *     0, 1  an ATA request, 13 more bytes b0..b12:
 *           b0  command: bits 0-2 index READ, READ EXT, WRITE, WRITE EXT, READ EXT,
 *               WRITE EXT, then 6, 7: another command (bits 3-5 pick it)
 *           b1  XORed into the aflags the command implies (E for EXT, W for writes)
 *           b2  count: below 0xC0 modulo scnt + 2 (scnt + 1 is too many), else itself
 *           b3  bits 0-1 the LBA: 0 b4..b9 modulo sectors + 1; 1 sectors minus b4
 *               (b4..b9 when that would be negative); 2 b4..b9 raw in bytes 28-33;
 *               3 as 0, then the high nibble of byte 31 and bytes 32-33 junk (b9, b8);
 *               bits 2-7: below 32 well formed, else a mutation (see mutate())
 *           b4..b9  a 48-bit value, little-endian as in the frame
 *           b10 the mutation's parameter
 *           b11 bits 0-2 the initiator; bit 3: padded to 60 bytes; bits 4-7 below 8:
 *               as much data as the command implies, else (b12 * 61) % room bytes
 *           b12 seeds the data
 *     2     a raw frame: 2 bytes of length (% (frame_max + 65)), then its bytes
 *     3     bit 2 clear: pump the batch now; set: pump, then new lists (2 more bytes:
 *           masks, reservations, as config [10], [11])
 */
#include "../_aoeio.c"

#include <sys/stat.h>

#include "harness.h"

#define BATCH_MAX       8           /* frames per pump: all fit the socket, as their answers */
#define GUARD_AFTER     1024
#define MAX_SECTORS     512
#define BASE_MAX        8256
#define NINITIATORS     8
#define ROOM_MAX        (9014 + 512)  /* the longest frame sent: frame_max + 256 */

/* A frame sent in the current batch, and what the model expects of it. */
struct sent {
    uint8_t frame[ROOM_MAX];
    size_t len;
    int kind;                       /* SRV_DROP, SRV_SLOW or SRV_FAST */
};

struct model {
    struct aoe_srv *srvs[2];        /* for frame_max 1514 and 9014, kept across inputs */
    struct aoe_srv *srv;            /* this input's */
    int far;                        /* the harness's end of the socketpair */
    int file_fd;
    uint8_t *guard;                 /* the guard regions' bytes */
    uint8_t *export;                /* the export's sectors before any write */
    uint8_t *image;                 /* what the memfd must hold */
    uint8_t *scratch;
    size_t file_len;
    uint8_t masks, reserved;        /* a bit per initiator */
    struct aoe_srv_counters c;      /* what the counters must be */
    struct sent batch[BATCH_MAX];
    int nbatch;
    uint8_t answer[ROOM_MAX];
};

static void initiator_mac(int i, uint8_t *mac)
{
    static const uint8_t base[6] = { 0x02, 0x00, 0x00, 0x00, 0x01, 0x00 };
    memcpy(mac, base, 6);
    mac[5] = (uint8_t)i;
}

NO_COVERAGE static int initiator_listed(uint8_t bits, const uint8_t *mac)
{
    uint8_t m[6];
    for (int i = 0; i < NINITIATORS; i++) {
        initiator_mac(i, m);
        if ((bits >> i & 1) && memcmp(m, mac, 6) == 0)
            return 1;
    }
    return 0;
}

static void set_lists(struct model *m, uint8_t masks, uint8_t reserved)
{
    uint8_t ml[NINITIATORS][6], rl[NINITIATORS][6];
    int nm = 0, nr = 0;
    for (int i = 0; i < NINITIATORS; i++) {
        if (masks >> i & 1)
            initiator_mac(i, ml[nm++]);
        if (reserved >> i & 1)
            initiator_mac(i, rl[nr++]);
    }
    CHECK(aoe_srv_set_lists(m->srv, &ml[0][0], nm, &rl[0][0], nr) == 0, "set_lists");
    m->masks = masks;
    m->reserved = reserved;
}

/* AoeTarget.handle's verdict, from the spec (aoe.py), counting drops as it does. */
NO_COVERAGE static int classify(struct model *m, const uint8_t *h, size_t len)
{
    struct aoe_srv *s = m->srv;
    if (len > s->frame_max) {
        m->c.drop_oversize++;
        return SRV_DROP;
    }
    if (len < 24) {
        m->c.drop_short++;
        return SRV_DROP;
    }
    if (h[12] != 0x88 || h[13] != 0xA2) {
        m->c.drop_not_aoe++;
        return SRV_DROP;
    }
    if (h[14] >> 4 != 1) {
        m->c.drop_version++;
        return SRV_DROP;
    }
    if (h[14] & 0x08) {
        m->c.drop_response++;
        return SRV_DROP;
    }
    unsigned shelf = (unsigned)h[16] << 8 | h[17], slot = h[18];
    if ((shelf != s->shelf && shelf != 0xFFFF) || (slot != s->slot && slot != 0xFF)) {
        m->c.drop_other_target++;
        return SRV_DROP;
    }
    if (m->masks && !initiator_listed(m->masks, h + 6)) {
        m->c.drop_masked++;
        return SRV_DROP;
    }
    /* Only a READ/WRITE to exactly us that Python would answer with data or IDNF/ABRT. */
    if (h[19] != 0 || shelf != s->shelf || slot != s->slot || len < 36)
        return SRV_SLOW;
    uint8_t cmd = h[27];
    int write = cmd == 0x30 || cmd == 0x34;
    if (!write && cmd != 0x20 && cmd != 0x24)
        return SRV_SLOW;
    if (m->reserved && !initiator_listed(m->reserved, h + 6))
        return SRV_SLOW;
    if (h[26] > s->scnt || (write && len - 36 < (size_t)h[26] * 512))
        return SRV_SLOW;
    return SRV_FAST;
}

/* The answer AoeTarget._ata gives to a fast frame, applying a write to the image;
 * returns its length. */
NO_COVERAGE static size_t model_answer(struct model *m, const uint8_t *h, uint8_t *a)
{
    struct aoe_srv *s = m->srv;
    uint8_t cmd = h[27], count = h[26], aflags = h[24];
    int write = cmd == 0x30 || cmd == 0x34, ext_cmd = cmd == 0x24 || cmd == 0x34;
    uint64_t lba = 0;
    if (aflags & 0x40)
        for (int i = 5; i >= 0; i--)
            lba = lba << 8 | h[28 + i];
    else
        lba = h[28] | (uint64_t)h[29] << 8 | (uint64_t)h[30] << 16 |
              (uint64_t)(h[31] & 0x0F) << 24;
    if (!ext_cmd)
        lba &= 0x0FFFFFFF;
    uint8_t status = 0x40, err = 0;
    if (lba + count > s->sectors) {
        status |= 0x01;
        err = 0x10;
    } else if (write && s->readonly) {
        status |= 0x01;
        err = 0x04;
    }
    size_t data = 0, start = 0, end = 0;
    if (!(status & 0x01) && count) {
        start = s->base + lba * 512;
        end = start + (size_t)count * 512;
        if (write) {                        /* past the file's end it grows, with a hole */
            if (start > m->file_len)
                memset(m->image + m->file_len, 0, start - m->file_len);
            memcpy(m->image + start, h + 36, (size_t)count * 512);
            if (end > m->file_len)
                m->file_len = end;
            m->c.sectors_written += count;
        } else if (end > m->file_len) {     /* a read past the file's end: UNC */
            status |= 0x01;
            err = 0x40;
            m->c.io_errors++;
        } else {
            data = (size_t)count * 512;
            m->c.sectors_read += count;
        }
    }
    memcpy(a, h + 6, 6);
    memcpy(a + 6, s->mac, 6);
    memcpy(a + 12, h + 12, 24);
    a[14] = 0x18;
    a[15] = 0;
    a[25] = err;
    a[26] = status & 0x01 ? count : 0;
    a[27] = status;
    if (!(aflags & 0x40)) {
        a[31] = 0xE0 | (h[31] & 0x0F);
        a[32] = a[33] = 0;
    }
    a[34] = a[35] = 0;
    if (data)
        memcpy(a + 36, m->image + start, data);
    size_t len = 36 + data;
    if (len < 60) {
        memset(a + len, 0, 60 - len);
        len = 60;
    }
    return len;
}

NO_COVERAGE static void check_counters(const struct model *m)
{
    const struct aoe_srv_counters *c = &m->srv->c, *w = &m->c;
#define SAME(field) CHECK(c->field == w->field, #field " %llu, model %llu", \
                          (unsigned long long)c->field, (unsigned long long)w->field)
    SAME(frames_recv); SAME(batches); SAME(frames_fast); SAME(frames_slow); SAME(frames_sent);
    SAME(sectors_read); SAME(sectors_written); SAME(io_errors); SAME(drop_short);
    SAME(drop_not_aoe); SAME(drop_version); SAME(drop_response); SAME(drop_other_target);
    SAME(drop_masked); SAME(drop_oversize); SAME(send_lost);
#undef SAME
    uint64_t drops = c->drop_short + c->drop_not_aoe + c->drop_version + c->drop_response +
                     c->drop_other_target + c->drop_masked + c->drop_oversize;
    CHECK(c->frames_recv == c->frames_fast + c->frames_slow + drops, "frames don't add up");
}

/* Send the batch, pump once, check everything against the model. */
static void pump_batch(struct model *m)
{
    struct aoe_srv *s = m->srv;
    if (!m->nbatch)
        return;
    int slow = 0, nslow = 0;
    for (int i = 0; i < m->nbatch; i++) {
        struct sent *f = &m->batch[i];
        CHECK(send(m->far, f->frame, f->len, MSG_DONTWAIT) == (ssize_t)f->len, "send: %s",
              strerror(errno));
        /* After the first frame for aoe.py, the rest of the batch goes there too, but
         * for a frame too long for its slot: aoe.py would take its cut for whole. */
        f->kind = slow && f->len <= m->srv->frame_max ? SRV_SLOW : classify(m, f->frame, f->len);
        slow |= f->kind == SRV_SLOW;
        nslow += f->kind == SRV_SLOW;
    }
    m->c.frames_recv += (uint64_t)m->nbatch;
    m->c.batches++;
    m->c.frames_slow += (uint64_t)nslow;

    int n = aoe_srv_pump(s, 0);
    CHECK(n == nslow, "pump returned %d, model %d slow frames", n, nslow);
    CHECK(s->nslow == nslow, "nslow %d, model %d", s->nslow, nslow);
    for (int i = 0, k = 0; i < m->nbatch; i++) {
        const struct sent *f = &m->batch[i];
        if (f->kind != SRV_SLOW)
            continue;
        CHECK(s->slow[k].len == f->len && memcmp(s->slow[k].data, f->frame, f->len) == 0,
              "slow frame %d is not frame %d as sent", k, i);
        k++;
    }
    CHECK(aoe_srv_pump(s, 0) == 0, "a second pump found more");

    /* Answers, in the order of their requests. */
    for (int i = 0; i < m->nbatch; i++) {
        const struct sent *f = &m->batch[i];
        if (f->kind != SRV_FAST)
            continue;
        m->c.frames_fast++;
        m->c.frames_sent++;
        size_t want = model_answer(m, f->frame, m->answer);
        static uint8_t got[ROOM_MAX + 1];
        ssize_t len = recv(m->far, got, sizeof(got), MSG_DONTWAIT);
        CHECK(len >= 0, "no answer to fast frame %d: %s", i, strerror(errno));
        CHECK((size_t)len == want, "answer to frame %d: %zd bytes, model %zu", i, len, want);
        if (memcmp(got, m->answer, want) != 0) {
            size_t b = 0;
            while (got[b] == m->answer[b])
                b++;
            CHECK(0, "answer to frame %d: byte %zu is %02x, model %02x", i, b, got[b],
                  m->answer[b]);
        }
    }
    static uint8_t extra[ROOM_MAX];
    CHECK(recv(m->far, extra, sizeof(extra), MSG_DONTWAIT) < 0 && errno == EAGAIN,
          "an answer the model does not expect");
    m->nbatch = 0;

    check_counters(m);
    struct stat st;
    CHECK(fstat(m->file_fd, &st) == 0 && (size_t)st.st_size == m->file_len,
          "the memfd has %lld bytes, the model %zu", (long long)st.st_size, m->file_len);
    CHECK(pread(m->file_fd, m->scratch, m->file_len, 0) == (ssize_t)m->file_len, "pread");
    if (memcmp(m->scratch, m->image, m->file_len) != 0) {
        size_t at = 0;
        while (m->scratch[at] == m->image[at])
            at++;
        CHECK(0, "memfd byte %zu (export byte %lld) is %02x, model %02x", at,
              (long long)at - (long long)s->base, m->scratch[at], m->image[at]);
    }
}

/* Apply mutation `which` (0..15) with parameter p to a well-formed request. */
static void mutate(struct model *m, uint8_t *f, size_t *len, int which, uint8_t p)
{
    struct aoe_srv *s = m->srv;
    unsigned shelf;
    switch (which) {
    case 0:                                         /* another shelf */
        shelf = (s->shelf + 1u + p) & 0xFFFF;
        f[16] = (uint8_t)(shelf >> 8);
        f[17] = (uint8_t)shelf;
        break;
    case 1:                                         /* another slot */
        f[18] = (uint8_t)(s->slot + 1 + p);
        break;
    case 2:                                         /* broadcast shelf */
        f[16] = f[17] = 0xFF;
        break;
    case 3:                                         /* broadcast slot */
        f[18] = 0xFF;
        break;
    case 4:                                         /* both */
        f[16] = f[17] = f[18] = 0xFF;
        break;
    case 5:                                         /* another version */
        f[14] = (uint8_t)(((p % 15 + 2) & 0x0F) << 4 | (f[14] & 0x0F));
        break;
    case 6:                                         /* a response */
        f[14] |= 0x08;
        break;
    case 7:                                         /* error flag and code in a request */
        f[14] |= 0x04;
        f[15] = p;
        break;
    case 8:                                         /* another AoE command */
        f[19] = (uint8_t)(1 + p % 255);
        break;
    case 9:                                         /* cut short */
        *len = *len * p / 256;
        break;
    case 10:                                        /* longer than frame_max */
        memset(f + *len, p, s->frame_max + 1 + p - *len);
        *len = s->frame_max + 1 + p;
        break;
    case 11:                                        /* not AoE */
        f[13] ^= (uint8_t)(1 + p % 255);
        break;
    case 12:                                        /* an initiator in no list */
        memset(f + 6, 0x02, 5);
        f[11] = p;
        break;
    case 13:                                        /* broadcast destination: no matter */
        memset(f, 0xFF, 6);
        break;
    case 14:                                        /* exactly frame_max */
        memset(f + *len, p, s->frame_max - *len);
        *len = s->frame_max;
        break;
    default:                                        /* the ATA header cut */
        *len = 24 + p % 12;
        break;
    }
}

static void ata_record(struct model *m, struct script *in, uint32_t serial)
{
    static const uint8_t main_cmds[6] = { 0x20, 0x24, 0x30, 0x34, 0x24, 0x34 };
    static const uint8_t other_cmds[8] = { 0xEC, 0xE7, 0xEA, 0xE5, 0x25, 0x35, 0xC8, 0xCA };
    struct aoe_srv *s = m->srv;
    uint8_t b[13];
    for (int i = 0; i < 13; i++)
        b[i] = next_u8(in);
    uint8_t cmd = (b[0] & 7) < 6 ? main_cmds[b[0] & 7] : other_cmds[b[0] >> 3 & 7];
    int write = cmd == 0x30 || cmd == 0x34, ext = cmd == 0x24 || cmd == 0x34;
    uint8_t aflags = (uint8_t)((ext ? 0x40 : 0) | (write ? 0x01 : 0)) ^ b[1];
    uint8_t count = b[2] < 0xC0 ? (uint8_t)(b[2] % (s->scnt + 2)) : b[2];
    uint64_t v = 0;
    for (int i = 5; i >= 0; i--)
        v = v << 8 | b[4 + i];
    uint64_t lba;
    switch (b[3] & 3) {
    case 1:
        lba = s->sectors >= b[4] ? s->sectors - b[4] : v;
        break;
    case 2:
        lba = v;
        break;
    default:
        lba = v % (s->sectors + 1);
    }

    struct sent *f = &m->batch[m->nbatch];
    uint8_t *h = f->frame;
    memcpy(h, s->mac, 6);
    initiator_mac(b[11] & 7, h + 6);
    h[12] = 0x88;
    h[13] = 0xA2;
    h[14] = 0x10;
    h[15] = 0;
    h[16] = (uint8_t)(s->shelf >> 8);
    h[17] = (uint8_t)s->shelf;
    h[18] = s->slot;
    h[19] = 0;
    uint32_t tag = serial * 0x9E3779B1u;
    memcpy(h + 20, &tag, 4);
    h[24] = aflags;
    h[25] = 0;
    h[26] = count;
    h[27] = cmd;
    for (int i = 0; i < 6; i++)
        h[28 + i] = (uint8_t)(lba >> (8 * i));
    if ((b[3] & 3) == 2) {
        memcpy(h + 28, b + 4, 6);
    } else if (!(aflags & 0x40)) {
        h[31] = 0xE0 | (h[31] & 0x0F);
        h[32] = h[33] = 0;
        if ((b[3] & 3) == 3) {
            h[31] = (b[9] & 0xF0) | (h[31] & 0x0F);
            h[32] = b[9];
            h[33] = b[8];
        }
    }
    h[34] = h[35] = 0;
    size_t room = s->frame_max - 36;
    size_t data = b[11] >> 4 >= 8 ? (size_t)b[12] * 61 % (room + 1)
                                  : write ? (size_t)count * 512 : 0;
    if (data > room)
        data = room;
    uint32_t x = (uint32_t)b[12] << 16 ^ serial ^ 0x5bd1e995u;
    for (size_t i = 0; i < data; i += 4) {
        uint32_t r = xorshift32(&x);
        memcpy(h + 36 + i, &r, data - i < 4 ? data - i : 4);
    }
    size_t len = 36 + data;
    if ((b[11] & 8) && len < 60) {
        memset(h + len, 0, 60 - len);
        len = 60;
    }
    if (b[3] >> 2 >= 32)
        mutate(m, h, &len, (b[3] >> 2) & 15, b[10]);
    f->len = len;
    m->nbatch++;
}

static void raw_record(struct model *m, struct script *in)
{
    struct sent *f = &m->batch[m->nbatch];
    f->len = next_u16(in) % (m->srv->frame_max + 65);
    for (size_t i = 0; i < f->len; i++)
        f->frame[i] = next_u8(in);
    m->nbatch++;
}

/* Sockets, memfd and both srvs live as long as the process; each input resets them. */
static void setup(struct model *m)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_DGRAM, 0, sv) == 0, "socketpair: %s", strerror(errno));
    m->far = sv[1];
    m->file_fd = memfd_create("serve-fuzz", MFD_CLOEXEC);
    CHECK(m->file_fd >= 0, "memfd_create: %s", strerror(errno));
    size_t most = BASE_MAX + (size_t)MAX_SECTORS * 512 + GUARD_AFTER;
    m->image = malloc(most);
    m->scratch = malloc(most);
    m->guard = malloc(BASE_MAX + GUARD_AFTER);
    m->export = malloc((size_t)MAX_SECTORS * 512);
    CHECK(m->image && m->scratch && m->guard && m->export, "out of memory");
    for (size_t i = 0; i < BASE_MAX + GUARD_AFTER; i++)
        m->guard[i] = (uint8_t)((i * 2654435761u) >> 11 ^ i >> 9);
    stamp_sectors(m->export, 0, MAX_SECTORS, 0);
    for (int i = 0; i < 2; i++) {
        m->srvs[i] = aoe_srv_new(i ? 9014 : 1514);
        CHECK(m->srvs[i], "aoe_srv_new: %s", strerror(errno));
        m->srvs[i]->sock_fd = sv[0];
        m->srvs[i]->file_fd = m->file_fd;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct model model;
    struct model *m = &model;
    if (!m->image)
        setup(m);
    struct script in = { data, size };
    uint8_t cfg[13];
    for (int i = 0; i < 13; i++)
        cfg[i] = next_u8(&in);

    memset(&m->c, 0, sizeof(m->c));
    m->nbatch = 0;
    struct aoe_srv *s = m->srv = m->srvs[cfg[0] & 1];
    memset(&s->c, 0, sizeof(s->c));
    s->nslow = 0;
    int most = (int)((s->frame_max - 36) / 512);  /* aoe.py: min(255, frame_sectors(mtu)) */
    s->scnt = cfg[1] & 0x80 ? (cfg[1] & 0x7F) % (most + 1) : most;
    s->readonly = cfg[0] >> 1 & 1;
    s->shelf = (uint16_t)(cfg[2] << 8 | cfg[3]);
    s->slot = cfg[4];
    static const uint8_t target_mac[6] = { 0x02, 0x00, 0x00, 0x00, 0x00, 0x00 };
    memcpy(s->mac, target_mac, 6);
    s->mac[5] = cfg[5];
    s->base = 64 + (unsigned)(cfg[6] << 8 | cfg[7]) % (BASE_MAX - 63);
    s->sectors = (unsigned)(cfg[8] << 8 | cfg[9]) % (MAX_SECTORS + 1);
    set_lists(m, cfg[0] & 4 ? cfg[10] : 0, cfg[0] & 8 ? cfg[11] : 0);

    /* guard, export (stamped sectors), guard */
    size_t export_len = s->sectors * 512;
    m->file_len = s->base + export_len + GUARD_AFTER;
    memcpy(m->image, m->guard, s->base);
    memcpy(m->image + s->base, m->export, export_len);
    memcpy(m->image + s->base + export_len, m->guard + s->base, GUARD_AFTER);
    if (cfg[0] & 0x10) {                    /* the file ends inside the export */
        size_t cut = (size_t)cfg[12] * 67;
        m->file_len = s->base + (cut < export_len ? export_len - cut : 0);
    }
    CHECK(ftruncate(m->file_fd, 0) == 0 && ftruncate(m->file_fd, (off_t)m->file_len) == 0,
          "ftruncate: %s", strerror(errno));
    CHECK(pwrite(m->file_fd, m->image, m->file_len, 0) == (ssize_t)m->file_len, "pwrite");

    uint32_t serial = 0;
    while (!script_done(&in)) {
        uint8_t op = next_u8(&in);
        switch (op & 3) {
        case 0:
        case 1:
            ata_record(m, &in, ++serial);
            break;
        case 2:
            raw_record(m, &in);
            break;
        default:
            pump_batch(m);
            if (op & 4) {
                uint8_t masks = next_u8(&in);
                set_lists(m, masks, next_u8(&in));
            }
        }
        if (m->nbatch == BATCH_MAX)
            pump_batch(m);
    }
    pump_batch(m);
    return 0;
}
