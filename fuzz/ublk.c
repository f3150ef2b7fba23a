/*
 * ublk.c - libFuzzer target: the ublk bridge (aoe_eng_bridge, ublk_bridge_take,
 * ublk_bridge_submit, ublk_bridge_settle over ublk_queue_reap, ublk_queue_commit and
 * ublk_queue_prep) without the kernel.
 *
 * The queue talks to the kernel only through its io_uring: the SQ and CQ rings
 * in shared memory and io_uring_enter.  Here the rings are the harness's
 * memory and syscall() is fuzz_syscall, a fake kernel: its io_uring_enter
 * consumes the SQEs the queue published (FETCH_REQ once per tag at the start,
 * then COMMIT_AND_FETCH_REQ), checks each names a tag it had handed a request
 * and that the result is right, and the script posts new requests as CQEs
 * with the tag's ublksrv_io_desc filled in.  The engine's paths are datagram
 * socketpairs whose far ends the script plays as the target, over a disk
 * model; failed and handed-over requests are completed as UblkBackend does in
 * aoe.py.  The engine runs on the script's clock (harness.h).
 *
 * Checked: every request the fake kernel posted is committed exactly once, at
 * the latest when the script ends and the target answers everything; with its
 * byte count only if it could and did succeed (no error answer for it, no
 * aoe_fail_all, no refused submission), else with aoe.py's -EIO or
 * -EOPNOTSUPP; a READ that succeeded holds the disk model's sectors, a WRITE's
 * buffer never changes; no commit for a tag without a request; every frame
 * the target sees belongs, by its tag, to a request the engine holds for a
 * posted ublk request of the same op, covers its own part of it and, for a
 * write, carries its data; writes reach the disk only inside the device and
 * never for a read-only one; the engine's lists (check_engine) after every pump.
 *
 * The fake kernel keeps the driver's contract: a READ or WRITE moves at most
 * max_sectors (what the tag's buffer holds); other ops may name any range.
 * Requests in flight never overlap a write in flight, as the disk model could
 * not say which data a read should see.
 *
 * Input (bytes past the end read as 0; u16/u32 big-endian):
 *   u8  depth       1 + x % 16 tags
 *   u8  spf         sectors per frame 1 + x % 17
 *   u8  flags       bit 0 read-only; bit 1 LBA28 (no lba48); bit 2 the pump waits on the
 *                   ring fd (else extra_fd -1); bit 3 the bridge starts off (target down);
 *                   bits 4-5 1 + x % 3 paths; bit 6 the other flush command; bit 7 a
 *                   small engine (else aoe.py's frames_needed)
 *   u8  maxout      window per path 1 + x % 16
 *   u8  frames      the small engine's slots: 1 + x % 32
 *   u8  max_sectors 1 + x % 64: the largest READ/WRITE, and the tag buffers' size
 *   u8  size        x % 4: 0, 1 u16 % 4097 sectors; 2 2^28 - 2048 + u16 % 4096; 3 2^40 + u16
 *   u16 size value
 *   u16 gen_seed
 *   u8  rto         rto_us = 1000 * (1 + x % 250); reorder_us = rto_us / 2
 *   then steps, an opcode byte (% 8) each:
 *     0, 1 post      u8 tag (the first waiting one from x % depth on), u8 op (x % 8: 0, 1 READ,
 *                    2, 3 WRITE, 4 FLUSH, 5 DISCARD, 6 WRITE_ZEROES, 7 op x >> 3),
 *                    u8 flags (bit 0 FUA, bit 1 NOUNMAP, bit 2 FAILFAST_DEV; bits 4-7 the
 *                    CQE: below 12 a request, 12 ABORT, 13 -EIO, 14 NEED_GET_DATA,
 *                    15 a stray CQE for a dead tag or none), u8 where (x % 4: 0 near the start,
 *                    1 near the end, 2 past the end (bit 2: far past), 3 anywhere; bit 4:
 *                    a special length), u32 v, u8 length
 *     2 answer       u8 how many held frames (x % 32, 0 all; bit 7 newest first), u8 chaos
 *                    (0: all right), u8 seed
 *     3 pump         aoe_pump, then completions, resends and handed requests as aoe.py
 *     4 time         u8: the clock moves x ms (0: past rto_us), then a pump
 *     5 fail         aoe_fail_all (the engine gave up), then as aoe.py
 *     6 admit        u8: bit 0 set: the bridge's admission flips (the target goes down or
 *                    comes back); clear: a device of at most 2 * WINDOW sectors gets
 *                    (x >> 1) * 33 (UblkBackend.resize)
 *     7 replay       u8: an answer sent before goes again
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <sys/eventfd.h>
#include <unistd.h>                 /* the real syscall()'s declaration, before the rename */

long fuzz_syscall(long nr, ...);
#define syscall fuzz_syscall        /* the ublk queue's io_uring_enter goes to the fake kernel */
#define clock_gettime fuzz_clock_gettime    /* the engine runs on the script's clock */
#include "../_aoeio.c"
#include "harness.h"

#define MAX_DEPTH       16
#define MAX_REQ         64          /* max_sectors at most */
#define WINDOW          4096        /* sectors modelled at each end of a large device */
#define MAX_HELD        256
#define NPATHS_MAX      3
#define NSOCK           2
#define REPLAYS         16
#define CDEV_FD         1000        /* the fake /dev/ublkcN: only ever named in SQEs */
#define ANSWER_MAX      (ATA_HDR_LEN + 17 * SECTOR_SIZE)
#define DRAIN_ROUNDS    4096        /* a window of one frame takes a round per frame */

enum { TAG_FRESH, TAG_WAITING, TAG_POSTED, TAG_DEAD };

struct tag {
    int state;                      /* TAG_*, as the fake kernel sees it */
    uint32_t serial;                /* the posted request: stamps its write data */
    uint8_t op;
    uint32_t flags, nr;
    uint64_t start;
    int taken;                      /* a pump ran since it was posted: the bridge reaped it */
    int taken_up;                   /* the bridge admitted requests then */
    uint64_t sectors;               /* ... and the device's size */
    int eio_ok;                     /* it may fail: an error answer, aoe_fail_all, a refused
                                     * submission */
    int own;                        /* submitted by the harness as aoe.py does (handed over) */
    int result_due;                 /* its result is among this round's commits */
};

/* A request frame the target read and has not answered yet. */
struct held {
    uint8_t hdr[ATA_HDR_LEN];
    int sock, tag, write, read;
    uint32_t serial;
    uint64_t lba;
    uint8_t count;
};

struct replay {
    uint8_t frame[ANSWER_MAX];
    size_t len;
    int sock;
};

struct fake_ring {
    unsigned sq_head, sq_tail, sq_mask, sq_array[MAX_DEPTH];
    unsigned cq_head, cq_tail, cq_mask;
    struct io_uring_cqe cqes[2 * MAX_DEPTH];
    _Alignas(64) char sqes[MAX_DEPTH * 64];
};

struct run {
    struct aoe_eng *e;
    struct ublk_queue q;
    struct fake_ring ring;
    struct ublksrv_io_desc descs[MAX_DEPTH];
    uint8_t qstate[MAX_DEPTH];
    struct tag tags[MAX_DEPTH];
    int depth, readonly, lba48, extra, spf, max_sectors;
    uint64_t sectors;
    uint32_t rto_us, serial;
    int sv[NSOCK][2];               /* [k][0] the engine's, [k][1] the target's */
    int path_sock[NPATHS_MAX];
    struct held held[MAX_HELD];
    int nheld;
    struct replay replays[REPLAYS];
    int nreplays;
    uint16_t commit_tags[MAX_DEPTH];
    int32_t commit_results[MAX_DEPTH];
    int ncommit;
    uint32_t *seen, mark;
    uint8_t disk[2 * WINDOW][SECTOR_SIZE];
    uint8_t written[2 * WINDOW];
    uint64_t commits, posted;
};

static struct run run;
static int ring_fd = -1;            /* an eventfd: readable while CQEs wait, as a ring's fd */

static const uint8_t initiator_mac[6] = { 2, 0, 0, 0, 0, 1 };
static const uint8_t target_macs[NPATHS_MAX][6] = {
    { 2, 0, 0, 0, 1, 1 }, { 2, 0, 0, 0, 1, 2 }, { 2, 0, 0, 0, 1, 3 } };

/* ---- the disk model ---------------------------------------------------- */

/* Where sector lba of the device is kept: all of a small device, the first and last
 * WINDOW sectors of a large one (requests stay there). */
static int disk_index(const struct run *r, uint64_t lba)
{
    if (r->sectors <= 2 * WINDOW || lba < WINDOW)
        return (int)lba;
    CHECK(lba >= r->sectors - WINDOW && lba < r->sectors, "sector %llu is not modelled",
          (unsigned long long)lba);
    return (int)(WINDOW + lba - (r->sectors - WINDOW));
}

/* Sector lba as the disk holds it: a stamp of version 0 until written. */
static void disk_read(const struct run *r, uint64_t lba, uint8_t *out)
{
    int i = disk_index(r, lba);
    if (r->written[i])
        memcpy(out, r->disk[i], SECTOR_SIZE);
    else
        stamp_sector(out, lba, 0);
}

NO_COVERAGE static int disk_holds(const struct run *r, uint64_t lba, const uint8_t *sector)
{
    int i = disk_index(r, lba);
    uint64_t version;
    if (r->written[i])
        return memcmp(sector, r->disk[i], SECTOR_SIZE) == 0;
    return stamp_read(sector, lba, &version) && version == 0;
}

/* ---- the fake kernel ------------------------------------------------------ */

static uint8_t *tag_buf(struct run *r, int t)
{
    return (uint8_t *)r->q.bufs + (size_t)t * r->q.buf_size;
}

static int in_device(uint64_t sectors, uint64_t start, uint64_t nr)
{
    return nr && start <= sectors && nr <= sectors - start;
}

/* A commit's result against what aoe.py's answer to the request must be. */
NO_COVERAGE static void check_result(struct run *r, int t, int32_t result)
{
    struct tag *g = &r->tags[t];
    CHECK(g->state == TAG_POSTED && g->taken, "tag %d committed without a request (state %d)",
          t, g->state);
    int32_t want, may_fail = g->eio_ok;
    if (!g->taken_up) {
        want = -EIO, may_fail = 0;          /* the target is down */
    } else if (g->op == UBLK_IO_OP_FLUSH) {
        want = 0;
    } else if (g->op != UBLK_IO_OP_READ && g->op != UBLK_IO_OP_WRITE) {
        want = -EOPNOTSUPP, may_fail = 0;
    } else if ((g->op == UBLK_IO_OP_WRITE && r->readonly) ||
               !in_device(g->sectors, g->start, g->nr) ||
               (!r->lba48 && g->start + g->nr > 1ull << 28)) {
        want = -EIO, may_fail = 0;
    } else {
        want = (int32_t)(g->nr * SECTOR_SIZE);
    }
    CHECK(result == want || (may_fail && result == -EIO), "tag %d (op %u, sectors %llu+%u): "
          "result %d, expected %d%s", t, g->op, (unsigned long long)g->start, g->nr, result,
          want, may_fail ? " or -EIO" : "");
    if (result < 0 || want <= 0)
        return;
    const uint8_t *buf = tag_buf(r, t);
    for (uint32_t i = 0; i < g->nr; i++) {
        const uint8_t *sector = buf + (size_t)i * SECTOR_SIZE;
        uint64_t version;
        if (g->op == UBLK_IO_OP_READ)
            CHECK(disk_holds(r, g->start + i, sector), "tag %d read sector %llu: not the disk's",
                  t, (unsigned long long)(g->start + i));
        else
            CHECK(stamp_read(sector, g->start + i, &version) && version == g->serial,
                  "tag %d: write buffer changed at sector %u", t, i);
    }
}

NO_COVERAGE static void consume_sqe(struct run *r, const struct io_uring_sqe *sqe)
{
    const struct ublksrv_io_cmd *cmd = (const struct ublksrv_io_cmd *)sqe->cmd;
    CHECK(sqe->opcode == IORING_OP_URING_CMD && sqe->fd == CDEV_FD, "SQE opcode %u fd %d",
          sqe->opcode, sqe->fd);
    CHECK(sqe->user_data < (uint64_t)r->depth && cmd->tag == sqe->user_data && cmd->q_id == 0,
          "SQE for tag %u (user_data %llu, queue %u)", cmd->tag,
          (unsigned long long)sqe->user_data, cmd->q_id);
    int t = cmd->tag;
    CHECK(cmd->addr == (uint64_t)(uintptr_t)tag_buf(r, t), "tag %d's buffer address", t);
    struct tag *g = &r->tags[t];
    if (sqe->cmd_op == UBLK_U_IO_FETCH_REQ) {
        CHECK(g->state == TAG_FRESH, "FETCH_REQ for tag %d in state %d", t, g->state);
    } else {
        CHECK(sqe->cmd_op == UBLK_U_IO_COMMIT_AND_FETCH_REQ, "SQE command %#x", sqe->cmd_op);
        check_result(r, t, cmd->result);
        r->commits++;
    }
    g->state = TAG_WAITING;
}

long fuzz_syscall(long nr, ...)
{
    struct run *r = &run;
    va_list ap;
    va_start(ap, nr);
    int fd = va_arg(ap, int);
    unsigned to_submit = va_arg(ap, unsigned), wait_nr = va_arg(ap, unsigned);
    va_end(ap);
    CHECK(nr == __NR_io_uring_enter && fd == r->q.ring.fd, "syscall %ld on fd %d", nr, fd);
    CHECK(wait_nr == 0, "the bridge waits for %u CQEs", wait_nr);
    unsigned tail = __atomic_load_n(&r->ring.sq_tail, __ATOMIC_ACQUIRE);
    CHECK(tail - r->ring.sq_head == to_submit && to_submit <= r->q.ring.sq_entries,
          "%u SQEs to submit, %u published", to_submit, tail - r->ring.sq_head);
    for (unsigned head = r->ring.sq_head; head != tail; head++) {
        unsigned idx = r->ring.sq_array[head & r->ring.sq_mask];
        CHECK(idx < r->q.ring.sq_entries, "SQ array entry %u", idx);
        consume_sqe(r, (const struct io_uring_sqe *)(r->ring.sqes + (size_t)idx * 64));
    }
    __atomic_store_n(&r->ring.sq_head, tail, __ATOMIC_RELEASE);
    return (long)to_submit;
}

static void post_cqe(struct run *r, uint64_t user_data, int32_t res)
{
    unsigned entries = r->ring.cq_mask + 1;
    CHECK(r->ring.cq_tail - r->ring.cq_head < entries, "CQ overflow");
    struct io_uring_cqe *cqe = &r->ring.cqes[r->ring.cq_tail & r->ring.cq_mask];
    memset(cqe, 0, sizeof(*cqe));
    cqe->user_data = user_data;
    cqe->res = res;
    __atomic_store_n(&r->ring.cq_tail, r->ring.cq_tail + 1, __ATOMIC_RELEASE);
}

static unsigned pow2_at_least(unsigned n)
{
    unsigned p = 1;
    while (p < n)
        p <<= 1;
    return p;
}

/* The queue as ublk_queue_open leaves it, on the fake ring. */
static void queue_open(struct run *r, unsigned buf_size)
{
    struct ublk_queue *q = &r->q;
    memset(q, 0, sizeof(*q));
    memset(&r->ring, 0, sizeof(r->ring));
    unsigned sq_entries = pow2_at_least((unsigned)r->depth);
    q->ring.fd = ring_fd;
    q->ring.sqe_size = 64;
    q->ring.sq_entries = sq_entries;
    q->ring.sq_head = &r->ring.sq_head;
    q->ring.sq_tail = &r->ring.sq_tail;
    q->ring.sq_mask = &r->ring.sq_mask;
    q->ring.sq_array = r->ring.sq_array;
    q->ring.cq_head = &r->ring.cq_head;
    q->ring.cq_tail = &r->ring.cq_tail;
    q->ring.cq_mask = &r->ring.cq_mask;
    q->ring.cqes = r->ring.cqes;
    q->ring.sqes = r->ring.sqes;
    r->ring.sq_mask = sq_entries - 1;
    r->ring.cq_mask = pow2_at_least(2 * (unsigned)r->depth) - 1;
    q->cdev_fd = CDEV_FD;
    q->depth = r->depth;
    q->buf_size = buf_size;
    q->descs = r->descs;
    q->bufs_len = (size_t)r->depth * buf_size;
    q->bufs = (char *)guarded_alloc(q->bufs_len);
    memset(q->bufs, 0, q->bufs_len);
    q->state = r->qstate;
    memset(q->state, UBLK_TAG_DEAD, (size_t)r->depth);
}

/* ---- aoe.py's side: UblkBackend.completed, _start and intake ---------------- */

static void add_result(struct run *r, int t, int32_t result)
{
    CHECK(!r->tags[t].result_due, "tag %d completed twice", t);
    r->tags[t].result_due = 1;
    r->commit_tags[r->ncommit] = (uint16_t)t;
    r->commit_results[r->ncommit++] = result;
}

/* An engine request ended: only failures of bridged requests come back. */
NO_COVERAGE static void completed(struct run *r, uint64_t id, int32_t status)
{
    int t = (int)(id & 0xFFFF);
    CHECK(t < r->depth, "completion %#llx of no tag", (unsigned long long)id);
    struct tag *g = &r->tags[t];
    CHECK(g->state == TAG_POSTED && g->taken, "completion %#llx of no request",
          (unsigned long long)id);
    if (id & BRIDGE_ID) {
        CHECK(status != 0 && !g->own && id == (BRIDGE_ID | (uint64_t)g->op << 16 | t),
              "bridged completion %#llx status %d", (unsigned long long)id, status);
        add_result(r, t, -EIO);
    } else {
        CHECK(g->own && id == (uint64_t)t, "completion %#llx of a request not submitted so",
              (unsigned long long)id);
        int moves = g->op == UBLK_IO_OP_READ || g->op == UBLK_IO_OP_WRITE;
        add_result(r, t, status ? -EIO : moves ? (int32_t)(g->nr * SECTOR_SIZE) : 0);
    }
}

/* A request the bridge handed over, as UblkBackend._start takes it. */
NO_COVERAGE static void start_handed(struct run *r, const struct ublk_req *u)
{
    struct aoe_eng *e = r->e;
    int t = u->tag;
    CHECK(t < r->depth, "handed tag %d of %d", t, r->depth);
    struct tag *g = &r->tags[t];
    CHECK(g->state == TAG_POSTED && g->taken && !g->own && !g->result_due,
          "handed tag %d in state %d", t, g->state);
    CHECK(u->op == g->op && u->flags == g->flags && u->nr_sectors == g->nr &&
          u->start_sector == g->start, "handed tag %d: not the request posted", t);
    if (!e->bridge_on || (u->op == UBLK_IO_OP_WRITE && r->readonly)) {
        add_result(r, t, -EIO);
        return;
    }
    int rc;
    if (u->op == UBLK_IO_OP_FLUSH) {
        rc = aoe_submit(e, (uint64_t)t, OP_FLUSH, 0, 0, NULL);
    } else if (u->op != UBLK_IO_OP_READ && u->op != UBLK_IO_OP_WRITE) {
        add_result(r, t, -EOPNOTSUPP);
        return;
    } else if (!in_device(r->sectors, u->start_sector, u->nr_sectors) ||
               (!r->lba48 && u->start_sector + u->nr_sectors > 0x0FFFFFFF)) {
        rc = -EINVAL;                       /* Engine.submit's bounds */
    } else {
        rc = aoe_submit(e, (uint64_t)t, u->op == UBLK_IO_OP_READ ? OP_READ : OP_WRITE,
                        u->start_sector, u->nr_sectors, tag_buf(r, t));
    }
    if (rc < 0) {
        g->eio_ok = 1;                      /* the engine is full, or Python's bounds */
        add_result(r, t, -EIO);
        return;
    }
    g->own = 1;
}

static void commit_results(struct run *r)
{
    if (!r->ncommit)
        return;
    int rc = ublk_queue_commit(&r->q, r->ncommit, r->commit_tags, r->commit_results);
    CHECK(rc == r->ncommit, "ublk_queue_commit: %d of %d", rc, r->ncommit);
    for (int i = 0; i < r->ncommit; i++) {
        struct tag *g = &r->tags[r->commit_tags[i]];
        CHECK(g->state == TAG_WAITING, "tag %u's commit did not reach the kernel",
              r->commit_tags[i]);
        g->result_due = 0;
    }
    r->ncommit = 0;
}

/* ---- the target -------------------------------------------------------------- */

/* A request frame from the engine: checked, attributed, its write applied, held. */
NO_COVERAGE static void target_take(struct run *r, int sock, const uint8_t *h, size_t len)
{
    struct aoe_eng *e = r->e;
    CHECK(len >= ETH_ZLEN, "a %zu-byte frame", len);
    int path = -1;
    for (int p = 0; p < e->npaths; p++)
        if (r->path_sock[p] == sock && memcmp(h, target_macs[p], 6) == 0)
            path = p;
    CHECK(path >= 0 && memcmp(h + 6, initiator_mac, 6) == 0, "a frame to a MAC of no path");
    CHECK(h[12] == 0x88 && h[13] == 0xA2 && h[14] == AOE_HVER && h[15] == 0 &&
          h[16] == 0 && h[17] == 3 && h[18] == 7 && h[19] == AOECMD_ATA && h[25] == 0 &&
          h[34] == 0 && h[35] == 0, "a malformed request header");
    uint32_t tag = be32(h + 20), s = tag_slot(tag), gen = tag >> 16 & GEN_MAX;
    CHECK((tag & ENGINE_TAG) == ENGINE_TAG && !(__builtin_popcount(tag) & 1) && gen &&
          s < e->max_frames, "request tag %#x", tag);
    /* Read right after the pump that sent it: its slot still holds this transmission. */
    const struct aoe_frame *f = &e->frames[s];
    CHECK(f->state == FRAME_INFLIGHT && f->last.gen == gen, "tag %#x: slot %u in state %d, "
          "generation %u", tag, s, f->state, f->last.gen);
    uint64_t id = e->reqs[f->req].id;
    int t = (int)(id & 0xFFFF);
    CHECK(t < r->depth, "a frame of request %#llx, of no tag", (unsigned long long)id);
    struct tag *g = &r->tags[t];
    CHECK(g->state == TAG_POSTED && g->taken &&
          (id & BRIDGE_ID ? !g->own && id == (BRIDGE_ID | (uint64_t)g->op << 16 | t)
                              : g->own && id == (uint64_t)t),
          "a frame of request %#llx, of no ublk request", (unsigned long long)id);
    uint8_t cmd = h[27], count = h[26];
    int write = g->op == UBLK_IO_OP_WRITE, read = g->op == UBLK_IO_OP_READ;
    uint64_t lba = 0;
    if (g->op == UBLK_IO_OP_FLUSH) {
        CHECK(cmd == e->flush_cmd && count == 0 && len == ETH_ZLEN && h[24] == (r->lba48 ?
              AOEAFL_EXT : 0), "tag %d's flush frame: command %#x count %u", t, cmd, count);
    } else {
        CHECK(read || write, "a frame for tag %d's op %u", t, g->op);
        uint8_t want = r->lba48 ? (write ? ATA_CMD_PIO_WRITE_EXT : ATA_CMD_PIO_READ_EXT)
                                : (write ? ATA_CMD_PIO_WRITE : ATA_CMD_PIO_READ);
        CHECK(cmd == want && h[24] == ((r->lba48 ? AOEAFL_EXT : 0) | (write ? AOEAFL_WRITE : 0)),
              "tag %d: command %#x aflags %#x", t, cmd, h[24]);
        CHECK(r->lba48 || ((h[31] & 0xF0) == 0xE0 && h[32] == 0 && h[33] == 0),
              "an LBA28 frame's device register %#x", h[31]);
        lba = header_lba(h);
        uint64_t end = g->start + g->nr;
        CHECK(lba >= g->start && (lba - g->start) % (uint64_t)r->spf == 0 && lba < end &&
              count == (end - lba < (uint64_t)r->spf ? end - lba : (uint64_t)r->spf),
              "tag %d (sectors %llu+%u): a frame for %llu+%u", t, (unsigned long long)g->start,
              g->nr, (unsigned long long)lba, count);
        CHECK(f->data == tag_buf(r, t) + (lba - g->start) * SECTOR_SIZE,
              "tag %d: a frame's data not in its buffer", t);
        CHECK(in_device(g->sectors, lba, count) && (r->lba48 || lba + count <= 1ull << 28),
              "a frame for sectors %llu+%u outside the device", (unsigned long long)lba, count);
        CHECK(len == (write ? ATA_HDR_LEN + (size_t)count * SECTOR_SIZE : ETH_ZLEN),
              "a %zu-byte frame for %u sectors", len, count);
        if (write) {
            CHECK(!r->readonly, "a write to a read-only device");
            for (unsigned i = 0; i < count; i++) {
                const uint8_t *sector = h + ATA_HDR_LEN + (size_t)i * SECTOR_SIZE;
                uint64_t version;
                CHECK(stamp_read(sector, lba + i, &version) && version == g->serial,
                      "tag %d: write data for sector %llu is not its own", t,
                      (unsigned long long)(lba + i));
                int at = disk_index(r, lba + i);
                memcpy(r->disk[at], sector, SECTOR_SIZE);
                r->written[at] = 1;
            }
        }
    }
    if (r->nheld == MAX_HELD)
        return;                             /* lost on the way */
    struct held *hd = &r->held[r->nheld++];
    memcpy(hd->hdr, h, ATA_HDR_LEN);
    hd->lba = lba;
    hd->sock = sock;
    hd->tag = t;
    hd->serial = g->serial;
    hd->write = write;
    hd->read = read;
    hd->count = count;
}

static void target_receive(struct run *r)
{
    static uint8_t frame[ATA_HDR_LEN + 256 * SECTOR_SIZE];
    for (int k = 0; k < NSOCK; k++) {
        ssize_t n;
        while ((n = recv(r->sv[k][1], frame, sizeof(frame), MSG_DONTWAIT)) >= 0)
            target_take(r, k, frame, (size_t)n);
        CHECK(errno == EAGAIN, "recv: %s", strerror(errno));
    }
}

enum { ANSWER_OK, ANSWER_ATA_ERROR, ANSWER_AOE_ERROR, ANSWER_DF, ANSWER_DROP, ANSWER_TWICE,
       ANSWER_KEEP, ANSWER_JUNK };

/* Build the answer to held frame hd as `how` says; returns its length. */
static size_t build_answer(struct run *r, const struct held *hd, int how, uint32_t junk,
                           uint8_t *a)
{
    answer_header(a, hd->hdr);
    size_t len = ETH_ZLEN;
    memset(a + ATA_HDR_LEN, 0, ETH_ZLEN - ATA_HDR_LEN);
    if (how == ANSWER_ATA_ERROR) {
        a[27] = 0x41;                       /* DRDY | ERR */
        a[25] = ATA_ABORTED;
        a[26] = hd->count;
    } else if (how == ANSWER_AOE_ERROR) {
        a[14] |= AOEFL_ERR;
        a[15] = 2;                          /* bad argument */
    } else if (how == ANSWER_DF) {
        a[27] = 0x40 | ATA_DF;
    } else if (hd->read) {
        for (unsigned i = 0; i < hd->count; i++)
            disk_read(r, hd->lba + i, a + ATA_HDR_LEN + (size_t)i * SECTOR_SIZE);
        len = ATA_HDR_LEN + (size_t)hd->count * SECTOR_SIZE;
    }
    if (how != ANSWER_JUNK)
        return len;
    /* An answer the engine must drop, whatever it is waiting for. */
    switch (junk % 9) {
    case 0:
        a[23] ^= 1;                         /* parity broken */
        break;
    case 1:
        a[14] &= (uint8_t)~AOEFL_RSP;
        break;
    case 2:
        a[17] ^= 1;                         /* another shelf */
        break;
    case 3:
        a[11] ^= 0x80;                      /* from no path's MAC */
        break;
    case 4:
        a[24] ^= AOEAFL_WRITE;              /* aflags not echoed */
        break;
    case 5:
        a[28] ^= 1;                         /* LBA not echoed */
        break;
    case 6:
        a[26] = (uint8_t)(hd->count + 1);   /* more sectors than asked */
        break;
    case 7:
        if (hd->read && hd->count) {        /* read data cut short */
            len -= 1 + junk % SECTOR_SIZE;
            break;
        }
        /* fall through */
    default:
        len = ATA_HDR_LEN - 1 - junk % 12;  /* header cut */
    }
    return len;
}

/* Send an answer on the socket its frame came by; 0 if the socket is full. */
static int send_answer(struct run *r, int sock, const uint8_t *a, size_t len, int keep)
{
    if (send(r->sv[sock][1], a, len, MSG_DONTWAIT) < 0) {
        CHECK(errno == EAGAIN || errno == ENOBUFS, "send: %s", strerror(errno));
        return 0;
    }
    if (keep) {
        struct replay *rp = &r->replays[r->nreplays++ % REPLAYS];
        memcpy(rp->frame, a, len);
        rp->len = len;
        rp->sock = sock;
    }
    return 1;
}

/* Answer up to n held frames (0: all), chaos 0 all right, else mixed as the seed says. */
static void target_answer(struct run *r, int n, int newest_first, uint8_t chaos, uint8_t seed)
{
    static uint8_t a[ANSWER_MAX];
    uint32_t x = (uint32_t)chaos << 8 ^ seed ^ 0x9E3779B9u;
    struct held kept[MAX_HELD];
    int nkept = 0, done = 0;
    if (!n || n > r->nheld)
        n = r->nheld;
    for (int k = 0; k < r->nheld; k++) {
        int i = newest_first ? r->nheld - 1 - k : k;
        struct held *hd = &r->held[i];
        if (done == n) {
            kept[nkept++] = *hd;
            continue;
        }
        done++;
        uint32_t roll = chaos ? xorshift32(&x) : 0;
        static const uint8_t hows[16] = {
            ANSWER_OK, ANSWER_OK, ANSWER_OK, ANSWER_OK, ANSWER_OK, ANSWER_OK, ANSWER_OK,
            ANSWER_ATA_ERROR, ANSWER_AOE_ERROR, ANSWER_DF, ANSWER_DROP, ANSWER_TWICE,
            ANSWER_KEEP, ANSWER_JUNK, ANSWER_JUNK, ANSWER_JUNK };
        int how = hows[roll & (chaos & 0x0F)];
        if (how == ANSWER_DROP)
            continue;
        if (how == ANSWER_KEEP) {
            kept[nkept++] = *hd;
            continue;
        }
        size_t len = build_answer(r, hd, how, roll >> 8, a);
        if (!send_answer(r, hd->sock, a, len, how != ANSWER_JUNK)) {
            kept[nkept++] = *hd;                    /* the engine's socket is full */
            continue;
        }
        if (how == ANSWER_JUNK) {
            kept[nkept++] = *hd;                    /* still to be answered */
            continue;
        }
        struct tag *g = &r->tags[hd->tag];
        if (how != ANSWER_OK && how != ANSWER_TWICE && g->serial == hd->serial &&
            g->state == TAG_POSTED)
            g->eio_ok = 1;
        if (how == ANSWER_TWICE)
            send_answer(r, hd->sock, a, len, 0);
    }
    /* the kept ones in their old order */
    if (newest_first)
        for (int i = 0, j = nkept - 1; i < j; i++, j--) {
            struct held tmp = kept[i];
            kept[i] = kept[j];
            kept[j] = tmp;
        }
    memcpy(r->held, kept, (size_t)nkept * sizeof(kept[0]));
    r->nheld = nkept;
}

/* ---- rounds -------------------------------------------------------------------- */

/* What aoe.py does with what a pump (or aoe_fail_all) left in done[]. */
static void take_completions(struct run *r)
{
    for (int i = 0; i < r->e->ndone; i++)
        completed(r, r->e->done[i].req_id, r->e->done[i].status);
}

static void pump(struct run *r)
{
    struct aoe_eng *e = r->e;
    for (int t = 0; t < r->depth; t++)
        if (r->tags[t].state == TAG_POSTED && !r->tags[t].taken) {
            r->tags[t].taken = 1;           /* the pump's ublk_bridge_take reaps them all */
            r->tags[t].taken_up = e->bridge_on;
            r->tags[t].sectors = r->sectors;
        }
    uint64_t one = 1;
    if (r->ring.cq_head != r->ring.cq_tail)
        CHECK(write(ring_fd, &one, sizeof(one)) == sizeof(one), "eventfd");
    int rc = aoe_pump(e, 0, r->extra ? ring_fd : -1);
    CHECK(rc >= 0, "aoe_pump: %s", strerror(-rc));
    CHECK(read(ring_fd, &one, sizeof(one)) == sizeof(one) || errno == EAGAIN, "eventfd");
    CHECK(r->ring.cq_head == r->ring.cq_tail, "CQEs left in the ring after a pump");
    CHECK(e->bridge_error == 0, "bridge error %d", e->bridge_error);
    take_completions(r);
    for (int i = e->nexpired; i-- > 0;)             /* Engine.poll: in reverse */
        CHECK(aoe_resend(e, e->expired[i]) == 0, "aoe_resend of expired slot %u", e->expired[i]);
    for (int i = 0; i < e->nhanded; i++)
        start_handed(r, &e->ublk_handed[i]);
    commit_results(r);
    target_receive(r);
    check_engine(e, r->seen, &r->mark, 1);
}

static int posted_open(const struct run *r)
{
    for (int t = 0; t < r->depth; t++)
        if (r->tags[t].state == TAG_POSTED)
            return 1;
    return 0;
}

/* Whether [start, start + nr) overlaps a READ or WRITE in flight, either a write. */
static int clashes(const struct run *r, uint8_t op, uint64_t start, uint32_t nr)
{
    for (int t = 0; t < r->depth; t++) {
        const struct tag *g = &r->tags[t];
        if (g->state != TAG_POSTED || (g->op != UBLK_IO_OP_READ && g->op != UBLK_IO_OP_WRITE) ||
            (g->op != UBLK_IO_OP_WRITE && op != UBLK_IO_OP_WRITE))
            continue;
        if (start < g->start + g->nr && g->start < start + nr)
            return 1;
    }
    return 0;
}

static void post(struct run *r, struct script *in)
{
    uint8_t pick = next_u8(in), opsel = next_u8(in), flagsel = next_u8(in), where = next_u8(in);
    uint32_t v = next_u32(in);
    uint8_t length = next_u8(in);
    int kind = flagsel >> 4;
    if (kind == 15) {                               /* a CQE for a dead tag or none: ignored */
        int t = pick % r->depth;
        if (r->tags[t].state != TAG_DEAD)
            t = r->depth + (pick & 0x7F);
        if (r->ring.cq_tail - r->ring.cq_head < r->ring.cq_mask + 1 - (unsigned)r->depth)
            post_cqe(r, (uint64_t)t, UBLK_IO_RES_OK);   /* room left for every tag's */
        return;
    }
    int t = -1;
    for (int k = 0; k < r->depth && t < 0; k++)
        if (r->tags[(pick + k) % r->depth].state == TAG_WAITING)
            t = (pick + k) % r->depth;
    if (t < 0)
        return;
    struct tag *g = &r->tags[t];
    if (kind >= 12) {                               /* the tag ends: ABORT or an error */
        static const int32_t ends[3] = { UBLK_IO_RES_ABORT, -EIO, UBLK_IO_RES_NEED_GET_DATA };
        post_cqe(r, (uint64_t)t, ends[kind - 12]);
        g->state = TAG_DEAD;
        return;
    }
    static const uint8_t ops[7] = { UBLK_IO_OP_READ, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE,
                                    UBLK_IO_OP_WRITE, UBLK_IO_OP_FLUSH, UBLK_IO_OP_DISCARD,
                                    UBLK_IO_OP_WRITE_ZEROES };
    uint8_t op = (opsel & 7) < 7 ? ops[opsel & 7] : (uint8_t)(opsel >> 3);
    uint32_t flags = (flagsel & 1 ? UBLK_IO_F_FUA : 0) | (flagsel & 2 ? UBLK_IO_F_NOUNMAP : 0) |
                     (flagsel & 4 ? UBLK_IO_F_FAILFAST_DEV : 0);
    int moves = op == UBLK_IO_OP_READ || op == UBLK_IO_OP_WRITE;
    uint64_t start, low = r->sectors < WINDOW ? r->sectors : WINDOW;
    switch (where & 3) {
    case 0:                                         /* near the start */
        start = v % (low + 1);
        if (r->sectors > 2 * WINDOW)
            start = v % (WINDOW - MAX_REQ);
        break;
    case 1:                                         /* near the end */
        start = r->sectors - v % (low + 1);
        break;
    case 2:                                         /* past the end */
        start = where & 4 ? ~(uint64_t)v : r->sectors + (v & 0xFFFF);
        break;
    default:                                        /* anywhere modelled */
        start = v;
        if (r->sectors > 2 * WINDOW && v >= WINDOW - MAX_REQ && v < r->sectors - WINDOW)
            start = v % (WINDOW - MAX_REQ);
    }
    uint32_t nr = 1 + length % r->max_sectors;
    if (where & 0x10)                               /* none, or (not READ/WRITE) huge */
        nr = moves || !length ? 0 : (uint32_t)length << 24 | v;
    if (moves && clashes(r, op, start, nr))      /* past the end now, maybe not once resized */
        return;
    g->serial = ++r->serial;
    g->op = op;
    g->flags = flags;
    g->start = start;
    g->nr = nr;
    g->taken = g->taken_up = g->eio_ok = g->own = 0;
    g->state = TAG_POSTED;
    uint8_t *buf = tag_buf(r, t);
    if (op == UBLK_IO_OP_WRITE)
        stamp_sectors(buf, start, nr, g->serial);
    else if (op == UBLK_IO_OP_READ)
        memset(buf, 0xEE, (size_t)nr * SECTOR_SIZE);
    r->descs[t] = (struct ublksrv_io_desc){ .op_flags = op | flags, .nr_sectors = nr,
                                            .start_sector = start };
    post_cqe(r, (uint64_t)t, UBLK_IO_RES_OK);
    r->posted++;
}

static void fail_all(struct run *r)
{
    for (int t = 0; t < r->depth; t++)
        if (r->tags[t].state == TAG_POSTED && r->tags[t].taken)
            r->tags[t].eio_ok = 1;
    int n = aoe_fail_all(r->e, -ETIMEDOUT);
    CHECK(n == r->e->ndone, "aoe_fail_all: %d, %d events", n, r->e->ndone);
    take_completions(r);
    commit_results(r);
    check_engine(r->e, r->seen, &r->mark, 1);
}

/* The script is over: the target answers everything, lost frames expire and go
 * again, until every request is committed. */
static void finish(struct run *r)
{
    for (int round = 0; round < DRAIN_ROUNDS && (posted_open(r) || r->nheld); round++) {
        if (r->nheld)
            target_answer(r, 0, 0, 0, 0);
        else
            fuzz_now_us += r->rto_us + 1;
        pump(r);
    }
    CHECK(!posted_open(r), "requests never committed (%llu posted, %llu commits)",
          (unsigned long long)r->posted, (unsigned long long)r->commits);
    CHECK(r->commits == r->posted, "%llu commits for %llu requests",
          (unsigned long long)r->commits, (unsigned long long)r->posted);
    struct aoe_eng *e = r->e;
    CHECK(e->active_requests == 0 && e->inflight_frames == 0 && e->pending_frames == 0,
          "the engine still holds %d requests", e->active_requests);
}

static void setup_process(struct run *r)
{
    ring_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    CHECK(ring_fd >= 0, "eventfd: %s", strerror(errno));
    for (int k = 0; k < NSOCK; k++)
        CHECK(path_sockets(r->sv[k], 0) == 0, "socketpair: %s", strerror(errno));
    r->seen = calloc(MAX_FRAMES, sizeof(*r->seen));
    CHECK(r->seen, "out of memory");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct run *r = &run;
    if (ring_fd < 0)
        setup_process(r);
    struct script in = { data, size };
    static uint8_t junk[ANSWER_MAX + 256 * SECTOR_SIZE];
    for (int k = 0; k < NSOCK; k++)                 /* nothing left from the last input */
        for (int side = 0; side < 2; side++)
            while (recv(r->sv[k][side], junk, sizeof(junk), MSG_DONTWAIT) >= 0)
                ;
    uint64_t drained;
    (void)!read(ring_fd, &drained, sizeof(drained));

    r->depth = 1 + next_u8(&in) % MAX_DEPTH;
    r->spf = 1 + next_u8(&in) % 17;
    uint8_t flags = next_u8(&in);
    int maxout = 1 + next_u8(&in) % 16;
    int small_frames = 1 + next_u8(&in) % 32;
    r->max_sectors = 1 + next_u8(&in) % MAX_REQ;
    uint8_t size_mode = next_u8(&in) % 4;
    uint16_t size_value = next_u16(&in);
    uint16_t gen_seed = next_u16(&in);
    r->rto_us = 1000 * (1 + next_u8(&in) % 250u);
    r->readonly = flags & 1;
    r->lba48 = !(flags & 2);
    r->extra = flags >> 2 & 1;
    r->sectors = size_mode < 2 ? size_value % 4097u
               : size_mode == 2 ? (1ull << 28) - 2048 + size_value % 4096u
               : (1ull << 40) + size_value;
    int npaths = 1 + (flags >> 4 & 3) % NPATHS_MAX;
    /* UblkBackend.frames_needed: every tag's largest request at once, twice, + 64 */
    int frames = flags & 0x80 ? small_frames
               : 2 * r->depth * ((r->max_sectors + r->spf - 1) / r->spf) + 64;

    fuzz_now_us = 1000000;
    r->e = aoe_eng_new(3, 7, frames, gen_seed);
    CHECK(r->e, "aoe_eng_new: %s", strerror(errno));
    struct aoe_eng *e = r->e;
    e->lba48 = (uint8_t)r->lba48;
    e->flush_cmd = (r->lba48 ? ATA_CMD_FLUSH_EXT : ATA_CMD_FLUSH) ^
                   (flags & 0x40 ? ATA_CMD_FLUSH_EXT ^ ATA_CMD_FLUSH : 0);
    e->sectors_per_frame = r->spf;
    for (int p = 0; p < npaths; p++) {
        r->path_sock[p] = p == 2;
        CHECK(aoe_eng_add_path(e, r->sv[p == 2][0], initiator_mac, target_macs[p]) == p,
              "aoe_eng_add_path");
        e->paths[p].maxout = maxout;
        e->paths[p].rto_us = r->rto_us;
        e->paths[p].reorder_us = r->rto_us / 2;
    }

    memset(r->tags, 0, sizeof(r->tags));
    memset(r->written, 0, sizeof(r->written));
    r->nheld = r->nreplays = r->ncommit = 0;
    r->serial = 0;
    r->commits = r->posted = 0;
    size_t page = 4096;
    queue_open(r, (unsigned)(((size_t)r->max_sectors * SECTOR_SIZE + page - 1) & ~(page - 1)));
    CHECK(ublk_queue_fetch_all(&r->q) == 0, "ublk_queue_fetch_all");
    for (int t = 0; t < r->depth; t++)
        CHECK(r->tags[t].state == TAG_WAITING, "tag %d was not fetched", t);
    CHECK(aoe_eng_bridge(e, &r->q, r->sectors, r->readonly) == 0, "aoe_eng_bridge");
    e->bridge_on = !(flags & 8);

    for (int steps = 0; !script_done(&in) && steps < 256; steps++) {
        uint8_t op = next_u8(&in) % 8;
        switch (op) {
        case 0:
        case 1:
            post(r, &in);
            break;
        case 2: {
            uint8_t n = next_u8(&in), chaos = next_u8(&in);
            target_answer(r, n & 0x1F, n >> 7, chaos, next_u8(&in));
            break;
        }
        case 3:
            pump(r);
            break;
        case 4: {
            uint8_t ms = next_u8(&in);
            fuzz_now_us += ms ? ms * 1000 : r->rto_us + 1;
            pump(r);
            break;
        }
        case 5:
            fail_all(r);
            break;
        case 6: {
            uint8_t x = next_u8(&in);
            if (x & 1)
                e->bridge_on = !e->bridge_on;
            else if (r->sectors <= 2 * WINDOW)     /* UblkBackend.resize, where the disk
                                                     * model allows */
                r->sectors = e->bridge_sectors = (x >> 1) * 33u;
            break;
        }
        default: {
            uint8_t which = next_u8(&in);
            if (r->nreplays) {
                int n = r->nreplays < REPLAYS ? r->nreplays : REPLAYS;
                const struct replay *rp = &r->replays[which % n];
                send_answer(r, rp->sock, rp->frame, rp->len, 0);
            }
        }
        }
    }
    finish(r);

    CHECK(aoe_eng_bridge(e, NULL, 0, 0) == 0, "aoe_eng_bridge(NULL)");
    aoe_eng_free(e);
    guarded_free((uint8_t *)r->q.bufs, r->q.bufs_len);
    return 0;
}
