/*
 * fuzz/pump.c - answers from the LAN into the frame engine: aoe_submit,
 * aoe_pump (drain_socket, rx_aim/rx_unaim, handle_answer, expiry, sending),
 * aoe_resend and aoe_fail_all, over datagram socketpairs whose far ends the
 * script plays as the target.
 *
 * Input (bytes past the end read as 0):
 *   u16 frames      engine slots: 1 + frames % SCRIPT_FRAMES (384)
 *   u16 gen_seed    where the slots' generations start; an odd one stands for
 *                   GEN_MAX - 2 - (gen_seed >> 1) % 4: they wrap after a few transmissions
 *   u8  setup       bit 0: lba48; bit 1: the other flush command; bit 2: small socket
 *                   buffers; bit 3: two sockets (else one); bits 4-5: 1 + (x % 3) paths
 *   u8  spf         sectors per frame: 1 + spf % 17, or MAX_SPF for 255
 *   per path: u8    bit 0: socket; bits 1-2: target MAC; bits 3-7: window (maxout) 1..32
 *   then at most MAX_STEPS steps, an opcode byte (% 8) each:
 *     0 submit   u8 op (% 3: read, write, flush), u16 sectors, u8 where, u32 lba bits
 *     1 pump     aoe_pump(e, 0, -1), then its completions and expiries are checked
 *     2 path     u8 path, u8 field (% 4: maxout, rto_us, reorder_us, enabled), u8 value
 *     3 time     u8: how far the clock moves
 *     4 resend   u8: 0 all frames the last pump reported expired, in reverse as
 *                aoe.py's Engine does; else one of them
 *     5 fail     aoe_fail_all
 *     6 answer   u8 which request frame (newest first), u8 mutation, u8 parameter,
 *                u8 how (copies, which socket); a garbage answer then takes its bytes
 *     7 answer all request frames not answered yet, right, u8 bit 0: newest first
 *
 * Each answer's data is stamped with the LBA its own header echoes, and write
 * buffers with theirs, so a request that completes well holds exactly its own
 * sectors (no answer was taken for another frame, nothing wrote into it where
 * it should not) and a write's buffer never changes; guard bytes surround every
 * buffer.  An answer that must be dropped whatever state the engine is in (a
 * generation of 0, a broken parity, a header field the frame named by its
 * unchanged tag cannot echo) also carries an AoE error of POISON: a request
 * completing with that status took it.  The frames a pump lists as failed
 * (aoe_eng.failed) are frames of live requests, each once, and a request that
 * fails ends with the first one's status, its other sectors read all the
 * same.  After every step the engine's lists are walked (check_engine) and
 * its counters compared with what was submitted and completed; every request
 * completes exactly once, at the latest in the final aoe_fail_all.
 */

#define clock_gettime fuzz_clock_gettime    /* the engine runs on the script's clock */
#include "../_aoeio.c"
#include "harness.h"

#define MAX_STEPS       64
#define SCRIPT_FRAMES   384
#define MAX_SOCKETS     2
#define LOG_SIZE        128         /* request frames remembered, the oldest forgotten */
#define POISON          0xEE        /* the AoE error code of answers that must be dropped */
#define READ_VERSION    1           /* the stamp of the target's read data */
#define WRITE_VERSION   2           /* ... and of write buffers */
#define FAIL_STATUS     (-ECANCELED)
#define FIRST_ID        1000

static const uint8_t initiator_macs[MAX_SOCKETS][6] = {
    { 2, 0, 0, 0, 0, 1 }, { 2, 0, 0, 0, 0, 2 } };
/* the paths' targets are the first three; the others stand in for wrong sources */
static const uint8_t target_macs[5][6] = {
    { 2, 0, 0, 0, 1, 1 }, { 2, 0, 0, 0, 1, 2 }, { 2, 0, 0, 0, 1, 3 },
    { 2, 0, 0, 0, 0, 1 }, { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff } };

struct request {
    int op;
    uint64_t lba;
    uint32_t nsect;
    uint8_t *buf;
    size_t len;
    int live;
    /* frames the target failed (aoe_eng.failed): their sectors, the first's status, and
     * whether some went unlisted */
    uint8_t *failed;
    int32_t first_failure;
    int unlisted;
};

struct logged {
    uint8_t hdr[ATA_HDR_LEN];
    int sock;
    int answered;
};

struct run {
    struct aoe_eng *e;
    int nsock;
    int sv[MAX_SOCKETS][2];
    struct request reqs[MAX_STEPS];
    int nreqs, live;
    struct logged log[LOG_SIZE];
    uint32_t nlogged;               /* ever; log[n % LOG_SIZE] */
    uint32_t expired[SCRIPT_FRAMES]; /* the last pump's, at most one per slot */
    int nexpired;
    uint32_t *seen, mark;
};

/* one frame in or out; one sector too many fits */
static uint8_t frame_buf[ATA_HDR_LEN + (MAX_SPF + 1) * SECTOR_SIZE];

static uint64_t lba_limit(int lba48)
{
    return lba48 ? 1ull << 48 : 1ull << 28;
}

/* ---- what the engine sends ------------------------------------------------ */

/* One request frame as it must be: ours, to one of the socket's paths, a valid
 * tag, the right command, and a write's data its own LBAs' stamps. */
NO_COVERAGE static void check_request_frame(struct run *r, int k, const uint8_t *h, size_t len)
{
    const struct aoe_eng *e = r->e;
    CHECK(len >= ETH_ZLEN, "request frame of %zu bytes", len);
    CHECK(memcmp(h + 6, initiator_macs[k], 6) == 0, "request from another MAC on socket %d", k);
    int to_path = 0;
    for (int p = 0; p < e->npaths; p++)
        if (e->paths[p].fd == r->sv[k][0] && memcmp(h, e->paths[p].dst, 6) == 0)
            to_path = 1;
    CHECK(to_path, "request to a MAC no path of socket %d has", k);
    CHECK(h[12] == 0x88 && h[13] == 0xA2 && h[14] == AOE_HVER && h[15] == 0 &&
          h[16] == 0 && h[17] == 3 && h[18] == 7 && h[19] == AOECMD_ATA,
          "request header %02x%02x %02x %02x %02x%02x.%02x cmd %02x", h[12], h[13], h[14], h[15],
          h[16], h[17], h[18], h[19]);
    uint32_t tag = be32(h + 20);
    CHECK((tag & ENGINE_TAG) == ENGINE_TAG && !(__builtin_popcount(tag) & 1) &&
          (tag >> 16 & GEN_MAX) != 0 && tag_slot(tag) < e->max_frames, "request tag %08x", tag);
    int ext = h[24] & AOEAFL_EXT, write = h[24] & AOEAFL_WRITE;
    CHECK((h[24] & ~(AOEAFL_EXT | AOEAFL_WRITE)) == 0 && h[25] == 0 && h[34] == 0 && h[35] == 0,
          "request aflags %02x feature %02x", h[24], h[25]);
    if (!ext)
        CHECK(h[31] >> 4 == 0xE && h[32] == 0 && h[33] == 0, "LBA28 request with %02x %02x %02x",
              h[31], h[32], h[33]);
    uint64_t lba = header_lba(h);
    uint8_t count = h[26], cmd = h[27];
    if (cmd == ATA_CMD_FLUSH || cmd == ATA_CMD_FLUSH_EXT) {
        CHECK(cmd == e->flush_cmd && !write && count == 0 && lba == 0 && len == ETH_ZLEN,
              "flush %02x count %u lba %llu len %zu", cmd, count, (unsigned long long)lba, len);
        return;
    }
    CHECK(count >= 1 && count <= e->sectors_per_frame && lba + count <= lba_limit(ext),
          "request of %u sectors at %llu", count, (unsigned long long)lba);
    if (write) {
        CHECK(cmd == (ext ? ATA_CMD_PIO_WRITE_EXT : ATA_CMD_PIO_WRITE), "write with command %02x",
              cmd);
        CHECK(len == ATA_HDR_LEN + (size_t)count * SECTOR_SIZE, "write of %u sectors in %zu "
              "bytes", count, len);
        for (uint32_t i = 0; i < count; i++) {
            uint64_t version;
            CHECK(stamp_read(h + ATA_HDR_LEN + (size_t)i * SECTOR_SIZE, lba + i, &version) &&
                  version == WRITE_VERSION, "write frame at %llu: sector %u is not its own",
                  (unsigned long long)lba, i);
        }
    } else {
        CHECK(cmd == (ext ? ATA_CMD_PIO_READ_EXT : ATA_CMD_PIO_READ), "read with command %02x",
              cmd);
        CHECK(len == ETH_ZLEN, "read request of %zu bytes", len);
    }
}

/* Everything the engine sent since last time, checked and logged. */
static void collect_requests(struct run *r)
{
    for (int k = 0; k < r->nsock; k++) {
        ssize_t n;
        while ((n = recv(r->sv[k][1], frame_buf, sizeof(frame_buf), MSG_DONTWAIT)) >= 0) {
            check_request_frame(r, k, frame_buf, (size_t)n);
            struct logged *l = &r->log[r->nlogged++ % LOG_SIZE];
            memcpy(l->hdr, frame_buf, ATA_HDR_LEN);
            l->sock = k;
            l->answered = 0;
        }
    }
}

/* ---- what the target answers -------------------------------------------- */

static uint32_t with_parity(uint32_t tag)
{
    tag &= ~1u;
    return tag | (uint32_t)(__builtin_popcount(tag) & 1);
}

static void put_tag(uint8_t *a, uint32_t tag)
{
    a[20] = (uint8_t)(tag >> 24);
    a[21] = (uint8_t)(tag >> 16);
    a[22] = (uint8_t)(tag >> 8);
    a[23] = (uint8_t)tag;
}

static void put_lba(uint8_t *a, uint64_t lba, int ext)
{
    for (int i = 0; i < 6; i++)
        a[28 + i] = (uint8_t)(lba >> (8 * i));
    if (!ext) {
        a[31] = 0xE0 | (lba >> 24 & 0x0F);
        a[32] = a[33] = 0;
    }
}

/* An answer that must be dropped: if it were taken, its request fails with POISON. */
static void poison(uint8_t *a)
{
    a[14] |= AOEFL_ERR;
    a[15] = POISON;
}

enum {
    M_RIGHT = 6,                    /* mutations 0..5 leave the answer right */
    M_AOE_ERROR = M_RIGHT, M_ATA_ERROR, M_DEVICE_FAULT, M_TAG_BIT, M_GEN_ZERO, M_GEN_MAX,
    M_GEN_OTHER, M_SLOT_OTHER, M_NOT_ENGINE, M_SRC_MAC, M_DST_MAC, M_SHELF, M_SLOT, M_COMMAND,
    M_VERSION, M_NOT_RESPONSE, M_AFLAGS, M_LBA, M_COUNT, M_DATA_LENGTH, M_GARBAGE, M_COUNT_OF
};

/* The answer to logged request l under mutation m (parameter x) into
 * frame_buf; returns its length. */
static size_t build_answer(struct script *in, const struct logged *l, int m, uint8_t x)
{
    uint8_t *a = frame_buf;
    const uint8_t *q = l->hdr;
    if (m == M_GARBAGE) {
        size_t len = 1 + (size_t)x * 2;     /* too short to be a read answer */
        for (size_t i = 0; i < len; i++)
            a[i] = next_u8(in);
        if (len > 15 && (a[14] & AOEFL_ERR) && a[15] == POISON)
            a[15] = 0;
        return len;
    }
    answer_header(a, q);
    int ext = q[24] & AOEAFL_EXT;
    int read = !(q[24] & AOEAFL_WRITE) && q[26] > 0;
    uint32_t sectors = read ? q[26] : 0;
    uint32_t tag = be32(q + 20), gen = tag >> 16 & GEN_MAX;
    size_t len = 0;
    switch (m) {
    case M_AOE_ERROR:
        a[14] |= AOEFL_ERR;
        a[15] = x == POISON ? 0 : x;
        break;
    case M_ATA_ERROR:
        a[25] = x;
        a[27] = 0x40 | ATA_ERR;
        break;
    case M_DEVICE_FAULT:
        a[27] = 0x40 | ATA_DF;
        break;
    case M_TAG_BIT:
        put_tag(a, tag ^ 1u << (x % 32));
        poison(a);
        break;
    case M_GEN_ZERO:
        put_tag(a, with_parity(tag & ~((uint32_t)GEN_MAX << 16)));
        poison(a);
        break;
    case M_GEN_MAX:
        put_tag(a, with_parity(tag | (uint32_t)GEN_MAX << 16));
        break;
    case M_GEN_OTHER: {                     /* a later or earlier transmission */
        uint32_t step = 1 + x % 3;
        uint32_t g = x & 0x80 ? (gen - 1 + step) % GEN_MAX + 1
                              : (gen - 1 + GEN_MAX - step) % GEN_MAX + 1;
        put_tag(a, with_parity((tag & ~((uint32_t)GEN_MAX << 16)) | g << 16));
        break;
    }
    case M_SLOT_OTHER:
        put_tag(a, with_parity((tag & ~((MAX_FRAMES - 1) << 1)) | (uint32_t)x << 1));
        break;
    case M_NOT_ENGINE:
        put_tag(a, with_parity((tag & ~ENGINE_TAG) | (uint32_t)(x % 3) << 30));
        poison(a);
        break;
    case M_SRC_MAC:
        memcpy(a + 6, target_macs[x % 5], 6);
        break;
    case M_DST_MAC:
        memcpy(a, target_macs[x % 5], 6);
        break;
    case M_SHELF:
        a[16] ^= 1 + x % 255;
        poison(a);
        break;
    case M_SLOT:
        a[18] ^= 1 + x % 255;
        poison(a);
        break;
    case M_COMMAND:
        a[19] = 1 + x % 255;
        poison(a);
        break;
    case M_VERSION:
        a[14] = (uint8_t)((x % 15 == 0 ? 0 : 1 + x % 15) << 4) | AOEFL_RSP;
        if ((a[14] >> 4) == 1)
            a[14] = 0x20 | AOEFL_RSP;
        poison(a);
        break;
    case M_NOT_RESPONSE:
        a[14] = AOE_HVER;
        poison(a);
        break;
    case M_AFLAGS:
        a[24] ^= (x & 1 ? AOEAFL_EXT : 0) | (x & 2 || !(x & 1) ? AOEAFL_WRITE : 0);
        poison(a);
        break;
    case M_LBA: {
        uint64_t lba = header_lba(q), moved = lba + (x & 0x80 ? -(uint64_t)(1 + x % 64) :
                                                      1 + x % 64);
        put_lba(a, moved, ext);
        if (header_lba(a) != lba)
            poison(a);
        break;
    }
    case M_COUNT:
        a[26] = x;
        if (x > q[26])
            poison(a);
        break;
    case M_DATA_LENGTH:
        if (read && x & 1)
            sectors = x / 2 % (sectors + 2);
        else
            len = x / 2 % ATA_HDR_LEN + 1;  /* cut in the header */
        break;
    }
    if (!len) {
        len = ATA_HDR_LEN + (size_t)sectors * SECTOR_SIZE;
        stamp_sectors(a + ATA_HDR_LEN, header_lba(a), sectors, READ_VERSION);
    }
    if (len < ETH_ZLEN) {
        memset(a + len, 0, ETH_ZLEN - len);
        if (m != M_DATA_LENGTH)
            len = ETH_ZLEN;
    }
    return len;
}

static void send_answer(struct run *r, int k, size_t len)
{
    send(r->sv[k][1], frame_buf, len, MSG_DONTWAIT);    /* a full socket loses it */
}

/* ---- completions ----------------------------------------------------------- */

NO_COVERAGE static void complete(struct run *r, uint64_t id, int32_t status, int failing_all)
{
    CHECK(id >= FIRST_ID && id < FIRST_ID + (uint64_t)r->nreqs, "completion of unknown id %llu",
          (unsigned long long)id);
    struct request *q = &r->reqs[id - FIRST_ID];
    CHECK(q->live, "request %llu completed twice", (unsigned long long)id);
    CHECK(status != -(STATUS_AOE_ERROR | POISON), "request %llu took an answer that must be "
          "dropped", (unsigned long long)id);
    if (failing_all)
        CHECK(status == FAIL_STATUS, "aoe_fail_all gave status %d", status);
    else
        CHECK(status == 0 || (-status & ~0xFF) == STATUS_AOE_ERROR ||
              (-status & ~0xFF) == STATUS_ATA_ERROR, "request %llu status %d",
              (unsigned long long)id, status);
    /* what the failures listed tell, when they are all listed */
    int listed = !failing_all && !q->unlisted;
    if (listed)
        CHECK(status == q->first_failure, "request %llu ended with status %d, its first failed "
              "frame had %d", (unsigned long long)id, status, q->first_failure);
    if (q->op != OP_FLUSH) {
        guarded_check(q->buf, q->len);
        for (uint32_t i = 0; i < q->nsect; i++) {
            if (q->op == OP_READ && (status ? !listed || q->failed[i] : 0))
                continue;                   /* not read */
            uint64_t version;
            CHECK(stamp_read(q->buf + (size_t)i * SECTOR_SIZE, q->lba + i, &version) &&
                  version == (q->op == OP_WRITE ? WRITE_VERSION : READ_VERSION),
                  "%s request %llu of %u sectors at %llu: sector %u is not its own",
                  q->op == OP_WRITE ? "write" : "read", (unsigned long long)id, q->nsect,
                  (unsigned long long)q->lba, i);
        }
    }
    guarded_free(q->buf, q->len);
    q->buf = NULL;
    free(q->failed);
    q->failed = NULL;
    q->live = 0;
    r->live--;
}

/* The frames the last pump lists as failed, noted in their requests. */
NO_COVERAGE static void take_failures(struct run *r)
{
    struct aoe_eng *e = r->e;
    CHECK(e->nfailed >= 0 && (uint32_t)e->nfailed <= e->max_frames && e->failed_unlisted >= 0 &&
          (e->failed_unlisted == 0 || (uint32_t)e->nfailed == e->max_frames),
          "%d failed frames listed, %d not", e->nfailed, e->failed_unlisted);
    for (int k = 0; k < e->nfailed; k++) {
        const struct aoe_frame_failure *f = &e->failed[k];
        uint64_t id = f->req_id;
        CHECK(id >= FIRST_ID && id < FIRST_ID + (uint64_t)r->nreqs && r->reqs[id - FIRST_ID].live,
              "failed frame of request %llu, not waiting", (unsigned long long)id);
        struct request *q = &r->reqs[id - FIRST_ID];
        uint32_t spf = (uint32_t)e->sectors_per_frame, at = (uint32_t)(f->lba - q->lba);
        CHECK(f->status < 0 && (q->op == OP_FLUSH ? f->lba == 0 && f->nsect == 0
                                : f->lba >= q->lba && at < q->nsect && at % spf == 0 &&
                                  f->nsect == (q->nsect - at < spf ? q->nsect - at : spf)),
              "request %llu of %u sectors at %llu: failed frame of %u at %llu, status %d",
              (unsigned long long)id, q->nsect, (unsigned long long)q->lba, f->nsect,
              (unsigned long long)f->lba, f->status);
        if (!q->first_failure)
            q->first_failure = f->status;
        if (q->op == OP_FLUSH)
            continue;
        if (!q->failed) {
            q->failed = calloc(q->nsect, 1);
            CHECK(q->failed, "out of memory");
        }
        for (uint32_t i = at; i < at + f->nsect; i++) {
            CHECK(!q->failed[i], "request %llu: sector %u failed twice", (unsigned long long)id, i);
            q->failed[i] = 1;
        }
    }
    if (e->failed_unlisted)
        for (int i = 0; i < r->nreqs; i++)
            r->reqs[i].unlisted |= r->reqs[i].live;
}

static void take_completions(struct run *r, int failing_all)
{
    struct aoe_eng *e = r->e;
    CHECK(e->ndone >= 0 && (uint32_t)e->ndone <= e->max_frames, "ndone %d", e->ndone);
    for (int i = 0; i < e->ndone; i++)
        complete(r, e->done[i].req_id, e->done[i].status, failing_all);
}

/* ---- steps --------------------------------------------------------------- */

static void step_submit(struct run *r, struct script *in)
{
    struct aoe_eng *e = r->e;
    int op = next_u8(in) % 3;
    uint16_t n = next_u16(in);
    uint8_t where = next_u8(in);
    uint32_t bits = next_u32(in);
    uint32_t nsect = n & 0x8000 ? n % 1024 : n % 64;
    uint64_t limit = lba_limit(e->lba48);
    uint64_t lba = where % 4 == 0 ? bits & 0xFFFF
                 : where % 4 == 1 ? limit - bits % 256
                 : where % 4 == 2 ? bits
                 : (uint64_t)bits << 24 | where;
    if (op == OP_FLUSH)
        nsect = 0, lba = 0;
    int rc_expected = 0;
    uint32_t frames = 1, spf = (uint32_t)e->sectors_per_frame;
    if (op != OP_FLUSH) {
        if (nsect == 0 || lba > limit || nsect > limit - lba)
            rc_expected = -EINVAL;
        frames = (nsect + spf - 1) / spf;
    }
    if (!rc_expected && (frames > e->nfree_frames || (uint32_t)e->active_requests == e->max_frames))
        rc_expected = -ENOSPC;

    struct request *q = &r->reqs[r->nreqs];
    q->op = op;
    q->lba = lba;
    q->nsect = nsect;
    q->len = (size_t)nsect * SECTOR_SIZE;
    q->buf = NULL;
    if (op != OP_FLUSH) {
        q->buf = guarded_alloc(q->len);
        if (op == OP_WRITE)
            stamp_sectors(q->buf, lba, nsect, WRITE_VERSION);
        else
            memset(q->buf, 0xCC, q->len);
    }
    int rc = aoe_submit(e, FIRST_ID + (uint64_t)r->nreqs, op, lba, nsect, q->buf);
    CHECK(rc == rc_expected, "aoe_submit of %u sectors at %llu: %d, expected %d", nsect,
          (unsigned long long)lba, rc, rc_expected);
    r->nreqs++;
    if (rc == 0) {
        q->live = 1;
        r->live++;
    } else {
        guarded_free(q->buf, q->len);
        q->buf = NULL;
    }
}

static void step_pump(struct run *r)
{
    struct aoe_eng *e = r->e;
    int rc = aoe_pump(e, 0, -1);
    CHECK(rc >= 0 && rc == e->ndone, "aoe_pump returned %d with %d done", rc, e->ndone);
    take_failures(r);
    take_completions(r, 0);
    CHECK(e->nexpired >= 0 && (uint32_t)e->nexpired <= e->max_frames, "nexpired %d",
          e->nexpired);
    r->nexpired = 0;
    for (int i = 0; i < e->nexpired; i++) {
        uint32_t s = e->expired[i];
        CHECK(s < e->max_frames && e->frames[s].state == FRAME_INFLIGHT && e->frames[s].reported,
              "expired slot %u not in flight", s);
        for (int j = 0; j < i; j++)
            CHECK(e->expired[j] != s, "slot %u expired twice in one pump", s);
        int p = aoe_frame_path(e, s);
        CHECK(p >= 0 && p < e->npaths && p == e->frames[s].path, "expired slot %u on path %d", s,
              p);
        r->expired[r->nexpired++] = s;
    }
}

static void step_path(struct run *r, struct script *in)
{
    static const uint32_t times_us[] = { 0, 1, 1000, 250000, 60000000 };
    struct aoe_path *pa = &r->e->paths[next_u8(in) % r->e->npaths];
    uint8_t field = next_u8(in) % 4, value = next_u8(in);
    if (field == 0)
        pa->maxout = value == 255 ? 255 : 1 + value % 64;
    else if (field == 1)
        pa->rto_us = times_us[value % 5];
    else if (field == 2)
        pa->reorder_us = times_us[value % 5];
    else
        pa->enabled = value & 1;
}

static void step_time(struct script *in)
{
    static const int64_t steps_us[] = { 1, 100, 1000, 250001, 60000001 };
    fuzz_now_us += steps_us[next_u8(in) % 5];
}

static void step_resend(struct run *r, struct script *in)
{
    uint8_t which = next_u8(in);
    if (!r->nexpired)
        return;
    if (which == 0) {
        for (int i = r->nexpired; i-- > 0;)
            aoe_resend(r->e, r->expired[i]);
        r->nexpired = 0;
    } else {
        aoe_resend(r->e, r->expired[which % r->nexpired]);
    }
}

static void step_fail_all(struct run *r)
{
    int live = r->live;
    int n = aoe_fail_all(r->e, FAIL_STATUS);
    CHECK(n == live && n == r->e->ndone, "aoe_fail_all failed %d of %d requests", n, live);
    take_completions(r, 1);
    r->nexpired = 0;
}

static void step_answer(struct run *r, struct script *in)
{
    uint8_t which = next_u8(in), m = next_u8(in) % M_COUNT_OF, x = next_u8(in), how = next_u8(in);
    collect_requests(r);
    if (!r->nlogged)
        return;
    uint32_t kept = r->nlogged < LOG_SIZE ? r->nlogged : LOG_SIZE;
    struct logged *l = &r->log[(r->nlogged - 1 - which % kept) % LOG_SIZE];
    size_t len = build_answer(in, l, m, x);
    int k = (l->sock + (how >> 2 & 1)) % r->nsock;
    for (int copies = 1 + how % 3; copies > 0; copies--)
        send_answer(r, k, len);
    l->answered = 1;
}

static void step_answer_all(struct run *r, struct script *in)
{
    int newest_first = next_u8(in) & 1;
    collect_requests(r);
    uint32_t kept = r->nlogged < LOG_SIZE ? r->nlogged : LOG_SIZE;
    for (uint32_t i = 0; i < kept; i++) {
        uint32_t back = newest_first ? i : kept - 1 - i;
        struct logged *l = &r->log[(r->nlogged - 1 - back) % LOG_SIZE];
        if (l->answered)
            continue;
        send_answer(r, l->sock, build_answer(in, l, 0, 0));
        l->answered = 1;
    }
}

/* ---- one input ------------------------------------------------------------ */

NO_COVERAGE static void check_all(struct run *r)
{
    check_engine(r->e, r->seen, &r->mark, 1);
    CHECK(r->e->active_requests == r->live, "%d active requests, %d submitted and not done",
          r->e->active_requests, r->live);
    for (int i = 0; i < r->nreqs; i++)
        if (r->reqs[i].live && r->reqs[i].buf)
            guarded_check(r->reqs[i].buf, r->reqs[i].len);
}

static int setup(struct run *r, struct script *in)
{
    int frames = 1 + next_u16(in) % SCRIPT_FRAMES;
    uint16_t gen_seed = next_u16(in);
    if (gen_seed & 1)
        gen_seed = GEN_MAX - 2 - (gen_seed >> 1) % 4;
    uint8_t how = next_u8(in), spf = next_u8(in);
    struct aoe_eng *e = r->e = aoe_eng_new(3, 7, frames, gen_seed);
    CHECK(e, "aoe_eng_new(%d) failed", frames);
    e->lba48 = how & 1;
    e->flush_cmd = (how & 1) != !!(how & 2) ? ATA_CMD_FLUSH_EXT : ATA_CMD_FLUSH;
    e->sectors_per_frame = spf == 255 ? MAX_SPF : 1 + spf % 17;
    for (int k = 0; k < (how & 8 ? 2 : 1); k++, r->nsock++)
        if (path_sockets(r->sv[k], how & 4 ? ATA_HDR_LEN + e->sectors_per_frame * SECTOR_SIZE
                                           : 0) < 0)
            return -1;
    int npaths = 1 + (how >> 4 & 3) % 3;
    for (int p = 0; p < npaths; p++) {
        uint8_t v = next_u8(in);
        int k = v & 1 ? r->nsock - 1 : 0, mac = v >> 1 & 3;
        for (int tries = 0; tries < 3; tries++, mac++) {   /* one path per socket and MAC */
            int taken = 0;
            for (int q = 0; q < e->npaths; q++)
                taken |= e->paths[q].fd == r->sv[k][0] &&
                         memcmp(e->paths[q].dst, target_macs[mac % 3], 6) == 0;
            if (!taken)
                break;
        }
        int i = aoe_eng_add_path(e, r->sv[k][0], initiator_macs[k], target_macs[mac % 3]);
        CHECK(i >= 0, "aoe_eng_add_path: %d", i);
        e->paths[i].maxout = 1 + (v >> 3);
        e->paths[i].rto_us = e->paths[i].reorder_us = 60000000;
    }
    r->seen = calloc(e->max_frames, sizeof(*r->seen));
    CHECK(r->seen, "out of memory");
    return 0;
}

static void teardown(struct run *r)
{
    if (r->e) {
        step_fail_all(r);
        check_all(r);
        CHECK(r->live == 0 && r->e->active_requests == 0, "%d requests left", r->live);
        aoe_eng_free(r->e);
    }
    for (int k = 0; k < r->nsock; k++)
        for (int i = 0; i < 2; i++)
            close(r->sv[k][i]);
    free(r->seen);
    free(r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct script in = { data, size };
    struct run *r = calloc(1, sizeof(*r));
    CHECK(r, "out of memory");
    fuzz_now_us = 1000000000000;
    if (setup(r, &in) == 0) {
        check_all(r);
        for (int step = 0; step < MAX_STEPS && !script_done(&in); step++) {
            switch (next_u8(&in) % 8) {
            case 0: step_submit(r, &in); break;
            case 1: step_pump(r); break;
            case 2: step_path(r, &in); break;
            case 3: step_time(&in); break;
            case 4: step_resend(r, &in); break;
            case 5: step_fail_all(r); break;
            case 6: step_answer(r, &in); break;
            case 7: step_answer_all(r, &in); break;
            }
            check_all(r);
        }
    }
    teardown(r);
    return 0;
}
