/*
 * _aoeio.c - compiled helper for aoe.py, built by build_ffi.py (cffi).
 *
 * Mechanism only: aoe.py decides windows, retransmit timeouts and failover;
 * this file moves frames in batches and tells aoe.py what happened.
 * Linux only.  No global state.  Errors are returned as negative errno.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE                 /* ppoll, sendmmsg, recvmmsg */
#endif
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

/* ========================================================================== */
/* Frame engine: ATA requests split into AoE frames, sent and matched          */
/* ========================================================================== */
/*
 * Every frame of a request owns a slot from submit to completion.  Its tag on
 * the wire is TAG_ENGINE | generation << 16 | slot, the generation moving on
 * at every transmission, so an answer is found by index and a late answer to
 * an earlier transmission (or to a freed slot) is recognised as stale.
 * A slot sits on exactly one list: free, pending (FIFO; resends go to the
 * head), or the in-flight list of the path that carries it (oldest first,
 * so expiry checks stop at the first young frame).
 */

#define AOE_MAX_PATHS   16
#define ETH_P_AOE       0x88A2
#define ATA_HDR_LEN     36          /* Ethernet 14 + AoE 10 + ATA argument 12 */
#define ETH_MIN_FRAME   60          /* shorter frames are padded to this */
#define SECTOR_SIZE     512
#define MAX_SPF         255         /* the ATA sector count field is one byte */

#define AOE_VER_FLAGS   0x10        /* version 1, no flags */
#define AOEFL_RSP       0x08
#define AOEFL_ERR       0x04
#define AOECMD_ATA      0
#define AOEAFL_EXT      0x40
#define AOEAFL_WRITE    0x01

#define ATA_READ        0x20
#define ATA_READ_EXT    0x24
#define ATA_WRITE       0x30
#define ATA_WRITE_EXT   0x34
#define ATA_FLUSH       0xE7
#define ATA_FLUSH_EXT   0xEA
#define ATA_ST_ERR      0x01
#define ATA_ST_DF       0x20

/* Engine tags have bits 31 and 30 set; aoe.py's own queries never set both,
 * so their answers can never be taken for data. */
#define TAG_ENGINE      0xC0000000u
#define GEN_MAX         0x3FFF      /* generations run 1..GEN_MAX in bits 16..29 */

#define STATUS_AOE_ERR  0x100
#define STATUS_ATA_ERR  0x200

#define TX_BATCH        64
#define RX_BATCH        64
#define RX_ROUNDS       4           /* recvmmsg calls per socket before refilling windows */

#define NONE            UINT32_MAX

enum { OP_READ, OP_WRITE, OP_FLUSH };
enum { FRAME_FREE, FRAME_PENDING, FRAME_INFLIGHT };

struct aoe_counters {
    uint64_t frames_sent, frames_resent, frames_recv, bytes_data;
    uint64_t drop_short;
    uint64_t drop_not_response;
    uint64_t drop_version;
    uint64_t drop_foreign;
    uint64_t drop_bad_mac;
    uint64_t drop_stale;
    uint64_t errors;
    uint64_t send_eagain;
};

struct aoe_path {
    int fd;
    uint8_t src[6], dst[6];
    int maxout;
    int outstanding;
    int enabled;
    uint32_t rto_us;
    uint64_t sent, recv;
    int64_t last_recv_us;
    /* RTT of first transmissions answered during the last aoe_pump (Karn):
     * aoe.py updates its estimate once per pump from these, not per frame. */
    uint32_t rtt_n, rtt_max_us;
    uint64_t rtt_sum_us;
};

struct aoe_event { uint64_t req_id; int32_t status; };

struct aoe_frame {
    uint8_t *data;          /* this frame's bytes in the caller's buffer; NULL for flush */
    uint64_t lba;
    int64_t sent_us;
    uint32_t req;           /* index in reqs[] */
    uint32_t next, prev;    /* links of whichever list holds the slot */
    uint16_t gen;           /* generation of the current transmission */
    uint8_t nsect;
    uint8_t state;
    uint8_t path;
    uint8_t tx;             /* transmissions so far (saturating); 1 = first, for Karn */
    uint8_t reported;       /* expiry of the current transmission already reported */
};

struct aoe_request {
    uint64_t id;
    uint32_t frames_left;
    uint32_t next_free;
    int32_t status;         /* first error seen, 0 while all is well */
    uint8_t op;
    uint8_t lba48;          /* eng->lba48 at submit */
};

/* Frames gathered for one socket, sent with one sendmmsg. */
struct aoe_tx_batch {
    int n;
    uint32_t slot[TX_BATCH];
    struct mmsghdr msg[TX_BATCH];
    struct iovec iov[TX_BATCH][2];          /* header, then write data in place */
    uint8_t hdr[TX_BATCH][ETH_MIN_FRAME];
};

struct aoe_eng {
    uint16_t shelf; uint8_t slot; uint8_t lba48;
    uint8_t flush_cmd;                      /* ATA opcode for OP_FLUSH, chosen by aoe.py */
    int sectors_per_frame;
    int npaths; struct aoe_path paths[AOE_MAX_PATHS];
    struct aoe_counters c;
    int ndone;    struct aoe_event *done;
    int nexpired; uint32_t *expired;
    int inflight_frames; int pending_frames; int active_requests;

    /* private */
    uint32_t max_frames;
    struct aoe_frame *frames;
    struct aoe_request *reqs;
    uint32_t free_frame, nfree_frames, free_req;
    uint32_t pend_head, pend_tail;
    uint32_t fly_head[AOE_MAX_PATHS], fly_tail[AOE_MAX_PATHS];
    int rr;                                 /* path to try first for the next frame */
    int nfds;                               /* distinct sockets among the paths */
    int fds[AOE_MAX_PATHS];
    uint8_t path_fd[AOE_MAX_PATHS];         /* path -> index in fds[] */
    struct aoe_tx_batch *tx[AOE_MAX_PATHS]; /* per socket */
    struct aoe_event *done_buf;             /* aoe_pump's events */
    struct aoe_event *fail_buf;             /* aoe_fail_all's, so it never overwrites the former */
    size_t rx_slot_size;                    /* bytes per receive slot, grows with sectors_per_frame */
    uint8_t *rx_buf;
    struct mmsghdr rx_msg[RX_BATCH];
    struct iovec rx_iov[RX_BATCH];
};

int64_t aoe_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ---- lists ---------------------------------------------------------------- */

static void pending_push_tail(struct aoe_eng *e, uint32_t s)
{
    e->frames[s].next = NONE;
    if (e->pend_tail == NONE)
        e->pend_head = s;
    else
        e->frames[e->pend_tail].next = s;
    e->pend_tail = s;
}

static void pending_push_head(struct aoe_eng *e, uint32_t s)
{
    e->frames[s].next = e->pend_head;
    e->pend_head = s;
    if (e->pend_tail == NONE)
        e->pend_tail = s;
}

static uint32_t pending_pop(struct aoe_eng *e)
{
    uint32_t s = e->pend_head;
    e->pend_head = e->frames[s].next;
    if (e->pend_head == NONE)
        e->pend_tail = NONE;
    return s;
}

static void fly_append(struct aoe_eng *e, int p, uint32_t s)
{
    struct aoe_frame *f = &e->frames[s];
    f->next = NONE;
    f->prev = e->fly_tail[p];
    if (f->prev == NONE)
        e->fly_head[p] = s;
    else
        e->frames[f->prev].next = s;
    e->fly_tail[p] = s;
}

static void fly_unlink(struct aoe_eng *e, uint32_t s)
{
    struct aoe_frame *f = &e->frames[s];
    int p = f->path;
    if (f->prev == NONE)
        e->fly_head[p] = f->next;
    else
        e->frames[f->prev].next = f->next;
    if (f->next == NONE)
        e->fly_tail[p] = f->prev;
    else
        e->frames[f->next].prev = f->prev;
}

static void frame_release(struct aoe_eng *e, uint32_t s)
{
    e->frames[s].state = FRAME_FREE;
    e->frames[s].next = e->free_frame;
    e->free_frame = s;
    e->nfree_frames++;
}

static void request_release(struct aoe_eng *e, uint32_t r)
{
    e->reqs[r].next_free = e->free_req;
    e->free_req = r;
    e->active_requests--;
}

/* An in-flight frame leaves its path: window slot returned. */
static void frame_land(struct aoe_eng *e, uint32_t s)
{
    fly_unlink(e, s);
    e->paths[e->frames[s].path].outstanding--;
    e->inflight_frames--;
}

/* ---- engine life ---------------------------------------------------------- */

/* Receive slots must hold the header and the largest read answer asked for;
 * anything longer is truncated, which is harmless as only that part is used. */
static int rx_reserve(struct aoe_eng *e, int spf)
{
    size_t need = (ATA_HDR_LEN + (size_t)spf * SECTOR_SIZE + 63) & ~(size_t)63;
    if (need < 2048)
        need = 2048;
    if (need <= e->rx_slot_size)
        return 0;
    uint8_t *buf = malloc(need * RX_BATCH);
    if (!buf)
        return -ENOMEM;
    free(e->rx_buf);
    e->rx_buf = buf;
    e->rx_slot_size = need;
    for (int i = 0; i < RX_BATCH; i++) {
        e->rx_iov[i].iov_base = buf + i * need;
        e->rx_iov[i].iov_len = need;
        memset(&e->rx_msg[i].msg_hdr, 0, sizeof(e->rx_msg[i].msg_hdr));
        e->rx_msg[i].msg_hdr.msg_iov = &e->rx_iov[i];
        e->rx_msg[i].msg_hdr.msg_iovlen = 1;
    }
    return 0;
}

void aoe_eng_free(struct aoe_eng *e)
{
    if (!e)
        return;
    for (int i = 0; i < e->nfds; i++)
        free(e->tx[i]);
    free(e->frames);
    free(e->reqs);
    free(e->done_buf);
    free(e->fail_buf);
    free(e->expired);
    free(e->rx_buf);
    free(e);
}

struct aoe_eng *aoe_eng_new(uint16_t shelf, uint8_t slot, int max_frames)
{
    if (max_frames < 1 || max_frames > 65535) {
        errno = EINVAL;
        return NULL;
    }
    struct aoe_eng *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->shelf = shelf;
    e->slot = slot;
    e->lba48 = 1;
    e->flush_cmd = ATA_FLUSH_EXT;
    e->sectors_per_frame = 2;               /* fits a 1500-byte MTU until aoe.py says more */
    e->max_frames = (uint32_t)max_frames;
    e->frames = calloc(max_frames, sizeof(*e->frames));
    e->reqs = calloc(max_frames, sizeof(*e->reqs));
    e->done_buf = calloc(max_frames, sizeof(*e->done_buf));
    e->fail_buf = calloc(max_frames, sizeof(*e->fail_buf));
    e->expired = calloc(max_frames, sizeof(*e->expired));
    if (!e->frames || !e->reqs || !e->done_buf || !e->fail_buf || !e->expired) {
        aoe_eng_free(e);
        errno = ENOMEM;
        return NULL;
    }
    if (rx_reserve(e, 0) < 0) {
        aoe_eng_free(e);
        errno = ENOMEM;
        return NULL;
    }
    e->done = e->done_buf;
    e->free_frame = e->free_req = NONE;
    for (uint32_t i = (uint32_t)max_frames; i-- > 0;) {
        frame_release(e, i);
        e->reqs[i].next_free = e->free_req;
        e->free_req = i;
    }
    e->pend_head = e->pend_tail = NONE;
    for (int p = 0; p < AOE_MAX_PATHS; p++)
        e->fly_head[p] = e->fly_tail[p] = NONE;
    return e;
}

int aoe_eng_add_path(struct aoe_eng *e, int fd, const uint8_t *src6, const uint8_t *dst6)
{
    if (!e || !src6 || !dst6)
        return -EINVAL;
    if (fd < 0)
        return -EBADF;
    if (e->npaths >= AOE_MAX_PATHS)
        return -ENOSPC;
    int fi = 0;
    while (fi < e->nfds && e->fds[fi] != fd)
        fi++;
    if (fi == e->nfds) {
        e->tx[fi] = calloc(1, sizeof(struct aoe_tx_batch));
        if (!e->tx[fi])
            return -ENOMEM;
        e->fds[fi] = fd;
        e->nfds++;
    }
    int p = e->npaths;
    struct aoe_path *pa = &e->paths[p];
    memset(pa, 0, sizeof(*pa));
    pa->fd = fd;
    memcpy(pa->src, src6, 6);
    memcpy(pa->dst, dst6, 6);
    pa->maxout = 1;
    pa->enabled = 1;
    pa->rto_us = 250000;                    /* until aoe.py has an RTT estimate */
    e->path_fd[p] = (uint8_t)fi;
    e->npaths++;
    return p;
}

/* ---- requests --------------------------------------------------------------- */

int aoe_submit(struct aoe_eng *e, uint64_t req_id, int op, uint64_t lba, uint32_t nsect, void *buf)
{
    if (!e)
        return -EINVAL;
    uint32_t nframes = 1;
    int spf = e->sectors_per_frame;
    if (op == OP_READ || op == OP_WRITE) {
        uint64_t limit = e->lba48 ? 1ULL << 48 : 1ULL << 28;
        if (nsect == 0 || !buf || spf < 1 || spf > MAX_SPF || lba > limit || nsect > limit - lba)
            return -EINVAL;
        nframes = (nsect + (uint32_t)spf - 1) / (uint32_t)spf;
    } else if (op != OP_FLUSH) {
        return -EINVAL;
    }
    if (nframes > e->nfree_frames || e->free_req == NONE)
        return -ENOSPC;
    if (op == OP_READ) {
        int rc = rx_reserve(e, spf);
        if (rc < 0)
            return rc;
    }

    uint32_t r = e->free_req;
    struct aoe_request *rq = &e->reqs[r];
    e->free_req = rq->next_free;
    rq->id = req_id;
    rq->frames_left = nframes;
    rq->status = 0;
    rq->op = (uint8_t)op;
    rq->lba48 = e->lba48 != 0;
    e->active_requests++;

    uint8_t *data = buf;
    uint32_t done = 0;
    for (uint32_t i = 0; i < nframes; i++) {
        uint32_t s = e->free_frame;
        struct aoe_frame *f = &e->frames[s];
        e->free_frame = f->next;
        e->nfree_frames--;
        uint32_t n = 0;
        if (op != OP_FLUSH)
            n = nsect - done < (uint32_t)spf ? nsect - done : (uint32_t)spf;
        f->data = op == OP_FLUSH ? NULL : data + (size_t)done * SECTOR_SIZE;
        f->lba = op == OP_FLUSH ? 0 : lba + done;
        f->nsect = (uint8_t)n;
        f->req = r;
        f->state = FRAME_PENDING;
        f->tx = 0;
        pending_push_tail(e, s);
        done += n;
    }
    e->pending_frames += (int)nframes;
    return 0;
}

/* An answered (or failed) frame is done; its request completes with its last frame. */
static void frame_finish(struct aoe_eng *e, uint32_t s, int32_t status)
{
    struct aoe_frame *f = &e->frames[s];
    struct aoe_request *rq = &e->reqs[f->req];
    frame_land(e, s);
    if (status && !rq->status)
        rq->status = status;
    if (--rq->frames_left == 0) {
        e->done[e->ndone].req_id = rq->id;
        e->done[e->ndone].status = rq->status;
        e->ndone++;
        request_release(e, f->req);
    }
    frame_release(e, s);
}

/* Take an in-flight frame off its path and send it again first, with a new
 * generation (given when it goes out), so an answer to this transmission is stale. */
int aoe_resend(struct aoe_eng *e, uint32_t frame_slot)
{
    if (!e || frame_slot >= e->max_frames || e->frames[frame_slot].state != FRAME_INFLIGHT)
        return -EINVAL;
    frame_land(e, frame_slot);
    e->frames[frame_slot].state = FRAME_PENDING;
    pending_push_head(e, frame_slot);
    e->pending_frames++;
    return 0;
}

/* The path an in-flight frame (e.g. one just reported expired) was sent on. */
int aoe_frame_path(struct aoe_eng *e, uint32_t frame_slot)
{
    if (!e || frame_slot >= e->max_frames || e->frames[frame_slot].state != FRAME_INFLIGHT)
        return -EINVAL;
    return e->frames[frame_slot].path;
}

/* Fail every active request now: done[] (a separate array, so the last pump's
 * events stay readable) lists them and the count is returned.  Late answers
 * to the dropped frames are then stale. */
int aoe_fail_all(struct aoe_eng *e, int32_t status)
{
    if (!e)
        return -EINVAL;
    /* Every slot not free belongs to an active request: fail each request once. */
    e->done = e->fail_buf;
    e->ndone = 0;
    for (uint32_t s = 0; s < e->max_frames; s++) {
        struct aoe_frame *f = &e->frames[s];
        if (f->state == FRAME_FREE)
            continue;
        struct aoe_request *rq = &e->reqs[f->req];
        if (rq->frames_left) {
            e->done[e->ndone].req_id = rq->id;
            e->done[e->ndone].status = status;
            e->ndone++;
            rq->frames_left = 0;
            request_release(e, f->req);
        }
        frame_release(e, s);
    }
    e->pend_head = e->pend_tail = NONE;
    for (int p = 0; p < e->npaths; p++) {
        e->fly_head[p] = e->fly_tail[p] = NONE;
        e->paths[p].outstanding = 0;
    }
    e->inflight_frames = e->pending_frames = 0;
    e->nexpired = 0;
    return e->ndone;
}

/* ---- sending -------------------------------------------------------------- */

static void build_header(const struct aoe_eng *e, const struct aoe_path *pa, const struct aoe_frame *f,
                         const struct aoe_request *rq, uint32_t tag, uint8_t *h)
{
    static const uint8_t cmd28[] = { ATA_READ, ATA_WRITE };
    static const uint8_t cmd48[] = { ATA_READ_EXT, ATA_WRITE_EXT };
    uint64_t lba = f->lba;
    int op = rq->op;

    memcpy(h, pa->dst, 6);
    memcpy(h + 6, pa->src, 6);
    h[12] = ETH_P_AOE >> 8;
    h[13] = ETH_P_AOE & 0xFF;
    h[14] = AOE_VER_FLAGS;
    h[15] = 0;
    h[16] = e->shelf >> 8;
    h[17] = e->shelf & 0xFF;
    h[18] = e->slot;
    h[19] = AOECMD_ATA;
    h[20] = tag >> 24;
    h[21] = tag >> 16;
    h[22] = tag >> 8;
    h[23] = tag;
    h[24] = (rq->lba48 ? AOEAFL_EXT : 0) | (op == OP_WRITE ? AOEAFL_WRITE : 0);
    h[25] = 0;
    h[26] = f->nsect;
    h[27] = op == OP_FLUSH ? e->flush_cmd : rq->lba48 ? cmd48[op] : cmd28[op];
    for (int i = 0; i < 6; i++)
        h[28 + i] = (uint8_t)(lba >> (8 * i));
    if (!rq->lba48) {
        h[31] = 0xE0 | ((lba >> 24) & 0x0F);    /* LBA mode, high nibble in the device register */
        h[32] = h[33] = 0;
    }
    h[34] = h[35] = 0;
    memset(h + ATA_HDR_LEN, 0, ETH_MIN_FRAME - ATA_HDR_LEN);
}

/* Round-robin over paths with room in their window and a socket taking frames. */
static int pick_path(struct aoe_eng *e, uint32_t blocked_fds)
{
    for (int i = 0; i < e->npaths; i++) {
        int p = (e->rr + i) % e->npaths;
        struct aoe_path *pa = &e->paths[p];
        if (pa->enabled && pa->outstanding < pa->maxout && !(blocked_fds >> e->path_fd[p] & 1)) {
            e->rr = (p + 1) % e->npaths;
            return p;
        }
    }
    return -1;
}

/* Put a pending frame on path p (as if sent: counted against the window) and in the batch. */
static void stage_frame(struct aoe_eng *e, uint32_t s, int p, int64_t now)
{
    struct aoe_frame *f = &e->frames[s];
    struct aoe_path *pa = &e->paths[p];
    struct aoe_tx_batch *b = e->tx[e->path_fd[p]];
    const struct aoe_request *rq = &e->reqs[f->req];
    int i = b->n++;

    f->gen = f->gen % GEN_MAX + 1;
    f->state = FRAME_INFLIGHT;
    f->path = (uint8_t)p;
    f->sent_us = now;
    f->reported = 0;
    fly_append(e, p, s);
    pa->outstanding++;
    e->inflight_frames++;
    e->pending_frames--;

    build_header(e, pa, f, rq, TAG_ENGINE | (uint32_t)f->gen << 16 | s, b->hdr[i]);
    struct msghdr *m = &b->msg[i].msg_hdr;
    memset(m, 0, sizeof(*m));
    m->msg_iov = b->iov[i];
    b->iov[i][0].iov_base = b->hdr[i];
    if (rq->op == OP_WRITE) {
        b->iov[i][0].iov_len = ATA_HDR_LEN;
        b->iov[i][1].iov_base = f->data;
        b->iov[i][1].iov_len = (size_t)f->nsect * SECTOR_SIZE;
        m->msg_iovlen = 2;
    } else {
        b->iov[i][0].iov_len = ETH_MIN_FRAME;
        m->msg_iovlen = 1;
    }
    b->slot[i] = s;
}

/* Send one socket's batch.  Frames the socket did not take go back to the head
 * of pending in order, as if never sent.  Returns 0, or -errno for an error
 * other than a full socket. */
static int flush_batch(struct aoe_eng *e, int fi, uint32_t *blocked_fds)
{
    struct aoe_tx_batch *b = e->tx[fi];
    int n = b->n, rc = 0;
    int sent = sendmmsg(e->fds[fi], b->msg, (unsigned)n, MSG_DONTWAIT);
    if (sent < 0) {
        if (errno != EAGAIN && errno != ENOBUFS && errno != EINTR)
            rc = -errno;
        sent = 0;
    }
    b->n = 0;
    for (int i = 0; i < sent; i++) {
        struct aoe_frame *f = &e->frames[b->slot[i]];
        if (f->tx < UINT8_MAX)
            f->tx++;
        if (f->tx > 1)
            e->c.frames_resent++;
        e->paths[f->path].sent++;
    }
    e->c.frames_sent += (uint64_t)sent;
    if (sent < n) {
        if (!rc)
            e->c.send_eagain++;
        *blocked_fds |= 1u << fi;
        for (int i = n; i-- > sent;) {
            uint32_t s = b->slot[i];
            frame_land(e, s);
            e->frames[s].state = FRAME_PENDING;
            pending_push_head(e, s);
            e->pending_frames++;
        }
    }
    return rc;
}

/* Send pending frames while some path has room.  Returns 0 or the first hard error. */
static int send_pending(struct aoe_eng *e)
{
    uint32_t blocked_fds = 0;
    int64_t now = aoe_now_us();
    int rc = 0, p;

    while (e->pend_head != NONE && (p = pick_path(e, blocked_fds)) >= 0) {
        uint32_t s = pending_pop(e);
        stage_frame(e, s, p, now);
        int fi = e->path_fd[p];
        if (e->tx[fi]->n == TX_BATCH) {
            int err = flush_batch(e, fi, &blocked_fds);
            if (err && !rc)
                rc = err;
        }
    }
    for (int fi = 0; fi < e->nfds; fi++) {
        if (e->tx[fi]->n) {
            int err = flush_batch(e, fi, &blocked_fds);
            if (err && !rc)
                rc = err;
        }
    }
    return rc;
}

/* ---- receiving ------------------------------------------------------------ */

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Check one received frame; only a frame proven to answer an in-flight
 * transmission of ours may touch the caller's buffer. */
static void handle_answer(struct aoe_eng *e, const uint8_t *h, size_t len, int64_t now)
{
    struct aoe_counters *c = &e->c;
    if (len < ATA_HDR_LEN) {
        c->drop_short++;
        return;
    }
    if (h[12] != (ETH_P_AOE >> 8) || h[13] != (ETH_P_AOE & 0xFF) || (h[14] >> 4) != 1) {
        c->drop_version++;
        return;
    }
    if (!(h[14] & AOEFL_RSP)) {
        c->drop_not_response++;
        return;
    }
    if ((h[16] << 8 | h[17]) != e->shelf || h[18] != e->slot || h[19] != AOECMD_ATA) {
        c->drop_foreign++;
        return;
    }
    uint32_t tag = be32(h + 20);
    uint32_t s = tag & 0xFFFF;
    if ((tag & TAG_ENGINE) != TAG_ENGINE || s >= e->max_frames ||
        e->frames[s].state != FRAME_INFLIGHT || e->frames[s].gen != (tag >> 16 & GEN_MAX)) {
        c->drop_stale++;
        return;
    }
    struct aoe_frame *f = &e->frames[s];
    struct aoe_path *pa = &e->paths[f->path];
    if (memcmp(h + 6, pa->dst, 6) != 0) {
        c->drop_bad_mac++;
        return;
    }

    int32_t status = 0;
    size_t bytes = (size_t)f->nsect * SECTOR_SIZE;
    if (h[14] & AOEFL_ERR) {
        status = -(STATUS_AOE_ERR | h[15]);
    } else if (h[27] & (ATA_ST_ERR | ATA_ST_DF)) {
        status = -(STATUS_ATA_ERR | h[25]);
    } else if (e->reqs[f->req].op == OP_READ) {
        if (len - ATA_HDR_LEN < bytes) {
            c->drop_short++;                /* stays in flight; expiry will resend it */
            return;
        }
        memcpy(f->data, h + ATA_HDR_LEN, bytes);
    }
    if (status)
        c->errors++;
    else if (f->data)
        c->bytes_data += bytes;
    c->frames_recv++;
    pa->recv++;
    pa->last_recv_us = now;
    if (f->tx == 1) {
        uint32_t us = (uint32_t)(now - f->sent_us);
        pa->rtt_n++;
        pa->rtt_sum_us += us;
        if (us > pa->rtt_max_us)
            pa->rtt_max_us = us;
    }
    frame_finish(e, s, status);
}

/* Read what socket fi holds, in batches. */
static void drain_socket(struct aoe_eng *e, int fi)
{
    for (int round = 0; round < RX_ROUNDS; round++) {
        int n = recvmmsg(e->fds[fi], e->rx_msg, RX_BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0)
            break;
        int64_t now = aoe_now_us();
        for (int i = 0; i < n; i++)
            handle_answer(e, e->rx_buf + i * e->rx_slot_size, e->rx_msg[i].msg_len, now);
        if (n < RX_BATCH)
            break;
    }
}

/* ---- expiry --------------------------------------------------------------- */

/* Report in-flight frames older than their path's rto_us, once per transmission.
 * Each path's list is oldest first, so the walk stops at the first young frame. */
static void collect_expired(struct aoe_eng *e, int64_t now)
{
    for (int p = 0; p < e->npaths; p++) {
        int64_t rto = e->paths[p].rto_us;
        for (uint32_t s = e->fly_head[p]; s != NONE; s = e->frames[s].next) {
            struct aoe_frame *f = &e->frames[s];
            if (now - f->sent_us <= rto)
                break;
            if (!f->reported) {
                f->reported = 1;
                e->expired[e->nexpired++] = s;
            }
        }
    }
}

/* When the next unreported frame expires (INT64_MAX if none). */
static int64_t next_expiry(const struct aoe_eng *e)
{
    int64_t t = INT64_MAX;
    for (int p = 0; p < e->npaths; p++) {
        for (uint32_t s = e->fly_head[p]; s != NONE; s = e->frames[s].next) {
            const struct aoe_frame *f = &e->frames[s];
            if (!f->reported) {
                int64_t due = f->sent_us + e->paths[p].rto_us + 1;
                if (due < t)
                    t = due;
                break;
            }
        }
    }
    return t;
}

/* ---- the pump ------------------------------------------------------------- */

/*
 * Send, then wait and receive until something needs aoe.py: a request
 * completed, a frame expired, extra_fd became readable,
 * or timeout_us passed (at once if nothing is in flight and extra_fd < 0).
 * Window slots freed by answers are refilled inside the loop, so the target's
 * queue stays full without a round trip through Python per answer.
 */
int aoe_pump(struct aoe_eng *e, int timeout_us, int extra_fd)
{
    if (!e)
        return -EINVAL;
    e->done = e->done_buf;
    e->ndone = e->nexpired = 0;
    for (int p = 0; p < e->npaths; p++) {
        struct aoe_path *pa = &e->paths[p];
        pa->rtt_n = pa->rtt_max_us = 0;
        pa->rtt_sum_us = 0;
    }

    int rc = send_pending(e);
    if (rc < 0)
        return rc;

    struct pollfd pfd[AOE_MAX_PATHS + 1];
    int npfd = e->nfds;
    for (int fi = 0; fi < e->nfds; fi++) {
        pfd[fi].fd = e->fds[fi];
        pfd[fi].events = POLLIN;
    }
    if (extra_fd >= 0) {
        pfd[npfd].fd = extra_fd;
        pfd[npfd].events = POLLIN;
        npfd++;
    }

    int64_t deadline = aoe_now_us() + (timeout_us > 0 ? timeout_us : 0);
    int polled = 0, extra_ready = 0;
    for (;;) {
        int64_t now = aoe_now_us();
        collect_expired(e, now);
        if (e->ndone || e->nexpired || extra_ready)
            break;
        if (e->inflight_frames == 0 && extra_fd < 0)
            break;                          /* nothing could arrive for us */
        if (polled && now >= deadline)
            break;
        int64_t until = next_expiry(e);
        if (until > deadline)
            until = deadline;
        int64_t wait = until > now ? until - now : 0;
        struct timespec ts = { wait / 1000000, (wait % 1000000) * 1000 };
        int n = ppoll(pfd, (nfds_t)npfd, &ts, NULL);
        polled = 1;
        if (n < 0) {
            if (errno == EINTR)
                break;                      /* let Python see its signal */
            return -errno;
        }
        if (n == 0)
            continue;
        if (extra_fd >= 0 && pfd[e->nfds].revents)
            extra_ready = 1;
        for (int fi = 0; fi < e->nfds; fi++)
            if (pfd[fi].revents)
                drain_socket(e, fi);
        send_pending(e);                    /* a hard error shows at the next pump's first send */
    }
    collect_expired(e, aoe_now_us());
    return e->ndone;
}

/* ========================================================================== */
/* Target fast path: ATA READ/WRITE answered in batches (aoe.py serve)         */
/* ========================================================================== */
/*
 * aoe.py's AoeTarget.handle decides every frame's answer.  This section only
 * answers the frames whose answer follows from the state aoe.py mirrors into
 * struct aoe_srv (export window, read-only, scnt, mask and reservation lists):
 * ATA READ/WRITE SECTORS (EXT) sent to our exact shelf.slot by an initiator
 * the mask and reservation lists admit, asking for at most scnt sectors and,
 * for writes, carrying them all.  It drops and counts, as handle() does,
 * frames that are short, not AoE version 1, responses, for other targets or
 * from masked initiators.  Every other frame goes back to aoe.py: aoe_srv_pump
 * returns as soon as a batch held one, and aoe.py answers it with handle().
 *
 * Each answer is built in place in its receive slot (the request is at most a
 * header plus write data; the answer a header plus read data) and a batch's
 * answers leave with one sendmmsg.  Slots begin ATA_HDR_LEN bytes before an
 * SRV_ALIGN boundary, so data is aligned for a file opened O_DIRECT.
 * One struct aoe_srv per socket and thread.  Only the mask and reservation
 * lists change while it runs, through aoe_srv_set_lists, under its lock.
 */

#include <pthread.h>
#include <unistd.h>

#define SRV_BATCH       64
#define SRV_ALIGN       4096        /* read and write data start on this boundary */
#define SRV_MAX_MACS    255
#define SRV_SEND_TRIES  8           /* sendmmsg attempts per answer before it counts as lost */
#define AOE_HDR_LEN     24          /* Ethernet 14 + AoE common 10 */
#define AOE_SHELF_ANY   0xFFFF
#define AOE_SLOT_ANY    0xFF
#define ATA_ST_DRDY     0x40
#define ATA_ER_UNC      0x40
#define ATA_ER_IDNF     0x10
#define ATA_ER_ABRT     0x04
#define LBA28_MASK      0x0FFFFFFFull

enum { SRV_DROP, SRV_SLOW, SRV_FAST };

struct aoe_srv_counters {
    uint64_t frames_recv;           /* every frame read from the socket */
    uint64_t batches;               /* recvmmsg calls that returned frames */
    uint64_t frames_fast;           /* answered here */
    uint64_t frames_slow;           /* handed to aoe.py */
    uint64_t frames_sent;
    uint64_t sectors_read, sectors_written;
    uint64_t io_errors;             /* answered UNC: pread/pwrite failed or was short */
    uint64_t drop_short;            /* the drop_* names follow AoeTarget.drops */
    uint64_t drop_not_aoe;
    uint64_t drop_version;
    uint64_t drop_response;
    uint64_t drop_other_target;
    uint64_t drop_masked;
    uint64_t drop_oversize;         /* longer than a receive slot */
    uint64_t send_lost;             /* answers the socket would not take */
};

struct aoe_srv_frame { uint8_t *data; uint32_t len; };

struct aoe_srv {
    int sock_fd, file_fd;
    uint8_t mac[6];
    uint16_t shelf; uint8_t slot; uint8_t readonly;
    uint64_t base;                  /* byte offset of the export's sector 0 in file_fd */
    uint64_t sectors;               /* export length */
    int scnt;                       /* most sectors one request may ask for */
    struct aoe_srv_counters c;
    /* frames for aoe.py from the last aoe_srv_pump, valid until the next call */
    int nslow; struct aoe_srv_frame *slow;

    /* private */
    pthread_mutex_t lock;           /* guards the lists */
    int nmasks, nreserved;
    uint8_t masks[SRV_MAX_MACS][6], reserved[SRV_MAX_MACS][6];
    size_t frame_max;               /* bytes a slot holds from the frame's start */
    size_t slot_size;
    uint8_t *buf;
    struct aoe_srv_frame slow_buf[SRV_BATCH];
    struct mmsghdr rx_msg[SRV_BATCH];
    struct iovec rx_iov[SRV_BATCH];
    struct mmsghdr tx_msg[SRV_BATCH];
    struct iovec tx_iov[SRV_BATCH];
};

static uint8_t *srv_frame(struct aoe_srv *s, int i)
{
    return s->buf + (size_t)i * s->slot_size + (SRV_ALIGN - ATA_HDR_LEN);
}

void aoe_srv_free(struct aoe_srv *s)
{
    if (!s)
        return;
    pthread_mutex_destroy(&s->lock);
    free(s->buf);
    free(s);
}

/* frame_max: the longest frame to receive or send (the interface's MTU plus
 * the Ethernet header); the largest read answer, 36 + 512 * scnt, must fit. */
struct aoe_srv *aoe_srv_new(int frame_max)
{
    if (frame_max < ETH_MIN_FRAME || frame_max > 1 << 17) {
        errno = EINVAL;
        return NULL;
    }
    struct aoe_srv *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    if (pthread_mutex_init(&s->lock, NULL) != 0) {
        free(s);
        errno = ENOMEM;
        return NULL;
    }
    s->sock_fd = s->file_fd = -1;
    s->frame_max = (size_t)frame_max;
    s->slot_size = (SRV_ALIGN - ATA_HDR_LEN + (size_t)frame_max + SRV_ALIGN - 1) & ~(size_t)(SRV_ALIGN - 1);
    void *buf = NULL;
    if (posix_memalign(&buf, SRV_ALIGN, s->slot_size * SRV_BATCH) != 0) {
        aoe_srv_free(s);
        errno = ENOMEM;
        return NULL;
    }
    s->buf = buf;
    s->slow = s->slow_buf;
    for (int i = 0; i < SRV_BATCH; i++) {
        s->rx_iov[i].iov_base = srv_frame(s, i);
        s->rx_iov[i].iov_len = s->frame_max;
        s->rx_msg[i].msg_hdr.msg_iov = &s->rx_iov[i];
        s->rx_msg[i].msg_hdr.msg_iovlen = 1;
    }
    return s;
}

/* Replace the mask and reservation lists (6 bytes per MAC); an empty mask
 * list admits everybody, an empty reservation list too. */
int aoe_srv_set_lists(struct aoe_srv *s, const uint8_t *masks, int nmasks, const uint8_t *reserved, int nreserved)
{
    if (!s || nmasks < 0 || nmasks > SRV_MAX_MACS || nreserved < 0 || nreserved > SRV_MAX_MACS ||
        (nmasks && !masks) || (nreserved && !reserved))
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    if (nmasks)
        memcpy(s->masks, masks, (size_t)nmasks * 6);
    if (nreserved)
        memcpy(s->reserved, reserved, (size_t)nreserved * 6);
    s->nmasks = nmasks;
    s->nreserved = nreserved;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static int mac_listed(const uint8_t (*list)[6], int n, const uint8_t *mac)
{
    for (int i = 0; i < n; i++)
        if (memcmp(list[i], mac, 6) == 0)
            return 1;
    return 0;
}

/* What to do with one received frame, in AoeTarget.handle's order of checks.
 * Called with s->lock held. */
static int srv_classify(struct aoe_srv *s, const uint8_t *h, size_t len, int truncated)
{
    struct aoe_srv_counters *c = &s->c;
    if (truncated) {
        c->drop_oversize++;
        return SRV_DROP;
    }
    if (len < AOE_HDR_LEN) {
        c->drop_short++;
        return SRV_DROP;
    }
    if (h[12] != (ETH_P_AOE >> 8) || h[13] != (ETH_P_AOE & 0xFF)) {
        c->drop_not_aoe++;
        return SRV_DROP;
    }
    if ((h[14] & 0xF0) != AOE_VER_FLAGS) {
        c->drop_version++;
        return SRV_DROP;
    }
    if (h[14] & AOEFL_RSP) {
        c->drop_response++;
        return SRV_DROP;
    }
    unsigned shelf = (unsigned)h[16] << 8 | h[17], slot = h[18];
    if ((shelf != s->shelf && shelf != AOE_SHELF_ANY) || (slot != s->slot && slot != AOE_SLOT_ANY)) {
        c->drop_other_target++;
        return SRV_DROP;
    }
    if (s->nmasks && !mac_listed((const uint8_t (*)[6])s->masks, s->nmasks, h + 6)) {
        c->drop_masked++;
        return SRV_DROP;
    }
    if (h[19] != AOECMD_ATA || shelf != s->shelf || slot != s->slot || len < ATA_HDR_LEN)
        return SRV_SLOW;
    uint8_t cmd = h[27];
    if (cmd != ATA_READ && cmd != ATA_READ_EXT && cmd != ATA_WRITE && cmd != ATA_WRITE_EXT)
        return SRV_SLOW;
    if (s->nreserved && !mac_listed((const uint8_t (*)[6])s->reserved, s->nreserved, h + 6))
        return SRV_SLOW;                    /* aoe.py answers "reserved" */
    int write = cmd == ATA_WRITE || cmd == ATA_WRITE_EXT;
    if (h[26] > s->scnt || (write && len - ATA_HDR_LEN < (size_t)h[26] * SECTOR_SIZE))
        return SRV_SLOW;                    /* aoe.py answers "bad argument" */
    return SRV_FAST;
}

/* Do one READ/WRITE and turn the request in place into its answer; returns
 * the answer's length.  Same answer as AoeTarget._ata: aflags and LBA echoed
 * (the LBA re-encoded as the request's EXT bit says), count 0, status DRDY or
 * ERR|DRDY with IDNF (past the end), ABRT (write to read-only) or UNC (I/O
 * error or short transfer: never a partial success). */
static size_t srv_answer(struct aoe_srv *s, uint8_t *h)
{
    uint8_t cmd = h[27], count = h[26];
    int write = cmd == ATA_WRITE || cmd == ATA_WRITE_EXT;
    int cmd_ext = cmd == ATA_READ_EXT || cmd == ATA_WRITE_EXT;
    uint64_t lba;
    if (h[24] & AOEAFL_EXT) {
        lba = 0;
        for (int i = 5; i >= 0; i--)
            lba = lba << 8 | h[28 + i];
    } else {
        lba = (uint64_t)h[28] | (uint64_t)h[29] << 8 | (uint64_t)h[30] << 16 | (uint64_t)(h[31] & 0x0F) << 24;
        h[31] = 0xE0 | (h[31] & 0x0F);
        h[32] = h[33] = 0;
    }
    if (!cmd_ext)
        lba &= LBA28_MASK;

    uint8_t status = ATA_ST_DRDY, err = 0;
    size_t bytes = (size_t)count * SECTOR_SIZE, data = 0;
    if (lba + count > s->sectors) {
        status |= ATA_ST_ERR;
        err = ATA_ER_IDNF;
    } else if (write && s->readonly) {
        status |= ATA_ST_ERR;
        err = ATA_ER_ABRT;
    } else if (bytes) {
        off_t off = (off_t)(s->base + lba * SECTOR_SIZE);
        ssize_t n = write ? pwrite(s->file_fd, h + ATA_HDR_LEN, bytes, off)
                          : pread(s->file_fd, h + ATA_HDR_LEN, bytes, off);
        if (n < 0 || (size_t)n != bytes) {
            status |= ATA_ST_ERR;
            err = ATA_ER_UNC;
            s->c.io_errors++;
        } else if (write) {
            s->c.sectors_written += count;
        } else {
            s->c.sectors_read += count;
            data = bytes;
        }
    }

    memcpy(h, h + 6, 6);                    /* back to the requester, from us */
    memcpy(h + 6, s->mac, 6);
    h[14] = AOE_VER_FLAGS | AOEFL_RSP;
    h[15] = 0;
    h[25] = err;
    h[26] = 0;
    h[27] = status;
    h[34] = h[35] = 0;
    size_t len = ATA_HDR_LEN + data;
    if (len < ETH_MIN_FRAME) {
        memset(h + len, 0, ETH_MIN_FRAME - len);
        len = ETH_MIN_FRAME;
    }
    return len;
}

/* Send n answers.  A full socket is waited for briefly; an answer it still
 * refuses is counted as lost (the initiator asks again). */
static void srv_send(struct aoe_srv *s, int n)
{
    int i = 0, tries = 0;
    while (i < n) {
        int sent = sendmmsg(s->sock_fd, s->tx_msg + i, (unsigned)(n - i), MSG_DONTWAIT);
        if (sent > 0) {
            i += sent;
            s->c.frames_sent += (uint64_t)sent;
            tries = 0;
            continue;
        }
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent < 0 && (errno == EAGAIN || errno == ENOBUFS) && ++tries < SRV_SEND_TRIES) {
            struct pollfd p = { .fd = s->sock_fd, .events = POLLOUT };
            poll(&p, 1, 1);
            continue;
        }
        s->c.send_lost++;
        i++;
        tries = 0;
    }
}

/* Sort one batch: drop, answer, or keep for aoe.py (s->slow).  Every frame
 * after the first one for aoe.py goes to aoe.py too, in order, as that one
 * may change the lists the later ones are judged by (a mask or reservation). */
static void srv_batch(struct aoe_srv *s, int n)
{
    uint8_t kind[SRV_BATCH];
    int slow = 0;
    pthread_mutex_lock(&s->lock);
    for (int i = 0; i < n; i++) {
        struct msghdr *m = &s->rx_msg[i].msg_hdr;
        kind[i] = slow ? SRV_SLOW
                       : (uint8_t)srv_classify(s, srv_frame(s, i), s->rx_msg[i].msg_len, (m->msg_flags & MSG_TRUNC) != 0);
        slow |= kind[i] == SRV_SLOW;
    }
    pthread_mutex_unlock(&s->lock);

    int ntx = 0;
    for (int i = 0; i < n; i++) {
        uint8_t *h = srv_frame(s, i);
        if (kind[i] == SRV_SLOW) {
            s->slow[s->nslow].data = h;
            s->slow[s->nslow].len = s->rx_msg[i].msg_len;
            s->nslow++;
            s->c.frames_slow++;
        } else if (kind[i] == SRV_FAST) {
            struct msghdr *m = &s->tx_msg[ntx].msg_hdr;
            memset(m, 0, sizeof(*m));
            s->tx_iov[ntx].iov_base = h;
            s->tx_iov[ntx].iov_len = srv_answer(s, h);
            m->msg_iov = &s->tx_iov[ntx];
            m->msg_iovlen = 1;
            ntx++;
            s->c.frames_fast++;
        }
    }
    if (ntx)
        srv_send(s, ntx);
}

/*
 * Receive and answer batches until a batch holds frames for aoe.py (returns
 * how many: s->slow lists them), timeout_us passes or a signal arrives
 * (returns 0), or the socket fails (-errno).  The slow frames stay valid
 * until the next call.
 */
int aoe_srv_pump(struct aoe_srv *s, int timeout_us)
{
    if (!s || s->sock_fd < 0 || s->file_fd < 0 || s->scnt < 0 || s->scnt > MAX_SPF ||
        ATA_HDR_LEN + (size_t)s->scnt * SECTOR_SIZE > s->frame_max)
        return -EINVAL;
    s->nslow = 0;
    int64_t deadline = aoe_now_us() + (timeout_us > 0 ? timeout_us : 0);
    struct pollfd pfd = { .fd = s->sock_fd, .events = POLLIN };
    for (;;) {
        for (int i = 0; i < SRV_BATCH; i++)
            s->rx_msg[i].msg_hdr.msg_flags = 0;
        int n = recvmmsg(s->sock_fd, s->rx_msg, SRV_BATCH, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EINTR)
                return 0;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return -errno;
            n = 0;
        }
        if (n > 0) {
            s->c.frames_recv += (uint64_t)n;
            s->c.batches++;
            srv_batch(s, n);
            if (s->nslow)
                return s->nslow;
        }
        int64_t now = aoe_now_us();
        if (now >= deadline)
            return 0;
        if (n == SRV_BATCH)
            continue;                       /* more may be queued */
        int64_t wait = deadline - now;
        struct timespec ts = { wait / 1000000, (wait % 1000000) * 1000 };
        int r = ppoll(&pfd, 1, &ts, NULL);
        if (r < 0)
            return errno == EINTR ? 0 : -errno;
        if (r == 0)
            return 0;
    }
}
