/*
 * _aoeio.c - compiled helper for aoe.py, built by build_ffi.py (cffi).
 *
 * Mechanism only: aoe.py decides windows, retransmit timeouts and failover;
 * this file moves frames in batches and tells aoe.py what happened.
 * Linux only.  No global state.  Errors are returned as negative errno.
 *
 * What aoe.py sees of this file is written once, in the blocks between
 * ABI-BEGIN and ABI-END: build_ffi.py hands their text to cffi as its cdef.
 * There every #define becomes a constant whose value cffi takes from the
 * compiler (aoe.py checks its own copies against them when it loads the
 * helper, and refuses a helper that disagrees), a struct's fields after its
 * "private" line are hidden from Python ("...;"), and every function aoe.py
 * calls has its prototype, which the compiler holds to the definition.
 *
 * Some decisions are made here as well as in aoe.py, for speed.  The rule every
 * fast path here follows: it may decline a case and hand it to aoe.py, never
 * accept what aoe.py would refuse.  Each decision mirrored, and the test that
 * holds the pair equal:
 *   the constants of the ABI blocks = aoe.py's of the same names (HELPER_CONSTANTS),
 *       struct aoe_path's and aoe_counters' fields = PumpPath's and PUMP_COUNTERS:
 *       checked at load (helper_mismatch; test_helper_and_aoe_py_share_one_definition);
 *   the request ids' layouts (ublk_request_id, nbd_request_id, PROBE_REQ and their
 *       readers) = aoe.py's UblkBridge.request_id and NbdBridge.request_id (and _of)
 *       (test_request_ids_are_made_and_read_alike_by_the_helper_and_aoe_py);
 *   the request frames: aoe_submit's split into frames and build_header's bytes
 *       (addresses, tag, ATA command for the op and LBA48, count, LBA) = PyPump's
 *       (test_pumps_agree_and_take_only_true_answers compares every byte sent);
 *   the tag and generation rule (frame_tag, tag_slot; handle_answer's "back": which
 *       transmission an answer names, generations 1..GEN_MAX, 0 naming none) =
 *       PyPump's (test_pumps_agree_and_take_only_true_answers,
 *       test_a_tag_of_generation_0_answers_nothing);
 *   handle_answer's checks and drop reasons = PyPump's
 *       (test_pumps_agree_and_take_only_true_answers: both pumps, scripted answers);
 *   when a frame counts as lost (frame_lost: rto_us, or reorder_us once a frame sent
 *       after it was answered) = PyPump._lost (test_pumps_agree_and_take_only_true_answers
 *       drives both clauses);
 *   which frames of a request failed (aoe_eng.failed) = PyPump.failed
 *       (test_engine_names_the_frames_the_target_failed_and_keeps_the_others);
 *   when aoe_pump spins (polls before it sleeps: spin_us while frames are in flight
 *       and there is no extra_fd, lone_spin_us while a bridge holds at most one
 *       request) = what Engine.spin_for sets them for
 *       (test_helper_pump_spins_only_for_fast_paths_and_still_takes_only_true_answers);
 *   ublk admission (ublk_bridge_submit's opcode, bounds and read-only checks) =
 *       UblkBackend._start's, which sees every request the bridge declines
 *       (test_ublk_bridge_admits_only_what_python_would_submit);
 *   nbd admission (nbd_start's) = NbdBackend.refusal and Engine.submit's bounds
 *       (test_nbd_bridge_in_the_helper_serves_the_stream_through_the_engine and
 *       test_nbd_server_takes_requests_however_the_stream_is_cut expect the same answers);
 *   srv_classify's order of checks = AoeTarget.handle's, the AoE framing
 *       (test_serve_fast_path_answers_exactly_like_python);
 *   srv_ata_takes, srv_ata_check and srv_ata_left, the ATA meaning of a
 *       READ/WRITE (IDNF/ABRT, LBA28 or 48, what is handed over, unreadable
 *       sectors included) = AtaDisk.execute's
 *       (test_serve_fast_path_executes_ata_like_python, through aoe_srv_ata;
 *       test_serve_fast_path_answers_exactly_like_python[bad], in frames).
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE                 /* ppoll, sendmmsg, recvmmsg, syscall */
#endif
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <linux/io_uring.h>
#include <linux/time_types.h>
#include <linux/ublk_cmd.h>

/* ========================================================================== */
/* Frame engine: ATA requests split into AoE frames, sent and matched          */
/* ========================================================================== */
/*
 * Every frame of a request owns a slot from submit to completion.  Its tag on
 * the wire is TAG_USER | TAG_ENGINE | generation << 16 | slot << 1 | parity: the
 * generation moves on at every transmission, so an answer names the exact
 * transmission it answers, and the parity bit makes every valid tag even, so a
 * tag with one bit flipped never names a frame.  An answer is accepted for any
 * transmission of the frame (one to a transmission given up as lost means the
 * resend was spurious, which aoe.py is told so it can undo what it did about
 * the "loss"), and only when its ATA header echoes the frame's: command flags,
 * LBA and at most its sector count.
 * A slot sits on exactly one list: free, pending (FIFO; resends go to the
 * head), or the in-flight list of the path that carries it (oldest first,
 * so expiry checks stop at the first young frame).
 */

#define MAX_SPF         255         /* the ATA sector count field is one byte */

#define TX_BATCH        64
#define RX_BATCH        64
#define RX_ROUNDS       4           /* recvmmsg calls per socket before refilling windows */
#define RX_CATCH_UP     64          /* ... when catching up at the start of a pump */

#define NONE            UINT32_MAX
#define NO_ANSWER       UINT16_MAX

enum { FRAME_FREE, FRAME_PENDING, FRAME_INFLIGHT };

struct ublk_queue;
struct ublk_req;
struct nbd_req;
struct nbd_bridge;
struct aoe_frame;
struct aoe_request;
struct aoe_tx_batch;

/* ABI-BEGIN: the frame engine */
#define ETH_P_AOE       0x88A2
#define ETH_ZLEN        60          /* shorter frames are padded to this */
#define ATA_HDR_LEN     36          /* Ethernet 14 + AoE 10 + ATA argument 12 */
#define AOE_HVER        0x10        /* version 1, in the high nibble; no flags */
#define AOEFL_RSP       0x08
#define AOEFL_ERR       0x04
#define AOECMD_ATA      0
#define ATA_ERR         0x01        /* ATA status bits */
#define ATA_DF          0x20
#define MAX_PATHS   16
#define SECTOR_SIZE     512
#define AOEAFL_EXT      0x40
#define AOEAFL_WRITE    0x01
#define ATA_CMD_PIO_READ        0x20
#define ATA_CMD_PIO_READ_EXT    0x24
#define ATA_CMD_PIO_WRITE       0x30
#define ATA_CMD_PIO_WRITE_EXT   0x34
#define ATA_CMD_FLUSH       0xE7
#define ATA_CMD_FLUSH_EXT   0xEA

/* Engine tags have bits 31 (TAG_USER: a user-space initiator's) and 30 set; aoe.py's
 * own queries never set both, so their answers can never be taken for data. */
#define TAG_USER        0x80000000u
#define TAG_ENGINE      0x40000000u
#define GEN_MAX         0x3FFF      /* generations run 1..GEN_MAX in bits 16..29 */
#define MAX_FRAMES      0x8000      /* slots in bits 1..15; bit 0 is the parity */

/* Request ids (aoe_submit's req_id), laid out here once; aoe.py decodes them with the
 * functions below too:
 *   BRIDGE_ID | op << 16 | tag    a request the ublk bridge took (op: UBLK_IO_OP_*)
 *   NBD_ID | op << 32 | slot      a request of the nbd bridge, submitted by it or by
 *                                 aoe.py (op: OP_*)
 *   PROBE_REQ                     aoe.py's probe of a target that went silent
 *   any other                     aoe.py's own (a ublk tag, a counter; all below 2^32) */
#define BRIDGE_ID       (1ULL << 62)
#define NBD_ID          (1ULL << 61)
#define PROBE_REQ       (1ULL << 40)
#define BRIDGE_ID_FIELDS 0xFFFFFFULL        /* op and tag */
#define NBD_ID_FIELDS   0xFFFFFFFFFFULL     /* op and slot */

static inline uint64_t ublk_request_id(unsigned op, unsigned tag)
{
    return BRIDGE_ID | (uint64_t)(op & 0xFF) << 16 | (tag & 0xFFFF);
}

/* Whether id is one ublk_request_id made (every other bit clear). */
static inline int is_ublk_request_id(uint64_t id)
{
    return (id & ~BRIDGE_ID_FIELDS) == BRIDGE_ID;
}

static inline unsigned ublk_request_op(uint64_t id)
{
    return (unsigned)(id >> 16 & 0xFF);
}

static inline unsigned ublk_request_tag(uint64_t id)
{
    return (unsigned)(id & 0xFFFF);
}

static inline uint64_t nbd_request_id(unsigned op, uint32_t slot)
{
    return NBD_ID | (uint64_t)(op & 0xFF) << 32 | slot;
}

/* Whether id is one nbd_request_id made (every other bit clear). */
static inline int is_nbd_request_id(uint64_t id)
{
    return (id & ~NBD_ID_FIELDS) == NBD_ID;
}

static inline unsigned nbd_request_op(uint64_t id)
{
    return (unsigned)(id >> 32 & 0xFF);
}

static inline uint32_t nbd_request_slot(uint64_t id)
{
    return (uint32_t)id;
}

/* A request's status: 0, -(STATUS_AOE_ERROR | AoE error code),
 * -(STATUS_ATA_ERROR | ATA error register) or -errno. */
#define STATUS_AOE_ERROR 0x100
#define STATUS_ATA_ERROR 0x200

enum { OP_READ, OP_WRITE, OP_FLUSH };

struct aoe_counters {
    uint64_t frames_sent, frames_resent, frames_recv, bytes_data;
    uint64_t resent_needed;         /* answers to a resend: the transmission before got none
                                     * in time */
    uint64_t resent_spurious;       /* answers to the transmission before a resend, which was
                                     * spurious */
    uint64_t drop_short;
    uint64_t drop_not_response;
    uint64_t drop_version;
    uint64_t drop_foreign;
    uint64_t drop_bad_mac;
    uint64_t drop_stale;            /* a tag of no transmission waiting: duplicate,
                                     * another's, ... */
    uint64_t drop_late;             /* an earlier transmission of a frame a resend completed */
    uint64_t drop_bad_tag;          /* a tag failing its parity: corrupted */
    uint64_t drop_echo;             /* the ATA header does not echo the frame's: misdirected */
    uint64_t errors;
    uint64_t send_eagain;
    uint64_t frames_in_place;       /* read answers received straight into their request's
                                     * buffer, no copy */
};

struct aoe_path {
    int fd;
    uint8_t src[6], dst[6];
    int maxout;
    int outstanding;
    int enabled;
    uint32_t rto_us;                /* a frame unanswered this long is lost (set by aoe.py) */
    uint32_t reorder_us;            /* ... or this long, once a later frame was answered (aoe.py) */
    int64_t newest_answered_us;     /* when the latest-sent transmission answered so far was sent */
    uint64_t sent, recv;
    int64_t last_recv_us;
    /* During the last aoe_pump: round trips of the transmissions answered
     * (every answer names its transmission, so resends count too), and
     * answers to transmissions already given up as lost (spurious resends).
     * aoe.py updates its estimate once per pump from these, not per frame. */
    uint32_t rtt_n, rtt_max_us;
    uint64_t rtt_sum_us;
    uint32_t spurious;
    uint32_t needed;                /* answers to resends whose earlier transmissions had none */
    uint32_t late;                  /* ... which then came after all: those resends were not
                                     * needed */
};

struct aoe_event { uint64_t req_id; int32_t status; };

/* A frame the target failed (ATA or AoE error): which sectors of the request were not done.
 * Its request goes on with its other frames and ends with the first failure's status. */
struct aoe_frame_failure { uint64_t req_id; uint64_t lba; uint32_t nsect; int32_t status; };

struct aoe_eng {
    uint16_t shelf; uint8_t slot; uint8_t lba48;
    uint8_t flush_cmd;                      /* ATA opcode for OP_FLUSH, chosen by aoe.py */
    int sectors_per_frame;
    int npaths; struct aoe_path paths[MAX_PATHS];
    struct aoe_counters c;
    int ndone;    struct aoe_event *done;
    int nexpired; uint32_t *expired;
    int nfailed; struct aoe_frame_failure *failed;  /* frames failed during the last aoe_pump, at
                                                     * most max_frames ... */
    int failed_unlisted;                            /* ... and how many more there were */
    int inflight_frames; int pending_frames; int active_requests;
    /* The bridge aoe_pump serves itself, if any (see "Bridges" below): a ublk queue
     * (aoe_eng_bridge) or the kernel's nbd socket (aoe_nbd_bridge). */
    int bridge_on;                          /* 0: hand every request to aoe.py (e.g. target down) */
    int bridge_finished;                    /* its source is gone: every tag of the queue dead
                                             * (stopped or aborted), or the nbd stream ended */
    int bridge_error;                       /* last failure of a ublk call or of the nbd socket
                                             * inside aoe_pump, -errno */
    uint64_t bridge_sectors;                /* device size: requests past it go to aoe.py */
    int nhanded;                            /* requests left to aoe.py by the last aoe_pump: */
    struct ublk_req *ublk_handed;           /* ... the ublk bridge's, */
    struct nbd_req *nbd_handed;             /* ... the nbd bridge's */
    int nbd_open;                           /* nbd requests read from the socket, not yet
                                             * answered */
    int spin_us;                            /* waiting for answers with no extra_fd: poll the
                                             * sockets this long before sleeping (aoe.py sets it) */
    int lone_spin_us;                       /* a bridge with at most one request in hand: poll
                                             * the sockets and extra_fd this long (aoe.py sets it) */

    /* private */
    uint32_t max_frames;
    int64_t last_event_us;                  /* when aoe_pump's last poll found something */
    struct aoe_frame *frames;
    struct aoe_request *reqs;
    uint32_t free_frame, free_tail, nfree_frames, free_req;   /* free slots rest FIFO: late answers
                                                                * find them still free */
    uint32_t pend_head, pend_tail;
    uint32_t fly_head[MAX_PATHS], fly_tail[MAX_PATHS];
    int rr;                                 /* path to try first for the next frame */
    int nfds;                               /* distinct sockets among the paths */
    int fds[MAX_PATHS];
    uint8_t path_fd[MAX_PATHS];             /* path -> index in fds[] */
    struct aoe_tx_batch *tx[MAX_PATHS];     /* per socket */
    struct aoe_event *done_buf;             /* aoe_pump's events */
    struct aoe_event *fail_buf;             /* aoe_fail_all's, so it never overwrites the former */
    size_t rx_slot_size;                    /* bytes per receive slot, grows with
                                             * sectors_per_frame */
    uint8_t *rx_buf;
    struct mmsghdr rx_msg[RX_BATCH];
    struct iovec rx_iov[RX_BATCH][3];       /* header, the aimed-at frame's data, the rest */
    uint32_t rx_aim[RX_BATCH];              /* the frame each receive slot is aimed at, or NONE */
    const struct aoe_bridge_ops *bridge;    /* the bridge's functions, or NULL: none */
    void *bridge_state;                     /* ... and its own state */
    int bridge_readonly;                    /* writes go to aoe.py (which refuses them) */
};

int64_t aoe_now_us(void);
struct aoe_eng *aoe_eng_new(uint16_t shelf, uint8_t slot, int max_frames, uint16_t gen_seed);
void aoe_eng_free(struct aoe_eng *e);
int aoe_eng_add_path(struct aoe_eng *e, int fd, const uint8_t *src6, const uint8_t *dst6);
int aoe_submit(struct aoe_eng *e, uint64_t req_id, int op, uint64_t lba, uint32_t nsect, void *buf);
int aoe_pump(struct aoe_eng *e, int timeout_us, int extra_fd);
int aoe_resend(struct aoe_eng *e, uint32_t frame_slot);
int aoe_frame_path(struct aoe_eng *e, uint32_t frame_slot);
int aoe_fail_all(struct aoe_eng *e, int32_t status);
/* ABI-END */

/* One transmission of a frame. */
struct aoe_tx {
    int64_t sent_us;
    uint16_t gen;
    uint8_t path;
};

struct aoe_frame {
    uint8_t *data;          /* this frame's bytes in the caller's buffer; NULL for flush */
    uint64_t lba;
    struct aoe_tx last;     /* the latest transmission */
    struct aoe_tx before;   /* the one before it, while ntx > 1 */
    uint32_t req;           /* index in reqs[] */
    uint32_t next, prev;    /* links of whichever list holds the slot */
    uint16_t ntx;           /* transmissions of this request's frame so far (saturating); the
                             * slot's generations go on from last.gen across requests */
    uint8_t nsect;
    uint8_t state;
    uint8_t path;           /* the path whose in-flight list holds it */
    uint8_t reported;       /* expiry of the latest transmission already reported */
    uint16_t done_back;     /* while free: which transmission's answer completed it (0 the
                             * latest; NO_ANSWER if none), to recognise late answers */
};

struct aoe_request {
    uint64_t id;
    uint32_t frames_left;
    uint32_t next_free;
    int32_t status;         /* first error seen, 0 while all is well */
    uint8_t op;
    uint8_t lba48;          /* eng->lba48 at submit */
};

/* Frames gathered for one socket, sent with one sendmmsg; a frame the socket
 * refuses gets back its transmission record from before staging. */
struct aoe_tx_batch {
    int n;
    uint32_t slot[TX_BATCH];
    struct aoe_tx last[TX_BATCH], before[TX_BATCH];
    uint16_t ntx[TX_BATCH];
    struct mmsghdr msg[TX_BATCH];
    struct iovec iov[TX_BATCH][2];          /* header, then write data in place */
    uint8_t hdr[TX_BATCH][ETH_ZLEN];
};


/*
 * What aoe_pump asks of a bridge: the one place where it meets the ublk and nbd
 * bridges (their sections below implement it).  A bridge takes requests from its
 * source and submits them to the engine itself, or hands them to aoe.py (e->nhanded);
 * it answers those that succeed, and leaves every other event in done[] for aoe.py.
 */
struct aoe_bridge_ops {
    void (*take)(struct aoe_eng *e);                /* what the source sent: into the
                                                     * engine, or handed to aoe.py */
    void (*settle)(struct aoe_eng *e);              /* the requests in done[] that succeeded
                                                     * answered, taken out of done[] */
    short (*poll_events)(const struct aoe_eng *e);  /* what to wait for on the source's fd
                                                     * (aoe_pump's extra_fd) */
    void (*release)(struct aoe_eng *e);             /* its state freed (bridge_state) */
};

/* The engine's bridge ended: its state freed, aoe_pump on its own again. */
static void bridge_end(struct aoe_eng *e)
{
    if (e->bridge)
        e->bridge->release(e);
    e->bridge = NULL;
    e->bridge_state = NULL;
    e->nhanded = 0;
}

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
    e->frames[s].prev = e->pend_tail;
    if (e->pend_tail == NONE)
        e->pend_head = s;
    else
        e->frames[e->pend_tail].next = s;
    e->pend_tail = s;
}

static void pending_push_head(struct aoe_eng *e, uint32_t s)
{
    e->frames[s].prev = NONE;
    e->frames[s].next = e->pend_head;
    if (e->pend_head == NONE)
        e->pend_tail = s;
    else
        e->frames[e->pend_head].prev = s;
    e->pend_head = s;
}

static void pending_unlink(struct aoe_eng *e, uint32_t s)
{
    struct aoe_frame *f = &e->frames[s];
    if (f->prev == NONE)
        e->pend_head = f->next;
    else
        e->frames[f->prev].next = f->next;
    if (f->next == NONE)
        e->pend_tail = f->prev;
    else
        e->frames[f->next].prev = f->prev;
    e->pending_frames--;
}

static uint32_t pending_pop(struct aoe_eng *e)
{
    uint32_t s = e->pend_head;
    pending_unlink(e, s);
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

static void frame_release(struct aoe_eng *e, uint32_t s, uint16_t done_back)
{
    e->frames[s].state = FRAME_FREE;
    e->frames[s].done_back = done_back;
    e->frames[s].next = NONE;
    if (e->free_frame == NONE)
        e->free_frame = s;
    else
        e->frames[e->free_tail].next = s;
    e->free_tail = s;
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

/* Back to the head of pending, to be sent again first. */
static void frame_requeue(struct aoe_eng *e, uint32_t s)
{
    e->frames[s].state = FRAME_PENDING;
    pending_push_head(e, s);
    e->pending_frames++;
}

#define ENGINE_TAG      (TAG_USER | TAG_ENGINE)     /* both bits: a tag of the engine */

/* The tag of generation gen of slot s: even parity over all 32 bits. */
static uint32_t frame_tag(uint16_t gen, uint32_t s)
{
    uint32_t t = ENGINE_TAG | (uint32_t)gen << 16 | s << 1;
    return t | (uint32_t)(__builtin_popcount(t) & 1);
}

/* The frame slot a tag names (valid only if the tag is the engine's). */
static uint32_t tag_slot(uint32_t tag)
{
    return tag >> 1 & (MAX_FRAMES - 1);
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
        memset(&e->rx_msg[i].msg_hdr, 0, sizeof(e->rx_msg[i].msg_hdr));
        e->rx_msg[i].msg_hdr.msg_iov = e->rx_iov[i];
    }
    return 0;
}

void aoe_eng_free(struct aoe_eng *e)
{
    if (!e)
        return;
    bridge_end(e);
    for (int i = 0; i < e->nfds; i++)
        free(e->tx[i]);
    free(e->frames);
    free(e->reqs);
    free(e->done_buf);
    free(e->fail_buf);
    free(e->expired);
    free(e->failed);
    free(e->rx_buf);
    free(e);
}

/* gen_seed: where every slot's generations start (random, so that late answers
 * to an earlier engine on the same target are stale for this one). */
struct aoe_eng *aoe_eng_new(uint16_t shelf, uint8_t slot, int max_frames, uint16_t gen_seed)
{
    if (max_frames < 1 || max_frames > MAX_FRAMES) {
        errno = EINVAL;
        return NULL;
    }
    struct aoe_eng *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->shelf = shelf;
    e->slot = slot;
    e->lba48 = 1;
    e->flush_cmd = ATA_CMD_FLUSH_EXT;
    e->sectors_per_frame = 2;               /* fits a 1500-byte MTU until aoe.py says more */
    e->max_frames = (uint32_t)max_frames;
    e->frames = calloc(max_frames, sizeof(*e->frames));
    e->reqs = calloc(max_frames, sizeof(*e->reqs));
    e->done_buf = calloc(max_frames, sizeof(*e->done_buf));
    e->fail_buf = calloc(max_frames, sizeof(*e->fail_buf));
    e->expired = calloc(max_frames, sizeof(*e->expired));
    e->failed = calloc(max_frames, sizeof(*e->failed));
    if (!e->frames || !e->reqs || !e->done_buf || !e->fail_buf || !e->expired || !e->failed) {
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
    for (uint32_t i = 0; i < (uint32_t)max_frames; i++) {
        e->frames[i].last.gen = gen_seed % GEN_MAX + 1;
        frame_release(e, i, NO_ANSWER);
    }
    for (uint32_t i = (uint32_t)max_frames; i-- > 0;) {
        e->reqs[i].next_free = e->free_req;
        e->free_req = i;
    }
    e->pend_head = e->pend_tail = NONE;
    for (int p = 0; p < MAX_PATHS; p++)
        e->fly_head[p] = e->fly_tail[p] = NONE;
    return e;
}

int aoe_eng_add_path(struct aoe_eng *e, int fd, const uint8_t *src6, const uint8_t *dst6)
{
    if (!e || !src6 || !dst6)
        return -EINVAL;
    if (fd < 0)
        return -EBADF;
    if (e->npaths >= MAX_PATHS)
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
    pa->rto_us = pa->reorder_us = 250000;   /* until aoe.py has an RTT estimate */
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
        f->ntx = 0;
        f->reported = 0;
        pending_push_tail(e, s);
        done += n;
    }
    e->pending_frames += (int)nframes;
    return 0;
}

/* A frame answered by its transmission `back` (0 the latest) is done; its
 * request completes with its last frame. */
static void frame_finish(struct aoe_eng *e, uint32_t s, int32_t status, uint16_t back)
{
    struct aoe_frame *f = &e->frames[s];
    struct aoe_request *rq = &e->reqs[f->req];
    if (f->state == FRAME_INFLIGHT)
        frame_land(e, s);
    else
        pending_unlink(e, s);               /* answered while waiting to be resent */
    if (status && !rq->status)
        rq->status = status;
    if (status && e->nfailed < (int)e->max_frames)
        e->failed[e->nfailed++] = (struct aoe_frame_failure){ rq->id, f->lba, f->nsect, status };
    else if (status)
        e->failed_unlisted++;
    if (--rq->frames_left == 0) {
        e->done[e->ndone].req_id = rq->id;
        e->done[e->ndone].status = rq->status;
        e->ndone++;
        request_release(e, f->req);
    }
    frame_release(e, s, back);
}

/* Take an in-flight frame off its path and send it again first, with a new
 * generation (given when it goes out).  An answer to the transmission given up
 * still completes the frame, until it is resent once more: then it is stale. */
int aoe_resend(struct aoe_eng *e, uint32_t frame_slot)
{
    if (!e || frame_slot >= e->max_frames || e->frames[frame_slot].state != FRAME_INFLIGHT)
        return -EINVAL;
    frame_land(e, frame_slot);
    frame_requeue(e, frame_slot);
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
        frame_release(e, s, NO_ANSWER);
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

static void build_header(const struct aoe_eng *e, const struct aoe_path *pa,
                         const struct aoe_frame *f, const struct aoe_request *rq,
                         uint32_t tag, uint8_t *h)
{
    static const uint8_t cmd28[] = { ATA_CMD_PIO_READ, ATA_CMD_PIO_WRITE };
    static const uint8_t cmd48[] = { ATA_CMD_PIO_READ_EXT, ATA_CMD_PIO_WRITE_EXT };
    uint64_t lba = f->lba;
    int op = rq->op;

    memcpy(h, pa->dst, 6);
    memcpy(h + 6, pa->src, 6);
    h[12] = ETH_P_AOE >> 8;
    h[13] = ETH_P_AOE & 0xFF;
    h[14] = AOE_HVER;
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
    memset(h + ATA_HDR_LEN, 0, ETH_ZLEN - ATA_HDR_LEN);
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

/* Put a pending frame on path p (as if sent: counted against the window) and
 * in the batch, as a new transmission with the next generation. */
static void stage_frame(struct aoe_eng *e, uint32_t s, int p, int64_t now)
{
    struct aoe_frame *f = &e->frames[s];
    struct aoe_path *pa = &e->paths[p];
    struct aoe_tx_batch *b = e->tx[e->path_fd[p]];
    const struct aoe_request *rq = &e->reqs[f->req];
    int i = b->n++;

    b->last[i] = f->last;
    b->before[i] = f->before;
    b->ntx[i] = f->ntx;
    if (f->ntx)
        f->before = f->last;
    f->last.gen = f->last.gen % GEN_MAX + 1;
    f->last.path = (uint8_t)p;
    f->last.sent_us = now;
    if (f->ntx < UINT16_MAX)
        f->ntx++;
    f->state = FRAME_INFLIGHT;
    f->path = (uint8_t)p;
    f->reported = 0;
    fly_append(e, p, s);
    pa->outstanding++;
    e->inflight_frames++;

    build_header(e, pa, f, rq, frame_tag(f->last.gen, s), b->hdr[i]);
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
        b->iov[i][0].iov_len = ETH_ZLEN;
        m->msg_iovlen = 1;
    }
    b->slot[i] = s;
}

/* Send one socket's batch.  Frames the socket did not take go back to the head
 * of pending in order, as if never staged.  Returns 0, or -errno for an error
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
        if (f->ntx > 1)
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
            struct aoe_frame *f = &e->frames[s];
            frame_land(e, s);
            f->last = b->last[i];
            f->before = b->before[i];
            f->ntx = b->ntx[i];
            frame_requeue(e, s);
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

/* Two MAC addresses the same?  (Inline: a call to memcmp per answer showed in profiles.) */
static inline int mac_equal(const uint8_t *a, const uint8_t *b)
{
    uint32_t a4, b4;
    uint16_t a2, b2;
    memcpy(&a4, a, 4), memcpy(&b4, b, 4), memcpy(&a2, a + 4, 2), memcpy(&b2, b + 4, 2);
    return a4 == b4 && a2 == b2;
}

/* The LBA an answer's ATA header carries, as many bits as the command has. */
static uint64_t echoed_lba(const uint8_t *h, int lba48)
{
    uint64_t lba = 0;
    for (int i = lba48 ? 5 : 3; i >= 0; i--)
        lba = lba << 8 | h[28 + i];
    return lba48 ? lba : lba & 0x0FFFFFFF;
}

/* Check one received frame; only a frame proven to answer a transmission of
 * ours that is still waiting may touch the caller's buffer. */
static void handle_answer(struct aoe_eng *e, const uint8_t *h, size_t len, const uint8_t *data,
                          int64_t now)
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
    if (__builtin_popcount(tag) & 1) {
        c->drop_bad_tag++;
        return;
    }
    uint32_t s = tag_slot(tag);
    if ((tag & ENGINE_TAG) != ENGINE_TAG || s >= e->max_frames) {     /* no slot of ours */
        c->drop_stale++;
        return;
    }
    struct aoe_frame *f = &e->frames[s];
    /* Which transmission it answers: 0 the latest, 1 the one before, ...; generations run
     * 1..GEN_MAX, so 0 names none (else it would pass for GEN_MAX) */
    unsigned gen = tag >> 16 & GEN_MAX;
    unsigned back = (unsigned)(f->last.gen + GEN_MAX - gen) % GEN_MAX;
    if (!gen || back >= f->ntx) {
        c->drop_stale++;
        return;
    }
    const struct aoe_tx *tx = back == 0 ? &f->last : back == 1 ? &f->before : NULL;
    int p = tx ? tx->path : 0;
    if (!tx)                                /* an older one: whichever of our paths it came by */
        while (p < e->npaths - 1 && !mac_equal(h + 6, e->paths[p].dst))
            p++;
    struct aoe_path *pa = &e->paths[p];
    if (f->state == FRAME_FREE) {
        if (f->done_back != NO_ANSWER && back > f->done_back && mac_equal(h + 6, pa->dst)) {
            /* a resend completed it, and this shows it need not have */
            pa->late++;
            c->drop_late++;
        } else {
            c->drop_stale++;
        }
        return;
    }
    if (!mac_equal(h + 6, pa->dst)) {
        c->drop_bad_mac++;
        return;
    }
    const struct aoe_request *rq = &e->reqs[f->req];
    uint8_t aflags = (rq->lba48 ? AOEAFL_EXT : 0) | (rq->op == OP_WRITE ? AOEAFL_WRITE : 0);
    if ((h[24] & (AOEAFL_EXT | AOEAFL_WRITE)) != aflags || h[26] > f->nsect ||
        echoed_lba(h, rq->lba48) != f->lba) {
        c->drop_echo++;
        return;
    }

    int32_t status = 0;
    size_t bytes = (size_t)f->nsect * SECTOR_SIZE;
    if (h[14] & AOEFL_ERR) {
        status = -(STATUS_AOE_ERROR | h[15]);
    } else if (h[27] & (ATA_ERR | ATA_DF)) {
        status = -(STATUS_ATA_ERROR | h[25]);
    } else if (rq->op == OP_READ) {
        if (len - ATA_HDR_LEN < bytes) {
            c->drop_short++;                /* still waiting; expiry will resend it */
            return;
        }
        if (data == f->data)
            c->frames_in_place++;
        else
            memcpy(f->data, data, bytes);
    }
    if (status)
        c->errors++;
    else if (f->data)
        c->bytes_data += bytes;
    c->frames_recv++;
    pa->recv++;
    pa->last_recv_us = now;
    if (tx) {
        if (tx->sent_us > pa->newest_answered_us)
            pa->newest_answered_us = tx->sent_us;
        uint32_t us = (uint32_t)(now - tx->sent_us);
        pa->rtt_n++;
        pa->rtt_sum_us += us;
        if (us > pa->rtt_max_us)
            pa->rtt_max_us = us;
    }
    if (back || f->state == FRAME_PENDING) {
        pa->spurious++;                     /* given up as lost, yet answered */
        c->resent_spurious++;
    } else if (f->ntx > 1) {
        pa->needed++;
        c->resent_needed++;
    }
    frame_finish(e, s, status, (uint16_t)back);
}

/* ---- receiving ------------------------------------------------------------ */
/*
 * Answers mostly come in the order their frames went out, so each receive slot
 * is aimed at the read frame expected next (the oldest first, passing over
 * frames already reported lost or sent before one that was answered): its
 * iovecs are the slot's header, that frame's data in the request's buffer, and
 * the rest of the slot.  A read answer that hits its aim needs no copy.
 * Why a miss is harmless: aims are distinct frames in flight, whose buffers
 * nobody reads before their own answer fills them, and every miss is moved
 * back into its slot before any answer of the batch is handled, so a true
 * answer handled later is copied over whatever the miss wrote.  Write frames
 * are never aimed at (their buffers hold the data to send) but take their
 * place in the order, as their answers do.
 */

/* The frames socket fi's next answers are expected for, one per receive slot. */
static void rx_aim(struct aoe_eng *e, int fi)
{
    int paths[MAX_PATHS], np = 0;
    uint32_t next[MAX_PATHS];
    for (int p = 0; p < e->npaths; p++)
        if (e->path_fd[p] == fi) {
            paths[np] = p;
            next[np++] = e->fly_head[p];
        }
    for (int i = 0; i < RX_BATCH; i++) {
        int best = -1;                      /* the path whose next frame went out first */
        for (int k = 0; k < np; k++) {
            const struct aoe_path *pa = &e->paths[paths[k]];
            uint32_t s = next[k];
            while (s != NONE && (e->frames[s].reported ||
                                 e->frames[s].last.sent_us < pa->newest_answered_us))
                s = e->frames[s].next;
            next[k] = s;
            if (s != NONE && (best < 0 ||
                              e->frames[s].last.sent_us < e->frames[next[best]].last.sent_us))
                best = k;
        }
        uint32_t s = best < 0 ? NONE : next[best];
        uint8_t *slot = e->rx_buf + i * e->rx_slot_size;
        struct iovec *v = e->rx_iov[i];
        e->rx_aim[i] = NONE;
        if (s == NONE || e->reqs[e->frames[s].req].op != OP_READ) {
            v[0] = (struct iovec){ slot, e->rx_slot_size };
            e->rx_msg[i].msg_hdr.msg_iovlen = 1;
        } else {
            v[0] = (struct iovec){ slot, ATA_HDR_LEN };
            v[1] = (struct iovec){ e->frames[s].data, (size_t)e->frames[s].nsect * SECTOR_SIZE };
            v[2] = (struct iovec){ slot + ATA_HDR_LEN, e->rx_slot_size - ATA_HDR_LEN };
            e->rx_msg[i].msg_hdr.msg_iovlen = 3;
            e->rx_aim[i] = s;
        }
        if (best >= 0)
            next[best] = e->frames[s].next;
    }
}

/* Receive slot i missed its aim: its data back into the slot after the header,
 * as if received there (cut at the slot's end, as a receive there would be). */
static void rx_unaim(struct aoe_eng *e, int i)
{
    const struct aoe_frame *f = &e->frames[e->rx_aim[i]];
    uint8_t *body = e->rx_buf + i * e->rx_slot_size + ATA_HDR_LEN;
    size_t room = e->rx_slot_size - ATA_HDR_LEN;
    size_t len = e->rx_msg[i].msg_len;
    if (len > ATA_HDR_LEN) {
        size_t got = len - ATA_HDR_LEN;
        size_t aimed = (size_t)f->nsect * SECTOR_SIZE;          /* never more than room */
        size_t first = got < aimed ? got : aimed;               /* in the frame's buffer */
        size_t rest = got - first;                              /* at body */
        if (rest > room - first)
            rest = room - first;
        memmove(body + first, body, rest);
        memcpy(body, f->data, first);
        e->rx_msg[i].msg_len = (unsigned)(ATA_HDR_LEN + first + rest);
    }
    e->rx_aim[i] = NONE;
}

/* Read what socket fi holds, in batches, for at most `rounds` batches; returns the
 * number of frames read. */
static int drain_socket(struct aoe_eng *e, int fi, int rounds)
{
    int got = 0;
    for (int round = 0; round < rounds; round++) {
        rx_aim(e, fi);
        int n = recvmmsg(e->fds[fi], e->rx_msg, RX_BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0)
            break;
        got += n;
        for (int i = 0; i < n; i++) {
            const uint8_t *h = e->rx_buf + i * e->rx_slot_size;
            if (e->rx_aim[i] != NONE &&
                (e->rx_msg[i].msg_len < ATA_HDR_LEN || tag_slot(be32(h + 20)) != e->rx_aim[i]))
                rx_unaim(e, i);
        }
        int64_t now = aoe_now_us();
        for (int i = 0; i < n; i++) {
            const uint8_t *h = e->rx_buf + i * e->rx_slot_size;
            const uint8_t *data = e->rx_aim[i] != NONE ? e->frames[e->rx_aim[i]].data
                                                         : h + ATA_HDR_LEN;
            handle_answer(e, h, e->rx_msg[i].msg_len, data, now);
        }
        if (n < RX_BATCH)
            break;
    }
    return got;
}

/* ---- expiry --------------------------------------------------------------- */

/* Whether a frame in flight on path pa is lost at `now`: unanswered for
 * rto_us, or for reorder_us once a frame sent after it was answered. */
static int frame_lost(const struct aoe_path *pa, const struct aoe_frame *f, int64_t now)
{
    int64_t age = now - f->last.sent_us;
    return age > pa->rto_us || (age > pa->reorder_us && f->last.sent_us < pa->newest_answered_us);
}

/* Report lost in-flight frames, once per transmission.  Each path's list is
 * oldest first, and a frame that is not lost has no lost frame after it. */
static void collect_expired(struct aoe_eng *e, int64_t now)
{
    for (int p = 0; p < e->npaths; p++) {
        const struct aoe_path *pa = &e->paths[p];
        for (uint32_t s = e->fly_head[p]; s != NONE; s = e->frames[s].next) {
            struct aoe_frame *f = &e->frames[s];
            if (f->reported)
                continue;
            if (!frame_lost(pa, f, now))
                break;
            f->reported = 1;
            e->expired[e->nexpired++] = s;
        }
    }
}

/* When the next unreported frame is lost if nothing comes (INT64_MAX if none). */
static int64_t next_expiry(const struct aoe_eng *e)
{
    int64_t t = INT64_MAX;
    for (int p = 0; p < e->npaths; p++) {
        const struct aoe_path *pa = &e->paths[p];
        for (uint32_t s = e->fly_head[p]; s != NONE; s = e->frames[s].next) {
            const struct aoe_frame *f = &e->frames[s];
            if (!f->reported) {
                int overtaken = f->last.sent_us < pa->newest_answered_us;
                int64_t due = f->last.sent_us + (overtaken ? pa->reorder_us : pa->rto_us) + 1;
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
 * Receive what arrived since the last call, send, then wait and receive until
 * something needs aoe.py: a request completed, a frame expired, extra_fd
 * became readable, or timeout_us passed (at once if nothing is in flight and
 * extra_fd < 0).  Expiry is judged only after the sockets have been read, so
 * a pause of the caller never turns answers waiting there into losses.
 * With a bridged ublk queue (whose ring fd is then extra_fd), new requests are
 * taken and successful ones committed here; only failures, requests aoe.py
 * must answer itself (handed) and the end of the queue come back.  A bridged
 * nbd socket (then extra_fd) the same: requests read, successful ones answered.
 * Window slots freed by answers are refilled inside the loop, so the target's
 * queue stays full without a round trip through Python per answer.  With
 * e->spin_us set (answers due within microseconds) and no extra_fd, the
 * sockets are polled that long before the pump sleeps; with e->lone_spin_us
 * set and a bridge (ublk or nbd) holding at most one request, the sockets and
 * extra_fd are.
 */
int aoe_pump(struct aoe_eng *e, int timeout_us, int extra_fd)
{
    if (!e)
        return -EINVAL;
    e->done = e->done_buf;
    e->ndone = e->nexpired = e->nhanded = e->nfailed = e->failed_unlisted = 0;
    if (e->bridge)
        e->bridge->take(e);
    for (int p = 0; p < e->npaths; p++) {
        struct aoe_path *pa = &e->paths[p];
        pa->rtt_n = pa->rtt_max_us = pa->spurious = pa->needed = pa->late = 0;
        pa->rtt_sum_us = 0;
    }
    for (int fi = 0; fi < e->nfds; fi++)
        drain_socket(e, fi, RX_CATCH_UP);

    int rc = send_pending(e);
    if (rc < 0)
        return rc;

    struct pollfd pfd[MAX_PATHS + 1];
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
        if (e->bridge) {                    /* bridged requests that succeed never come back */
            e->bridge->settle(e);
            if (extra_ready) {
                extra_ready = 0;
                e->bridge->take(e);
            }
            if (e->pending_frames)
                send_pending(e);            /* the requests taken, nbd's FUA flushes */
            if (e->nhanded || e->bridge_finished)
                break;
            if (extra_fd >= 0)
                pfd[e->nfds].events = e->bridge->poll_events(e);
        }
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
        /* Answers are due within microseconds: a sleep and a wake-up cost more than that,
         * and the target's queue runs dry meanwhile.  A lone bridged request (qd1) waits
         * for its answer, then the next request follows: polling for a while after the
         * last event saves two wake-ups per request, and an idle device still sleeps.
         * Each poll's return also runs the ring's task work, which posts ublk's requests. */
        int64_t spin_end = extra_fd < 0 ? (e->inflight_frames > 0 ? now + e->spin_us : 0)
                         : e->bridge && e->active_requests <= 1
                               ? e->last_event_us + e->lone_spin_us : 0;
        if (spin_end > until)
            spin_end = until;
        int n = 0;
        if (spin_end > now) {
            static const struct timespec now_only;
            while ((n = ppoll(pfd, (nfds_t)npfd, &now_only, NULL)) == 0 && aoe_now_us() < spin_end)
                ;
            now = aoe_now_us();
            wait = n == 0 && until > now ? until - now : 0;
        }
        if (n == 0) {
            struct timespec ts = { wait / 1000000, (wait % 1000000) * 1000 };
            n = ppoll(pfd, (nfds_t)npfd, &ts, NULL);
        }
        polled = 1;
        if (n < 0) {
            if (errno == EINTR)
                break;                      /* let Python see its signal */
            return -errno;
        }
        if (n > 0)
            e->last_event_us = aoe_now_us();
        if (n == 0) {                       /* a frame is due: what arrived just now counts */
            for (int fi = 0; fi < e->nfds; fi++)
                drain_socket(e, fi, 1);
            continue;
        }
        if (extra_fd >= 0 && pfd[e->nfds].revents)
            extra_ready = 1;
        for (int fi = 0; fi < e->nfds; fi++)
            if (pfd[fi].revents)
                drain_socket(e, fi, RX_ROUNDS);
        send_pending(e);                    /* a hard error shows at the next pump's first send */
    }
    collect_expired(e, aoe_now_us());
    if (e->bridge)
        e->bridge->settle(e);
    return e->ndone;
}

/* ========================================================================== */
/* Target fast path: ATA READ/WRITE answered in batches (aoe.py serve)         */
/* ========================================================================== */
/*
 * aoe.py's AoeTarget.handle decides every frame's answer.  This section only
 * answers the frames whose answer follows from the state aoe.py mirrors into
 * struct aoe_srv (export window, read-only, scnt, mask and reservation lists,
 * unreadable sectors): ATA READ/WRITE SECTORS (EXT) sent to our exact
 * shelf.slot by an initiator the mask and reservation lists admit, asking for
 * at most scnt sectors and, for writes, carrying them all; but no READ that
 * touches a sector serve --fault-bad made unreadable.  It drops and counts,
 * as handle() does, frames that are short, not AoE version 1, responses, for
 * other targets or from masked initiators.  Every other frame goes back to aoe.py: aoe_srv_pump
 * returns as soon as a batch held one, and aoe.py answers it with handle().
 *
 * Each answer is built in place in its receive slot (the request is at most a
 * header plus write data; the answer a header plus read data), a run of
 * requests for back-to-back sectors is read or written with one preadv or
 * pwritev, and a batch's answers leave with one sendmmsg.  Slots begin
 * ATA_HDR_LEN bytes before an SRV_ALIGN boundary, so data is aligned for a
 * file opened O_DIRECT.
 * One struct aoe_srv per socket and thread.  Only the mask and reservation
 * lists and the unreadable sectors change while it runs, through
 * aoe_srv_set_lists and aoe_srv_set_bad, under its lock.
 */

#include <pthread.h>

#define SRV_BATCH       64
#define SRV_ALIGN       4096        /* read and write data start on this boundary */
#define SRV_MAX_MACS    255
#define SRV_SEND_TRIES  8           /* sendmmsg attempts per answer before it counts as lost */
enum { SRV_DROP, SRV_SLOW, SRV_FAST };

/* ABI-BEGIN: the target's fast path */
#define AOE_HDR_LEN     24          /* Ethernet 14 + AoE common 10 */
#define AOE_SHELF_ANY   0xFFFF
#define AOE_SLOT_ANY    0xFF
#define ATA_DRDY        0x40        /* ATA status bit */
#define ATA_UNC         0x40        /* ATA error bits */
#define ATA_IDNF        0x10
#define ATA_ABORTED     0x04
#define LBA28_MAX       0x0FFFFFFFull
struct aoe_srv_counters {
    uint64_t frames_recv;           /* every frame read from the socket */
    uint64_t batches;               /* recvmmsg calls that returned frames */
    uint64_t frames_fast;           /* answered here */
    uint64_t frames_slow;           /* handed to aoe.py */
    uint64_t frames_sent;
    uint64_t sectors_read, sectors_written;
    uint64_t io_errors;             /* answered UNC: the read or write failed or was short */
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
    pthread_mutex_t lock;           /* guards the lists and the unreadable sectors */
    int nmasks, nreserved;
    uint8_t masks[SRV_MAX_MACS][6], reserved[SRV_MAX_MACS][6];
    int nbad;                       /* unreadable sectors: [bad_start[i], bad_end[i]), sorted */
    uint64_t *bad_start, *bad_end;  /* one allocation, bad_start's */
    size_t frame_max;               /* bytes a slot holds from the frame's start */
    size_t slot_size;
    uint8_t *buf;
    struct aoe_srv_frame slow_buf[SRV_BATCH];
    struct mmsghdr rx_msg[SRV_BATCH];
    struct iovec rx_iov[SRV_BATCH];
    struct mmsghdr tx_msg[SRV_BATCH];
    struct iovec tx_iov[SRV_BATCH];
};

struct aoe_srv *aoe_srv_new(int frame_max);
void aoe_srv_free(struct aoe_srv *s);
int aoe_srv_set_lists(struct aoe_srv *s, const uint8_t *masks, int nmasks,
                      const uint8_t *reserved, int nreserved);
int aoe_srv_set_bad(struct aoe_srv *s, const uint64_t *starts, const uint64_t *ends, int n);
int aoe_srv_pump(struct aoe_srv *s, int timeout_us);

/* One ATA command, without AoE around it, as the fast path executes it. */
struct aoe_srv_ata {
    uint8_t cmd, count;             /* in: the registers, the LBA as the frame carried it */
    uint64_t lba;
    uint8_t status, err, left;      /* out: as the answer carries them (left: its count) */
};
int aoe_srv_ata(struct aoe_srv *s, struct aoe_srv_ata *a, uint8_t *data, size_t len);
/* ABI-END */

static uint8_t *srv_frame(struct aoe_srv *s, int i)
{
    return s->buf + (size_t)i * s->slot_size + (SRV_ALIGN - ATA_HDR_LEN);
}

void aoe_srv_free(struct aoe_srv *s)
{
    if (!s)
        return;
    pthread_mutex_destroy(&s->lock);
    free(s->bad_start);
    free(s->buf);
    free(s);
}

/* frame_max: the longest frame to receive or send (the interface's MTU plus
 * the Ethernet header); the largest read answer, 36 + 512 * scnt, must fit. */
struct aoe_srv *aoe_srv_new(int frame_max)
{
    if (frame_max < ETH_ZLEN || frame_max > 1 << 17) {
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
    s->slot_size = (SRV_ALIGN - ATA_HDR_LEN + (size_t)frame_max + SRV_ALIGN - 1) &
                   ~(size_t)(SRV_ALIGN - 1);
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
int aoe_srv_set_lists(struct aoe_srv *s, const uint8_t *masks, int nmasks,
                      const uint8_t *reserved, int nreserved)
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

/* Replace the unreadable sectors (serve --fault-bad) with n ranges
 * [starts[i], ends[i]), sorted, disjoint, none empty; n = 0 clears them.  A
 * READ touching one goes to aoe.py, which fails it.  Swapped in under the lock
 * that srv_classify holds anyway, so a pump may run meanwhile at no cost. */
int aoe_srv_set_bad(struct aoe_srv *s, const uint64_t *starts, const uint64_t *ends, int n)
{
    if (!s || n < 0 || (n && (!starts || !ends)))
        return -EINVAL;
    for (int i = 0; i < n; i++)
        if (starts[i] >= ends[i] || (i && starts[i] < ends[i - 1]))
            return -EINVAL;
    uint64_t *ranges = NULL;
    if (n) {
        ranges = malloc((size_t)n * 2 * sizeof(*ranges));
        if (!ranges)
            return -ENOMEM;
        memcpy(ranges, starts, (size_t)n * sizeof(*ranges));
        memcpy(ranges + n, ends, (size_t)n * sizeof(*ranges));
    }
    pthread_mutex_lock(&s->lock);
    uint64_t *old = s->bad_start;
    s->bad_start = ranges;
    s->bad_end = ranges ? ranges + n : NULL;
    s->nbad = n;
    pthread_mutex_unlock(&s->lock);
    free(old);
    return 0;
}

/* Whether sectors lba..lba+count-1 include an unreadable one: the first range
 * ending after lba (binary search; the ends are sorted too) starts before
 * lba + count.  Called with s->lock held. */
static int srv_touches_bad(const struct aoe_srv *s, uint64_t lba, unsigned count)
{
    int lo = 0, hi = s->nbad;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (s->bad_end[mid] <= lba)
            lo = mid + 1;
        else
            hi = mid;
    }
    return count && lo < s->nbad && s->bad_start[lo] < lba + count;
}

/* A request's LBA as the frame carries it (parse_ata): 48 bits when its aflags
 * say LBA48, else 28. */
static inline uint64_t srv_frame_lba(const uint8_t *h)
{
    uint64_t lba;
    if (h[24] & AOEAFL_EXT) {
        lba = 0;
        for (int i = 5; i >= 0; i--)
            lba = lba << 8 | h[28 + i];
    } else {
        lba = (uint64_t)h[28] | (uint64_t)h[29] << 8 | (uint64_t)h[30] << 16 |
              (uint64_t)(h[31] & 0x0F) << 24;
    }
    return lba;
}

/*
 * The ATA meaning of a READ/WRITE, apart from AoE, as aoe.py's AtaDisk has it
 * (vblade's ata.c): srv_ata_takes, whether the fast path executes the command
 * at all; srv_ata_check, the answer known before any I/O; srv_ata_left, the
 * count an answer carries.
 */
static inline int srv_ata_write(uint8_t cmd)
{
    return cmd == ATA_CMD_PIO_WRITE || cmd == ATA_CMD_PIO_WRITE_EXT;
}

/* The sector an LBA names for cmd: an LBA28 command uses its low 28 bits. */
static inline uint64_t srv_ata_lba(uint8_t cmd, uint64_t lba)
{
    return cmd == ATA_CMD_PIO_READ_EXT || cmd == ATA_CMD_PIO_WRITE_EXT ? lba : lba & LBA28_MAX;
}

/* Whether the fast path executes cmd itself: a READ/WRITE that AtaDisk would
 * not refuse (at most scnt sectors; a write with all its data) and no READ
 * touching an unreadable sector (AtaDisk fails it, or answers IDNF).  Called
 * with s->lock held. */
static inline int srv_ata_takes(const struct aoe_srv *s, uint8_t cmd, uint64_t lba,
                                unsigned count, size_t data_len)
{
    int write = srv_ata_write(cmd);
    if (!write && cmd != ATA_CMD_PIO_READ && cmd != ATA_CMD_PIO_READ_EXT)
        return 0;
    if (count > (unsigned)s->scnt || (write && data_len < (size_t)count * SECTOR_SIZE))
        return 0;
    return write || !s->nbad || !srv_touches_bad(s, srv_ata_lba(cmd, lba), count);
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
    if ((h[14] & 0xF0) != AOE_HVER) {
        c->drop_version++;
        return SRV_DROP;
    }
    if (h[14] & AOEFL_RSP) {
        c->drop_response++;
        return SRV_DROP;
    }
    unsigned shelf = (unsigned)h[16] << 8 | h[17], slot = h[18];
    if ((shelf != s->shelf && shelf != AOE_SHELF_ANY) ||
        (slot != s->slot && slot != AOE_SLOT_ANY)) {
        c->drop_other_target++;
        return SRV_DROP;
    }
    if (s->nmasks && !mac_listed((const uint8_t (*)[6])s->masks, s->nmasks, h + 6)) {
        c->drop_masked++;
        return SRV_DROP;
    }
    if (h[19] != AOECMD_ATA || shelf != s->shelf || slot != s->slot || len < ATA_HDR_LEN)
        return SRV_SLOW;
    if (s->nreserved && !mac_listed((const uint8_t (*)[6])s->reserved, s->nreserved, h + 6))
        return SRV_SLOW;                    /* aoe.py answers "reserved" (or IDENTIFY) */
    return srv_ata_takes(s, h[27], srv_frame_lba(h), h[26], len - ATA_HDR_LEN) ? SRV_FAST
                                                                               : SRV_SLOW;
}

/* One READ/WRITE of a batch: its request (answered in place), its data and how
 * it went. */
struct srv_io {
    uint8_t *h, *data;
    uint64_t lba;
    uint8_t count, write, status, err;
};

/* A READ/WRITE's answer as far as it is known before any I/O, as AtaDisk's:
 * IDNF past the export's end, ABRT for a write to a read-only export. */
static inline void srv_ata_check(const struct aoe_srv *s, uint8_t cmd, uint64_t lba,
                                 struct srv_io *io)
{
    io->lba = srv_ata_lba(cmd, lba);
    io->write = (uint8_t)srv_ata_write(cmd);
    io->status = ATA_DRDY;
    io->err = 0;
    if (io->lba + io->count > s->sectors) {
        io->status |= ATA_ERR;
        io->err = ATA_IDNF;
    } else if (io->write && s->readonly) {
        io->status |= ATA_ERR;
        io->err = ATA_ABORTED;
    }
}

/* The count an answer carries: what is left to transfer (as vblade says), all
 * of it after an error, as the fast path never transfers part of a request. */
static inline uint8_t srv_ata_left(const struct srv_io *io)
{
    return io->status & ATA_ERR ? io->count : 0;
}

/* Decode a request and check it; no I/O yet.  The LBA of an LBA28 request is
 * re-encoded as its answer echoes it. */
static void srv_decode(const struct aoe_srv *s, uint8_t *h, struct srv_io *io)
{
    uint64_t lba = srv_frame_lba(h);
    if (!(h[24] & AOEAFL_EXT)) {
        h[31] = 0xE0 | (h[31] & 0x0F);
        h[32] = h[33] = 0;
    }
    io->h = h;
    io->data = h + ATA_HDR_LEN;
    io->count = h[26];
    srv_ata_check(s, h[27], lba, io);
}

static int srv_moves_data(const struct srv_io *io)
{
    return !(io->status & ATA_ERR) && io->count;
}

/* Move the data of io[0..n), back to back on the export and all reads or all
 * writes, with one preadv or pwritev.  If that falls short, frame by frame, so
 * that exactly the frames that fail are answered UNC: never a partial success. */
static void srv_transfer(struct aoe_srv *s, struct srv_io *io, int n)
{
    struct iovec iov[SRV_BATCH];
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        iov[i].iov_base = io[i].data;
        iov[i].iov_len = (size_t)io[i].count * SECTOR_SIZE;
        total += iov[i].iov_len;
    }
    off_t off = (off_t)(s->base + io[0].lba * SECTOR_SIZE);
    ssize_t got = io[0].write ? pwritev(s->file_fd, iov, n, off) : preadv(s->file_fd, iov, n, off);
    if (got >= 0 && (size_t)got == total)
        return;
    if (n > 1) {
        for (int i = 0; i < n; i++)
            srv_transfer(s, io + i, 1);
        return;
    }
    io->status |= ATA_ERR;
    io->err = ATA_UNC;
    s->c.io_errors++;
}

/* Turn a decoded, transferred request into its answer; returns the answer's
 * length.  aflags and LBA echoed, count 0 (all of it after an error: what is
 * left to transfer, as vblade says), status DRDY or ERR|DRDY. */
static size_t srv_finish(struct aoe_srv *s, const struct srv_io *io)
{
    uint8_t *h = io->h;
    size_t data = 0;
    if (srv_moves_data(io)) {
        if (io->write) {
            s->c.sectors_written += io->count;
        } else {
            s->c.sectors_read += io->count;
            data = (size_t)io->count * SECTOR_SIZE;
        }
    }
    memcpy(h, h + 6, 6);                    /* back to the requester, from us */
    memcpy(h + 6, s->mac, 6);
    h[14] = AOE_HVER | AOEFL_RSP;
    h[15] = 0;
    h[25] = io->err;
    h[26] = srv_ata_left(io);
    h[27] = io->status;
    h[34] = h[35] = 0;
    size_t len = ATA_HDR_LEN + data;
    if (len < ETH_ZLEN) {
        memset(h + len, 0, ETH_ZLEN - len);
        len = ETH_ZLEN;
    }
    return len;
}

/* Execute one ATA command as srv_batch would, for the test that holds the fast
 * path's ATA meaning equal to AtaDisk's: data holds a write's len bytes, or
 * room for a read's sectors.  Returns 1 when the fast path hands the command
 * to aoe.py, else 0 with a's status, err and left set; -EINVAL for no room. */
int aoe_srv_ata(struct aoe_srv *s, struct aoe_srv_ata *a, uint8_t *data, size_t len)
{
    if (!s || !a || (!data && len))
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    int takes = srv_ata_takes(s, a->cmd, a->lba, a->count, len);
    pthread_mutex_unlock(&s->lock);
    if (!takes)
        return 1;
    if (len < (size_t)a->count * SECTOR_SIZE)
        return -EINVAL;
    struct srv_io io = { .data = data, .count = a->count };
    srv_ata_check(s, a->cmd, a->lba, &io);
    if (srv_moves_data(&io))
        srv_transfer(s, &io, 1);
    a->status = io.status;
    a->err = io.err;
    a->left = srv_ata_left(&io);
    return 0;
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
 * may change the lists the later ones are judged by (a mask or reservation);
 * but not one cut short by its slot, which aoe.py would take for whole. */
static void srv_batch(struct aoe_srv *s, int n)
{
    uint8_t kind[SRV_BATCH];
    int slow = 0;
    pthread_mutex_lock(&s->lock);
    for (int i = 0; i < n; i++) {
        int truncated = (s->rx_msg[i].msg_hdr.msg_flags & MSG_TRUNC) != 0;
        kind[i] = slow && !truncated
                      ? SRV_SLOW
                      : (uint8_t)srv_classify(s, srv_frame(s, i), s->rx_msg[i].msg_len, truncated);
        slow |= kind[i] == SRV_SLOW;
    }
    pthread_mutex_unlock(&s->lock);

    struct srv_io io[SRV_BATCH];
    int nio = 0;
    for (int i = 0; i < n; i++) {
        uint8_t *h = srv_frame(s, i);
        if (kind[i] == SRV_SLOW) {
            s->slow[s->nslow].data = h;
            s->slow[s->nslow].len = s->rx_msg[i].msg_len;
            s->nslow++;
            s->c.frames_slow++;
        } else if (kind[i] == SRV_FAST) {
            srv_decode(s, h, &io[nio++]);
            s->c.frames_fast++;
        }
    }
    /* Runs of back-to-back reads (or writes) share one system call, in the
     * batch's order, so a read after a write to the same sector sees it. */
    for (int a = 0; a < nio;) {
        if (!srv_moves_data(&io[a])) {
            a++;
            continue;
        }
        int b = a + 1;
        while (b < nio && srv_moves_data(&io[b]) && io[b].write == io[a].write &&
               io[b].lba == io[b - 1].lba + io[b - 1].count)
            b++;
        srv_transfer(s, io + a, b - a);
        a = b;
    }
    for (int i = 0; i < nio; i++) {
        struct msghdr *m = &s->tx_msg[i].msg_hdr;
        memset(m, 0, sizeof(*m));
        s->tx_iov[i].iov_base = io[i].h;
        s->tx_iov[i].iov_len = srv_finish(s, &io[i]);
        m->msg_iov = &s->tx_iov[i];
        m->msg_iovlen = 1;
    }
    if (nio)
        srv_send(s, nio);
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

/* ========================================================================== */
/* ublk plumbing: control and queue commands over raw io_uring                 */
/* ========================================================================== */
/*
 * Thin wrappers over /dev/ublk-control and /dev/ublkcN, driven through a raw
 * io_uring (IORING_OP_URING_CMD with ioctl-encoded opcodes; no liburing).
 * Every policy decision lives in aoe.py: this section only moves commands,
 * descriptors and results.
 *
 * The kernel runs control commands in an io-wq worker, so one can be
 * submitted without waiting (ublk_ctrl_submit) while the same thread keeps
 * serving the queue.  START_DEV needs that: it waits until every tag is
 * fetched, then add_disk() reads the partition table through the queue.
 *
 * Only the structs of <linux/ublk_cmd.h> are taken from the installed header;
 * opcodes older headers lack are spelled out below with their 6.12 values.
 */

#ifndef UBLK_U_CMD_ADD_DEV
#define UBLK_U_CMD_GET_DEV_INFO        _IOR('u', 0x02, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_ADD_DEV             _IOWR('u', 0x04, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_DEL_DEV             _IOWR('u', 0x05, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_DEV           _IOWR('u', 0x06, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_STOP_DEV            _IOWR('u', 0x07, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_SET_PARAMS          _IOWR('u', 0x08, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_PARAMS          _IOR('u', 0x09, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_USER_RECOVERY _IOWR('u', 0x10, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_END_USER_RECOVERY   _IOWR('u', 0x11, struct ublksrv_ctrl_cmd)
#define UBLK_U_IO_FETCH_REQ            _IOWR('u', 0x20, struct ublksrv_io_cmd)
#define UBLK_U_IO_COMMIT_AND_FETCH_REQ _IOWR('u', 0x21, struct ublksrv_io_cmd)
#endif
#ifndef UBLK_U_CMD_GET_FEATURES
#define UBLK_CMD_GET_FEATURES          0x13
#define UBLK_U_CMD_GET_FEATURES        _IOR('u', 0x13, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_F_CMD_IOCTL_ENCODE
#define UBLK_F_CMD_IOCTL_ENCODE        (1ULL << 6)
#endif
#ifndef UBLK_CMD_UPDATE_SIZE                            /* Linux 6.16 */
#define UBLK_CMD_UPDATE_SIZE           0x15
#endif
#ifndef UBLK_U_CMD_UPDATE_SIZE
#define UBLK_U_CMD_UPDATE_SIZE         _IOWR('u', 0x15, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_CMD_QUIESCE_DEV                            /* Linux 6.16 */
#define UBLK_CMD_QUIESCE_DEV           0x16
#endif
#ifndef UBLK_U_CMD_QUIESCE_DEV
#define UBLK_U_CMD_QUIESCE_DEV         _IOWR('u', 0x16, struct ublksrv_ctrl_cmd)
#endif
/* Pin the spelled-out encodings to the kernel's values. */
_Static_assert(sizeof(struct ublksrv_ctrl_cmd) == 32 && sizeof(struct ublksrv_io_cmd) == 16 &&
               sizeof(struct ublksrv_io_desc) == 24 && sizeof(struct ublksrv_ctrl_dev_info) == 64,
               "ublk uapi struct sizes");
_Static_assert(UBLK_U_CMD_ADD_DEV == 0xc0207504u && UBLK_U_CMD_GET_FEATURES == 0x80207513u &&
               UBLK_U_CMD_GET_DEV_INFO == 0x80207502u &&
               UBLK_U_CMD_END_USER_RECOVERY == 0xc0207511u &&
               UBLK_U_IO_FETCH_REQ == 0xc0107520u &&
               UBLK_U_IO_COMMIT_AND_FETCH_REQ == 0xc0107521u &&
               UBLK_U_CMD_UPDATE_SIZE == 0xc0207515u && UBLK_U_CMD_QUIESCE_DEV == 0xc0207516u,
               "ublk ioctl-encoded opcodes");

struct ublk_ring {
    int fd;
    unsigned sqe_size, sq_entries;
    unsigned setup_flags;           /* IORING_SETUP_* the ring was made with */
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    char *sqes;
    void *sq_map, *cq_map;
    size_t sq_map_len, cq_map_len, sqes_len;
    unsigned tail;                  /* SQEs prepared; published to the kernel on enter */
};

static void ublk_ring_exit(struct ublk_ring *r)
{
    if (r->sqes)
        munmap(r->sqes, r->sqes_len);
    if (r->cq_map && r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_map_len);
    if (r->sq_map)
        munmap(r->sq_map, r->sq_map_len);
    if (r->fd >= 0)
        close(r->fd);
    memset(r, 0, sizeof(*r));
    r->fd = -1;
}

static void *ublk_ring_map(struct ublk_ring *r, size_t len, off_t what)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, what);
    return p == MAP_FAILED ? NULL : p;
}

static int ublk_ring_init(struct ublk_ring *r, unsigned entries, unsigned cq_entries,
                          unsigned flags)
{
    struct io_uring_params p;
    memset(r, 0, sizeof(*r));
    memset(&p, 0, sizeof(p));
    p.flags = flags | IORING_SETUP_CQSIZE;
    p.cq_entries = cq_entries;
    r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (r->fd < 0) {
        r->fd = -1;
        return -errno;
    }
    r->setup_flags = flags;
    r->sqe_size = (flags & IORING_SETUP_SQE128) ? 128 : 64;
    r->sq_entries = p.sq_entries;
    r->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_map_len > r->sq_map_len)
            r->sq_map_len = r->cq_map_len;
        r->cq_map_len = r->sq_map_len;
    }
    r->sq_map = ublk_ring_map(r, r->sq_map_len, IORING_OFF_SQ_RING);
    if (!r->sq_map)
        goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP)
        r->cq_map = r->sq_map;
    else if (!(r->cq_map = ublk_ring_map(r, r->cq_map_len, IORING_OFF_CQ_RING)))
        goto fail;
    r->sqes_len = (size_t)p.sq_entries * r->sqe_size;
    if (!(r->sqes = ublk_ring_map(r, r->sqes_len, IORING_OFF_SQES)))
        goto fail;
    r->sq_head = (unsigned *)((char *)r->sq_map + p.sq_off.head);
    r->sq_tail = (unsigned *)((char *)r->sq_map + p.sq_off.tail);
    r->sq_mask = (unsigned *)((char *)r->sq_map + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)((char *)r->sq_map + p.sq_off.array);
    r->cq_head = (unsigned *)((char *)r->cq_map + p.cq_off.head);
    r->cq_tail = (unsigned *)((char *)r->cq_map + p.cq_off.tail);
    r->cq_mask = (unsigned *)((char *)r->cq_map + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)((char *)r->cq_map + p.cq_off.cqes);
    r->tail = *r->sq_tail;
    return 0;
fail:;
    int err = -errno;
    ublk_ring_exit(r);
    return err;
}

/* A zeroed URING_CMD SQE for fd, or NULL when the SQ is full (enter first). */
static struct io_uring_sqe *ublk_ring_sqe(struct ublk_ring *r, int fd, unsigned cmd_op,
                                          uint64_t user_data)
{
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (r->tail - head >= r->sq_entries)
        return NULL;
    unsigned idx = r->tail & *r->sq_mask;
    struct io_uring_sqe *sqe = (struct io_uring_sqe *)(r->sqes + (size_t)idx * r->sqe_size);
    memset(sqe, 0, r->sqe_size);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fd;
    sqe->cmd_op = cmd_op;
    sqe->user_data = user_data;
    r->sq_array[idx] = idx;
    r->tail++;
    return sqe;
}

/* Publish and submit the prepared SQEs and, if wait_nr, wait for that many
 * CQEs (timeout_us < 0: no limit).  Returns 0, -ETIME, -EINTR or -errno.
 * SQEs the kernel did not take stay published and go with the next call. */
static int ublk_ring_enter(struct ublk_ring *r, unsigned wait_nr, long long timeout_us)
{
    struct __kernel_timespec ts;
    struct io_uring_getevents_arg arg;
    void *argp = NULL;
    size_t argsz = 0;
    unsigned flags = wait_nr ? IORING_ENTER_GETEVENTS : 0;
    __atomic_store_n(r->sq_tail, r->tail, __ATOMIC_RELEASE);
    unsigned pending = r->tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (!pending && !wait_nr)
        return 0;
    if (wait_nr && timeout_us >= 0) {
        ts.tv_sec = timeout_us / 1000000;
        ts.tv_nsec = (timeout_us % 1000000) * 1000;
        memset(&arg, 0, sizeof(arg));
        arg.ts = (uint64_t)(uintptr_t)&ts;
        flags |= IORING_ENTER_EXT_ARG;
        argp = &arg;
        argsz = sizeof(arg);
    }
    if (syscall(__NR_io_uring_enter, r->fd, pending, wait_nr, flags, argp, argsz) < 0)
        return -errno;
    return 0;
}

/* Take back prepared SQEs the kernel has not consumed. */
static void ublk_ring_unprep(struct ublk_ring *r)
{
    r->tail = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    __atomic_store_n(r->sq_tail, r->tail, __ATOMIC_RELEASE);
}

static int ublk_ring_peek(struct ublk_ring *r, struct io_uring_cqe *out)
{
    unsigned head = *r->cq_head;
    if (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE))
        return 0;
    *out = r->cqes[head & *r->cq_mask];
    __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
    return 1;
}

/* --- control device: one command in flight at a time ---------------------- */

struct ublk_ctrl {
    struct ublk_ring ring;
    int fd;                         /* /dev/ublk-control */
    int busy;                       /* a command is in flight */
};

int ublk_ctrl_open(struct ublk_ctrl **out)
{
    struct ublk_ctrl *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->fd = open("/dev/ublk-control", O_RDWR | O_CLOEXEC);
    int ret = c->fd < 0 ? -errno : ublk_ring_init(&c->ring, 4, 8, IORING_SETUP_SQE128);
    if (ret < 0) {
        if (c->fd >= 0)
            close(c->fd);
        free(c);
        return ret;
    }
    *out = c;
    return 0;
}

void ublk_ctrl_close(struct ublk_ctrl *c)
{
    if (!c)
        return;
    ublk_ring_exit(&c->ring);
    close(c->fd);
    free(c);
}

/* Readable (POLLIN) once the submitted command has completed. */
int ublk_ctrl_ring_fd(struct ublk_ctrl *c)
{
    return c->ring.fd;
}

static unsigned ublk_ctrl_encode(unsigned nr)
{
    switch (nr) {
    case UBLK_CMD_GET_DEV_INFO:        return UBLK_U_CMD_GET_DEV_INFO;
    case UBLK_CMD_ADD_DEV:             return UBLK_U_CMD_ADD_DEV;
    case UBLK_CMD_DEL_DEV:             return UBLK_U_CMD_DEL_DEV;
    case UBLK_CMD_START_DEV:           return UBLK_U_CMD_START_DEV;
    case UBLK_CMD_STOP_DEV:            return UBLK_U_CMD_STOP_DEV;
    case UBLK_CMD_SET_PARAMS:          return UBLK_U_CMD_SET_PARAMS;
    case UBLK_CMD_GET_PARAMS:          return UBLK_U_CMD_GET_PARAMS;
    case UBLK_CMD_START_USER_RECOVERY: return UBLK_U_CMD_START_USER_RECOVERY;
    case UBLK_CMD_END_USER_RECOVERY:   return UBLK_U_CMD_END_USER_RECOVERY;
    case UBLK_CMD_GET_FEATURES:        return UBLK_U_CMD_GET_FEATURES;
    case UBLK_CMD_UPDATE_SIZE:         return UBLK_U_CMD_UPDATE_SIZE;
    case UBLK_CMD_QUIESCE_DEV:         return UBLK_U_CMD_QUIESCE_DEV;
    default:                           return 0;
    }
}

/* Prepare, and submit without waiting, control command nr (the legacy number,
 * sent ioctl-encoded) with an optional buffer. */
static int ublk_ctrl_send(struct ublk_ctrl *c, unsigned nr, int dev_id, uint64_t data0,
                          void *buf, unsigned len)
{
    unsigned op = ublk_ctrl_encode(nr);
    if (!op)
        return -EINVAL;
    if (c->busy)
        return -EBUSY;
    struct io_uring_sqe *sqe = ublk_ring_sqe(&c->ring, c->fd, op, nr);
    if (!sqe)
        return -EBUSY;
    struct ublksrv_ctrl_cmd *cmd = (struct ublksrv_ctrl_cmd *)sqe->cmd;
    cmd->dev_id = (uint32_t)dev_id;
    cmd->queue_id = (uint16_t)-1;
    cmd->addr = (uint64_t)(uintptr_t)buf;
    cmd->len = (uint16_t)len;
    cmd->data[0] = data0;
    int ret = ublk_ring_enter(&c->ring, 0, 0);
    if (ret < 0 && c->ring.tail != __atomic_load_n(c->ring.sq_head, __ATOMIC_ACQUIRE)) {
        ublk_ring_unprep(&c->ring);     /* not taken: as if never sent */
        return ret;
    }
    c->busy = 1;                        /* taken: its result comes as a CQE */
    return 0;
}

/* Submit a control command without waiting for it; collect it with
 * ublk_ctrl_wait.  nr: DEL_DEV 0x05, START_DEV 0x06 (data0 = pid), STOP_DEV
 * 0x07, START_USER_RECOVERY 0x10, END_USER_RECOVERY 0x11 (data0 = pid). */
int ublk_ctrl_submit(struct ublk_ctrl *c, unsigned nr, int dev_id, uint64_t data0)
{
    return ublk_ctrl_send(c, nr, dev_id, data0, NULL, 0);
}

/* Wait up to timeout_us (< 0: no limit, 0: just look) for the submitted
 * command.  Returns 1 with its result (0 or -errno) in *result, 0 while it
 * runs, or -errno (-EINTR on a signal, -EINVAL if nothing was submitted). */
int ublk_ctrl_wait(struct ublk_ctrl *c, long long timeout_us, int *result)
{
    struct io_uring_cqe cqe;
    if (!c->busy)
        return -EINVAL;
    for (;;) {
        if (ublk_ring_peek(&c->ring, &cqe)) {
            c->busy = 0;
            *result = cqe.res;
            return 1;
        }
        if (timeout_us == 0)
            return 0;
        int ret = ublk_ring_enter(&c->ring, 1, timeout_us);
        if (ret == -ETIME)
            return 0;
        if (ret < 0)
            return ret;
        if (timeout_us > 0)
            timeout_us = 0;             /* woken: one more look, then report */
    }
}

static int ublk_ctrl_sync(struct ublk_ctrl *c, unsigned nr, int dev_id, uint64_t data0,
                          void *buf, unsigned len)
{
    int ret = ublk_ctrl_send(c, nr, dev_id, data0, buf, len), result;
    if (ret < 0)
        return ret;
    do
        ret = ublk_ctrl_wait(c, -1, &result);
    while (ret == -EINTR || ret == 0);  /* the kernel is writing into buf: never leave early */
    return ret < 0 ? ret : result;
}

/* ublk_ctrl_submit + ublk_ctrl_wait.  Not for START_DEV, nor END_USER_RECOVERY
 * or STOP_DEV with I/O pending, from the thread that serves the queue. */
int ublk_ctrl_cmd(struct ublk_ctrl *c, unsigned nr, int dev_id, uint64_t data0)
{
    return ublk_ctrl_sync(c, nr, dev_id, data0, NULL, 0);
}

int ublk_ctrl_get_features(struct ublk_ctrl *c, uint64_t *features)
{
    *features = 0;
    return ublk_ctrl_sync(c, UBLK_CMD_GET_FEATURES, -1, 0, features, sizeof(*features));
}

/* dev_id -1 lets the kernel choose.  Returns the new device's id. */
int ublk_ctrl_add_dev(struct ublk_ctrl *c, int dev_id, unsigned nr_queues, unsigned depth,
                      unsigned max_io_buf_bytes, uint64_t flags)
{
    struct ublksrv_ctrl_dev_info info;
    memset(&info, 0, sizeof(info));
    info.nr_hw_queues = (uint16_t)nr_queues;
    info.queue_depth = (uint16_t)depth;
    info.max_io_buf_bytes = max_io_buf_bytes;
    info.dev_id = (uint32_t)dev_id;
    info.flags = flags | UBLK_F_CMD_IOCTL_ENCODE;
    int ret = ublk_ctrl_sync(c, UBLK_CMD_ADD_DEV, dev_id, 0, &info, sizeof(info));
    return ret < 0 ? ret : (int)info.dev_id;
}

int ublk_ctrl_get_dev_info(struct ublk_ctrl *c, int dev_id, struct ublksrv_ctrl_dev_info *info)
{
    memset(info, 0, sizeof(*info));
    return ublk_ctrl_sync(c, UBLK_CMD_GET_DEV_INFO, dev_id, 0, info, sizeof(*info));
}

/* The subset of struct ublk_params aoe.py sets. */
struct ublk_dev_params {
    uint64_t dev_sectors;           /* 512-byte sectors */
    uint32_t attrs;                 /* UBLK_ATTR_READ_ONLY 1, ROTATIONAL 2, VOLATILE_CACHE 4,
                                     * FUA 8 */
    uint8_t logical_bs_shift, physical_bs_shift, io_min_shift, io_opt_shift;
    uint32_t max_sectors;           /* per request; at most max_io_buf_bytes / 512 */
    uint32_t max_discard_sectors;   /* 0: no DISCARD */
    uint32_t max_write_zeroes_sectors;  /* 0: no WRITE_ZEROES */
    uint32_t discard_granularity;   /* bytes */
};

int ublk_ctrl_set_params(struct ublk_ctrl *c, int dev_id, const struct ublk_dev_params *dp)
{
    struct ublk_params p;
    memset(&p, 0, sizeof(p));
    p.len = sizeof(p);
    p.types = UBLK_PARAM_TYPE_BASIC;
    p.basic.attrs = dp->attrs;
    p.basic.logical_bs_shift = dp->logical_bs_shift;
    p.basic.physical_bs_shift = dp->physical_bs_shift;
    p.basic.io_min_shift = dp->io_min_shift;
    p.basic.io_opt_shift = dp->io_opt_shift;
    p.basic.max_sectors = dp->max_sectors;
    p.basic.dev_sectors = dp->dev_sectors;
    if (dp->max_discard_sectors || dp->max_write_zeroes_sectors) {
        p.types |= UBLK_PARAM_TYPE_DISCARD;
        p.discard.discard_granularity = dp->discard_granularity;
        p.discard.max_discard_sectors = dp->max_discard_sectors;
        p.discard.max_write_zeroes_sectors = dp->max_write_zeroes_sectors;
        p.discard.max_discard_segments = 1;
    }
    return ublk_ctrl_sync(c, UBLK_CMD_SET_PARAMS, dev_id, 0, &p, sizeof(p));
}

/* --- one queue of one device: /dev/ublkcN, descriptors, a buffer per tag --- */
/*
 * All calls for a queue come from one thread: the kernel binds the queue to
 * the task that fetched it.  A tag is in the kernel (its FETCH or COMMIT
 * command pending), handed out to the caller by ublk_queue_reap, or dead
 * (never fetched, or aborted after a stop).
 */

enum { UBLK_TAG_KERNEL, UBLK_TAG_USER, UBLK_TAG_DEAD, UBLK_TAG_COMMITTING };

struct ublk_queue {
    struct ublk_ring ring;
    int cdev_fd, q_id, depth;
    unsigned buf_size;
    const struct ublksrv_io_desc *descs;
    size_t descs_len;
    char *bufs;                     /* depth * buf_size, page aligned; NULL with USER_COPY */
    size_t bufs_len;
    int in_kernel;                  /* tags whose command the kernel holds */
    int last_error;                 /* last failed command's result, ABORT aside */
    uint8_t *state;                 /* UBLK_TAG_* per tag */
};

/* ABI-BEGIN: ublk plumbing (the kernel's structs, from <linux/ublk_cmd.h>, are declared
 * to cffi in build_ffi.py) */
/* One request to serve, as ublk_queue_reap hands it out. */
struct ublk_req {
    uint16_t tag;
    uint8_t op;                     /* UBLK_IO_OP_READ 0, WRITE 1, FLUSH 2, DISCARD 3,
                                     * WRITE_ZEROES 5 */
    uint8_t reserved;
    uint32_t flags;                 /* UBLK_IO_F_* (FUA 1 << 13, NOUNMAP 1 << 15, ...) */
    uint32_t nr_sectors;
    uint32_t reserved2;
    uint64_t start_sector;
    uint64_t addr;                  /* the tag's buffer: read data goes here, write data is here */
};
struct ublk_ctrl;
struct ublk_queue;

int ublk_ctrl_open(struct ublk_ctrl **out);
void ublk_ctrl_close(struct ublk_ctrl *c);
int ublk_ctrl_ring_fd(struct ublk_ctrl *c);
int ublk_ctrl_get_features(struct ublk_ctrl *c, uint64_t *features);
int ublk_ctrl_add_dev(struct ublk_ctrl *c, int dev_id, unsigned nr_queues, unsigned depth,
                      unsigned max_io_buf_bytes, uint64_t flags);
int ublk_ctrl_set_params(struct ublk_ctrl *c, int dev_id, const struct ublk_dev_params *dp);
int ublk_ctrl_get_dev_info(struct ublk_ctrl *c, int dev_id, struct ublksrv_ctrl_dev_info *info);
int ublk_ctrl_submit(struct ublk_ctrl *c, unsigned nr, int dev_id, uint64_t data0);
int ublk_ctrl_wait(struct ublk_ctrl *c, long long timeout_us, int *result);
int ublk_ctrl_cmd(struct ublk_ctrl *c, unsigned nr, int dev_id, uint64_t data0);
int ublk_queue_open(struct ublk_queue **out, int dev_id, int q_id, int depth, unsigned buf_size);
void ublk_queue_close(struct ublk_queue *q);
int ublk_queue_ring_fd(struct ublk_queue *q);
unsigned ublk_queue_ring_flags(struct ublk_queue *q);
int ublk_queue_cdev_fd(struct ublk_queue *q);
void *ublk_queue_bufs(struct ublk_queue *q);
unsigned ublk_queue_buf_size(struct ublk_queue *q);
int ublk_queue_in_kernel(struct ublk_queue *q);
int ublk_queue_last_error(struct ublk_queue *q);
uint64_t ublk_queue_start_sector(struct ublk_queue *q, int tag);
int ublk_queue_fetch_all(struct ublk_queue *q);
int ublk_queue_reap(struct ublk_queue *q, int max, struct ublk_req *out, long long timeout_us);
int ublk_queue_commit(struct ublk_queue *q, int n, const uint16_t *tags, const int32_t *results);
/* ABI-END */

void ublk_queue_close(struct ublk_queue *q)
{
    if (!q)
        return;
    ublk_ring_exit(&q->ring);       /* cancels the commands the kernel still holds */
    if (q->descs)
        munmap((void *)q->descs, q->descs_len);
    if (q->bufs)
        munmap(q->bufs, q->bufs_len);
    if (q->cdev_fd >= 0)
        close(q->cdev_fd);
    free(q->state);
    free(q);
}

/* Open /dev/ublkc<dev_id> for queue q_id with a buffer of buf_size (the
 * device's max_io_buf_bytes) per tag, or none if buf_size is 0 (UBLK_F_USER_COPY
 * devices: pread/pwrite the char device instead).  -ENOENT just after ADD_DEV
 * means the node is not there yet: retry. */
int ublk_queue_open(struct ublk_queue **out, int dev_id, int q_id, int depth, unsigned buf_size)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t descs_stride = (UBLK_MAX_QUEUE_DEPTH * sizeof(struct ublksrv_io_desc) + page - 1) &
                          ~(page - 1);
    char path[32];
    int ret;
    if (depth <= 0 || depth > UBLK_MAX_QUEUE_DEPTH)
        return -EINVAL;
    struct ublk_queue *q = calloc(1, sizeof(*q));
    if (!q)
        return -ENOMEM;
    q->ring.fd = q->cdev_fd = -1;
    q->q_id = q_id;
    q->depth = depth;
    q->buf_size = (unsigned)((buf_size + page - 1) & ~(page - 1));
    q->state = malloc((size_t)depth);
    if (!q->state) {
        ret = -ENOMEM;
        goto fail;
    }
    memset(q->state, UBLK_TAG_DEAD, (size_t)depth);
    snprintf(path, sizeof(path), "/dev/ublkc%d", dev_id);
    q->cdev_fd = open(path, O_RDWR | O_CLOEXEC);
    if (q->cdev_fd < 0) {
        ret = -errno;
        goto fail;
    }
    q->descs_len = ((size_t)depth * sizeof(struct ublksrv_io_desc) + page - 1) & ~(page - 1);
    void *descs = mmap(NULL, q->descs_len, PROT_READ, MAP_SHARED | MAP_POPULATE, q->cdev_fd,
                       UBLKSRV_CMD_BUF_OFFSET + (off_t)q_id * (off_t)descs_stride);
    if (descs == MAP_FAILED) {
        ret = -errno;
        goto fail;
    }
    q->descs = descs;
    if (q->buf_size) {
        q->bufs_len = (size_t)depth * q->buf_size;
        void *bufs = mmap(NULL, q->bufs_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                          -1, 0);
        if (bufs == MAP_FAILED) {
            ret = -errno;
            goto fail;
        }
        q->bufs = bufs;
        /* Where THP is "always", the first touch of a tag's buffer would make a 2 MiB page
         * resident: an idle device would cost megabytes.  Small pages cost it what it used. */
        madvise(bufs, q->bufs_len, MADV_NOHUGEPAGE);
    }
    /* COOP_TASKRUN (5.19): a request that reaches the daemon while it runs waits for its
     * next system call instead of interrupting it; one asleep in ppoll is woken as before. */
    ret = ublk_ring_init(&q->ring, (unsigned)depth, 2 * (unsigned)depth,
                         IORING_SETUP_COOP_TASKRUN);
    if (ret == -EINVAL)
        ret = ublk_ring_init(&q->ring, (unsigned)depth, 2 * (unsigned)depth, 0);
    if (ret < 0)
        goto fail;
    *out = q;
    return 0;
fail:
    ublk_queue_close(q);
    return ret;
}

/* Readable (POLLIN) when requests (or aborts) have arrived. */
int ublk_queue_ring_fd(struct ublk_queue *q)
{
    return q->ring.fd;
}

/* The IORING_SETUP_* flags the queue's ring was made with (what this kernel took). */
unsigned ublk_queue_ring_flags(struct ublk_queue *q)
{
    return q->ring.setup_flags;
}

int ublk_queue_cdev_fd(struct ublk_queue *q)
{
    return q->cdev_fd;
}

/* Tag t's buffer is ublk_queue_bufs(q) + t * ublk_queue_buf_size(q). */
void *ublk_queue_bufs(struct ublk_queue *q)
{
    return q->bufs;
}

unsigned ublk_queue_buf_size(struct ublk_queue *q)
{
    return q->buf_size;
}

/* 0 after a stop or abort means the queue is finished. */
int ublk_queue_in_kernel(struct ublk_queue *q)
{
    return q->in_kernel;
}

int ublk_queue_last_error(struct ublk_queue *q)
{
    return q->last_error;
}

/* The first sector of the request tag t holds (its descriptor stays until it is committed);
 * UINT64_MAX, past any device, for a tag the queue has not. */
uint64_t ublk_queue_start_sector(struct ublk_queue *q, int tag)
{
    if (!q || tag < 0 || tag >= q->depth)
        return UINT64_MAX;
    return q->descs[tag].start_sector;
}

static int ublk_queue_prep(struct ublk_queue *q, unsigned op, int tag, int32_t result)
{
    struct io_uring_sqe *sqe = ublk_ring_sqe(&q->ring, q->cdev_fd, op, (uint64_t)tag);
    if (!sqe) {                     /* SQ full: push what is there */
        int ret = ublk_ring_enter(&q->ring, 0, 0);
        if (ret < 0)
            return ret;
        if (!(sqe = ublk_ring_sqe(&q->ring, q->cdev_fd, op, (uint64_t)tag)))
            return -EBUSY;
    }
    struct ublksrv_io_cmd *cmd = (struct ublksrv_io_cmd *)sqe->cmd;
    cmd->q_id = (uint16_t)q->q_id;
    cmd->tag = (uint16_t)tag;
    cmd->result = result;
    cmd->addr = q->bufs ? (uint64_t)(uintptr_t)(q->bufs + (size_t)tag * q->buf_size) : 0;
    q->state[tag] = UBLK_TAG_KERNEL;
    q->in_kernel++;
    return 0;
}

/* FETCH_REQ for every tag (at start, or after recovery), one io_uring_enter. */
int ublk_queue_fetch_all(struct ublk_queue *q)
{
    for (int t = 0; t < q->depth; t++)
        if (q->state[t] != UBLK_TAG_DEAD)
            return -EINVAL;
    for (int t = 0; t < q->depth; t++) {
        int ret = ublk_queue_prep(q, UBLK_U_IO_FETCH_REQ, t, 0);
        if (ret < 0)
            return ret;
    }
    return ublk_ring_enter(&q->ring, 0, 0);
}

/* True once every tag is dead: none with the kernel, none handed out. */
static int ublk_queue_finished(const struct ublk_queue *q)
{
    for (int t = 0; t < q->depth; t++)
        if (q->state[t] != UBLK_TAG_DEAD)
            return 0;
    return 1;
}

/* Collect up to max new requests into out, waiting up to timeout_us (< 0: no
 * limit, 0: no wait) for the first.  Returns how many (0 on timeout), -ENODEV
 * once every tag is dead (the queue was stopped or aborted and nothing is
 * handed out), -EINTR, or -errno. */
int ublk_queue_reap(struct ublk_queue *q, int max, struct ublk_req *out, long long timeout_us)
{
    struct io_uring_cqe cqe;
    int n = 0, waited = 0;
    for (;;) {
        while (n < max && ublk_ring_peek(&q->ring, &cqe)) {
            unsigned tag = (unsigned)cqe.user_data;
            if (tag >= (unsigned)q->depth || q->state[tag] != UBLK_TAG_KERNEL)
                continue;
            q->in_kernel--;
            if (cqe.res != UBLK_IO_RES_OK) {    /* ABORT (-ENODEV) on stop, or an error */
                q->state[tag] = UBLK_TAG_DEAD;
                if (cqe.res != UBLK_IO_RES_ABORT)
                    q->last_error = cqe.res;
                continue;
            }
            const struct ublksrv_io_desc *d = &q->descs[tag];
            q->state[tag] = UBLK_TAG_USER;
            out[n++] = (struct ublk_req){
                .tag = (uint16_t)tag,
                .op = (uint8_t)(d->op_flags & 0xff),
                .flags = d->op_flags & ~0xffu,
                .nr_sectors = d->nr_sectors,
                .start_sector = d->start_sector,
                .addr = d->addr,
            };
        }
        if (n > 0 || max <= 0)
            return n;
        if (q->in_kernel == 0)              /* nothing can arrive */
            return ublk_queue_finished(q) ? -ENODEV : 0;
        if (timeout_us == 0 || waited)
            return 0;
        int ret = ublk_ring_enter(&q->ring, 1, timeout_us);
        if (ret == -ETIME)
            return 0;
        if (ret < 0)
            return ret;
        waited = 1;
    }
}

/* Complete n handed-out requests (result: bytes done, or -errno) and fetch
 * the next request for each tag, one io_uring_enter.  Returns n, or -errno
 * (-EINVAL, with nothing sent, when a tag was not handed out or is repeated). */
int ublk_queue_commit(struct ublk_queue *q, int n, const uint16_t *tags, const int32_t *results)
{
    for (int i = 0; i < n; i++) {
        if (tags[i] >= q->depth || q->state[tags[i]] != UBLK_TAG_USER) {
            while (i--)
                q->state[tags[i]] = UBLK_TAG_USER;
            return -EINVAL;
        }
        q->state[tags[i]] = UBLK_TAG_COMMITTING;
    }
    for (int i = 0; i < n; i++) {
        int ret = ublk_queue_prep(q, UBLK_U_IO_COMMIT_AND_FETCH_REQ, tags[i], results[i]);
        if (ret < 0)
            return ret;
    }
    int ret = ublk_ring_enter(&q->ring, 0, 0);
    return ret < 0 ? ret : n;
}

/* ========================================================================== */
/* Bridges: ublk requests straight into the frame engine                       */
/* ========================================================================== */
/*
 * A bridge (struct aoe_bridge_ops) feeds the engine from the kernel's block layer
 * inside aoe_pump.  With the ublk bridge, aoe_pump reaps the queue's new requests
 * and submits READ, WRITE and FLUSH to the engine under ublk_request_id(op, tag),
 * and commits the ones that succeed, so a request that goes well never reaches
 * Python.  Failed ones come back in done[] with that id for aoe.py to decide
 * (EIO, the flush fallback); requests the bridge does not take (bridge_on 0,
 * other ops, past the end, writes to a read-only device, engine full) are
 * handed to aoe.py in ublk_handed[].
 */

/* ABI-BEGIN: the ublk bridge */
/* The engine op (OP_*) the bridge submits request r as, for a device of `sectors`
 * sectors, or -errno: r is handed to aoe.py, which decides. */
static inline int ublk_bridge_op(const struct ublk_req *r, uint64_t sectors, int readonly)
{
    if (r->op == UBLK_IO_OP_FLUSH)          /* start_sector is meaningless here */
        return OP_FLUSH;
    if (r->op != UBLK_IO_OP_READ && (r->op != UBLK_IO_OP_WRITE || readonly))
        return -EOPNOTSUPP;
    if (!r->nr_sectors || r->start_sector > sectors || r->nr_sectors > sectors - r->start_sector)
        return -ERANGE;
    return r->op == UBLK_IO_OP_READ ? OP_READ : OP_WRITE;
}

int aoe_eng_bridge(struct aoe_eng *e, struct ublk_queue *q, uint64_t sectors, int readonly);
/* ABI-END */

struct ublk_bridge {
    struct ublk_queue *q;
    int ncommit;                            /* completions gathered to commit */
    uint32_t *bytes;                        /* per tag: bytes the bridged request moves */
    uint16_t *tags;                         /* the completions to commit */
    int32_t *results;
    struct ublk_req *handed;                /* e->ublk_handed */
};

/* What either bridge starts with: the device's size, admission on. */
static void bridge_open(struct aoe_eng *e, const struct aoe_bridge_ops *ops, void *state,
                        uint64_t sectors, int readonly)
{
    e->bridge = ops;
    e->bridge_state = state;
    e->bridge_sectors = sectors;
    e->bridge_readonly = readonly != 0;
    e->bridge_on = 1;
    e->bridge_finished = 0;
    e->bridge_error = 0;
}

static void ublk_bridge_release(struct aoe_eng *e)
{
    struct ublk_bridge *ub = e->bridge_state;
    if (!ub)
        return;
    free(ub->handed);
    free(ub->bytes);
    free(ub->tags);
    free(ub->results);
    free(ub);
    e->ublk_handed = NULL;
}

static int ublk_bridge_submit(struct aoe_eng *e, const struct ublk_req *r)
{
    struct ublk_bridge *ub = e->bridge_state;
    uint64_t id = ublk_request_id(r->op, r->tag);
    if (!e->bridge_on)
        return -EAGAIN;
    int op = ublk_bridge_op(r, e->bridge_sectors, e->bridge_readonly);
    if (op == OP_FLUSH) {
        ub->bytes[r->tag] = 0;
        return aoe_submit(e, id, OP_FLUSH, 0, 0, NULL);
    }
    if (op < 0)
        return op;
    ub->bytes[r->tag] = r->nr_sectors * SECTOR_SIZE;
    return aoe_submit(e, id, op, r->start_sector, r->nr_sectors,
                      ub->q->bufs + (size_t)r->tag * ub->q->buf_size);
}

/* Reap what the kernel sent: submit it, or hand it to aoe.py. */
static void ublk_bridge_take(struct aoe_eng *e)
{
    struct ublk_bridge *ub = e->bridge_state;
    struct ublk_req r;
    for (;;) {
        int n = ublk_queue_reap(ub->q, 1, &r, 0);
        if (n == -ENODEV) {
            e->bridge_finished = 1;
            return;
        }
        if (n < 0) {
            if (n != -EINTR)
                e->bridge_error = n;
            return;
        }
        if (n == 0)
            return;
        if (ublk_bridge_submit(e, &r) < 0)
            ub->handed[e->nhanded++] = r;
    }
}

/* Commit the bridged requests that succeeded; leave every other event in done[]. */
static void ublk_bridge_settle(struct aoe_eng *e)
{
    struct ublk_bridge *ub = e->bridge_state;
    int kept = 0;
    for (int i = 0; i < e->ndone; i++) {
        struct aoe_event ev = e->done[i];
        if (is_ublk_request_id(ev.req_id) && ev.status == 0) {
            unsigned tag = ublk_request_tag(ev.req_id);
            ub->tags[ub->ncommit] = (uint16_t)tag;
            ub->results[ub->ncommit++] = (int32_t)ub->bytes[tag];
        } else {
            e->done[kept++] = ev;
        }
    }
    e->ndone = kept;
    if (ub->ncommit) {
        int ret = ublk_queue_commit(ub->q, ub->ncommit, ub->tags, ub->results);
        if (ret < 0)
            e->bridge_error = ret;
        ub->ncommit = 0;
    }
}

/* The ring fd shows new requests. */
static short ublk_bridge_poll_events(const struct aoe_eng *e)
{
    (void)e;
    return POLLIN;
}

static const struct aoe_bridge_ops ublk_bridge_ops = {
    .take = ublk_bridge_take,
    .settle = ublk_bridge_settle,
    .poll_events = ublk_bridge_poll_events,
    .release = ublk_bridge_release,
};

/* Bridge queue q (of a device of `sectors` sectors) to the engine; q NULL ends
 * the bridge (do that before closing the queue).  -EINVAL while the engine
 * serves an nbd socket. */
int aoe_eng_bridge(struct aoe_eng *e, struct ublk_queue *q, uint64_t sectors, int readonly)
{
    if (!e)
        return -EINVAL;
    if (e->bridge && e->bridge != &ublk_bridge_ops)
        return q ? -EINVAL : 0;
    bridge_end(e);
    if (!q)
        return 0;
    size_t n = (size_t)q->depth;
    struct ublk_bridge *ub = calloc(1, sizeof(*ub));
    if (!ub)
        return -ENOMEM;
    ub->q = q;
    ub->handed = calloc(n, sizeof(*ub->handed));
    ub->bytes = calloc(n, sizeof(*ub->bytes));
    ub->tags = calloc(n, sizeof(*ub->tags));
    ub->results = calloc(n, sizeof(*ub->results));
    bridge_open(e, &ublk_bridge_ops, ub, sectors, readonly);
    if (!ub->handed || !ub->bytes || !ub->tags || !ub->results) {
        bridge_end(e);
        return -ENOMEM;
    }
    e->ublk_handed = ub->handed;
    return 0;
}

/* ========================================================================== */
/* NBD bridge: the kernel's nbd requests straight into the frame engine        */
/* ========================================================================== */
/*
 * The same for the kernel's nbd driver as the ublk bridge: aoe.py connects the
 * device (netlink or ioctls) with one end of a socketpair and bridges the
 * other here.  aoe_pump then reads the NBD transmission protocol from it
 * (requests cut anywhere; write data lands in the request's slot buffer),
 * submits READ, WRITE and FLUSH to the engine under id
 * NBD_ID | op << 32 | slot, answers those that succeed (read data
 * straight from the slot, many answers per sendmsg, in any order), and sends
 * a FUA write's flush after the write.  Failed ones come back in done[] with
 * that id; requests the bridge does not take (bridge_on 0, other commands,
 * unaligned, past the end, writes to a read-only device, engine full) are
 * handed to aoe.py in nbd_handed[].  aoe.py answers both with aoe_nbd_reply,
 * or submits them to the engine under the same id.  NBD_CMD_DISC, the end of
 * the stream and a request without the magic finish the bridge.
 */

#define NBD_REQUEST_MAGIC   0x25609513u
#define NBD_REPLY_MAGIC     0x67446698u
#define NBD_REQUEST_LEN     28
#define NBD_REPLY_LEN       16
#define NBD_IN_SIZE         16384   /* headers are read in pieces of up to this */
#define NBD_OUT_BATCH       32      /* answers per sendmsg */
#define NBD_OUT_IOV         (2 * NBD_OUT_BATCH)     /* an answer takes one iovec or two (its
                                                     * header, then a read's data) */

enum { NBD_SLOT_FREE, NBD_SLOT_DATA, NBD_SLOT_ENGINE, NBD_SLOT_HANDED, NBD_SLOT_REPLY };

/* ABI-BEGIN: the nbd bridge */
#define NBD_CMD_READ    0
#define NBD_CMD_WRITE   1
#define NBD_CMD_DISC    2
#define NBD_CMD_FLUSH   3
#define NBD_CMD_FLAG_FUA (1 << 16)

/* A request the bridge leaves to aoe.py. */
struct nbd_req {
    uint32_t slot;
    uint16_t command;               /* NBD_CMD_* */
    uint32_t flags;                 /* NBD_CMD_FLAG_*: the request type's upper half */
    uint64_t offset;                /* bytes */
    uint32_t length;
};

int aoe_nbd_bridge(struct aoe_eng *e, int fd, int slots, unsigned buf_size, uint64_t sectors,
                   int readonly);
void *aoe_nbd_buf(struct aoe_eng *e, uint32_t slot);
int aoe_nbd_reply(struct aoe_eng *e, uint32_t slot, int32_t error);
/* ABI-END */

struct nbd_slot {
    uint8_t state;                  /* NBD_SLOT_* */
    uint8_t fua;                    /* a write whose flush is still to come */
    uint16_t command;
    uint32_t flags;
    uint8_t handle[8];
    uint64_t offset;
    uint32_t length, got;           /* write data read so far */
    uint8_t *big;                   /* malloc'ed when the request exceeds buf_size */
    uint8_t discard;                /* a write too large for its slot and outside the device:
                                     * its data is read and dropped */
    uint8_t reply[NBD_REPLY_LEN];
    uint32_t reply_len;             /* header and, for a good read, the data */
    uint32_t next;                  /* free list or answer queue */
};

struct nbd_bridge {
    int fd;
    uint32_t nslots;
    unsigned buf_size;
    uint8_t *bufs;                  /* nslots * buf_size, page aligned */
    size_t bufs_len;
    struct nbd_slot *slots;
    uint32_t free_head;
    uint32_t out_head, out_tail;    /* answers waiting for the socket, oldest first */
    uint32_t out_sent;              /* bytes of the oldest already sent */
    uint32_t reading;               /* the write whose data is arriving, or NONE */
    uint32_t in_start, in_end;      /* unparsed bytes in in[] */
    uint8_t in[NBD_IN_SIZE];
    struct nbd_req *handed;         /* e->nbd_handed */
};

static const struct aoe_bridge_ops nbd_bridge_ops;

/* The engine's nbd bridge, or NULL. */
static struct nbd_bridge *nbd_of(const struct aoe_eng *e)
{
    return e->bridge == &nbd_bridge_ops ? e->bridge_state : NULL;
}

static uint8_t *nbd_data(const struct nbd_bridge *b, uint32_t i)
{
    const struct nbd_slot *s = &b->slots[i];
    return s->big ? s->big : b->bufs + (size_t)i * b->buf_size;
}

static void nbd_release(struct aoe_eng *e)
{
    struct nbd_bridge *b = e->bridge_state;
    if (!b)
        return;
    if (b->slots)
        for (uint32_t i = 0; i < b->nslots; i++)
            free(b->slots[i].big);
    if (b->bufs)
        munmap(b->bufs, b->bufs_len);
    free(b->slots);
    free(b->handed);
    free(b);
    e->nbd_handed = NULL;
    e->nbd_open = 0;
}

/* Bridge the nbd socket fd (non-blocking; aoe.py keeps it open) with `slots`
 * requests at once, each with a buffer of buf_size (larger ones get their
 * own), for a device of `sectors` sectors; fd < 0 ends the bridge, failing
 * what the engine still holds for it (their buffers go). */
int aoe_nbd_bridge(struct aoe_eng *e, int fd, int slots, unsigned buf_size, uint64_t sectors,
                   int readonly)
{
    if (!e || (e->bridge && e->bridge != &nbd_bridge_ops))
        return -EINVAL;
    if (e->bridge && e->active_requests)
        aoe_fail_all(e, -ECANCELED);
    bridge_end(e);
    if (fd < 0)
        return 0;
    if (slots <= 0 || slots > 0xFFFF || buf_size < SECTOR_SIZE)
        return -EINVAL;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    struct nbd_bridge *b = calloc(1, sizeof(*b));
    if (!b)
        return -ENOMEM;
    bridge_open(e, &nbd_bridge_ops, b, sectors, readonly);
    b->fd = fd;
    b->nslots = (uint32_t)slots;
    b->buf_size = (unsigned)((buf_size + page - 1) & ~(page - 1));
    b->bufs_len = (size_t)slots * b->buf_size;
    b->slots = calloc((size_t)slots, sizeof(*b->slots));
    b->handed = calloc((size_t)slots, sizeof(*b->handed));
    void *bufs = mmap(NULL, b->bufs_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
    if (bufs == MAP_FAILED || !b->slots || !b->handed) {
        if (bufs != MAP_FAILED)
            munmap(bufs, b->bufs_len);
        bridge_end(e);
        return -ENOMEM;
    }
    b->bufs = bufs;
    madvise(bufs, b->bufs_len, MADV_NOHUGEPAGE);    /* as for ublk's tag buffers */
    for (uint32_t i = 0; i < b->nslots; i++)
        b->slots[i].next = i + 1 < b->nslots ? i + 1 : NONE;
    b->free_head = 0;
    b->out_head = b->out_tail = b->reading = NONE;
    e->nbd_handed = b->handed;
    return 0;
}

/* Slot i's buffer (a request aoe.py submits itself uses it). */
void *aoe_nbd_buf(struct aoe_eng *e, uint32_t slot)
{
    const struct nbd_bridge *b = e ? nbd_of(e) : NULL;
    if (!b || slot >= b->nslots)
        return NULL;
    return nbd_data(b, slot);
}

static void nbd_finish(struct aoe_eng *e, int error)
{
    if (error && !e->bridge_error)
        e->bridge_error = error;
    e->bridge_finished = 1;
}

static void nbd_free_slot(struct nbd_bridge *b, uint32_t i)
{
    struct nbd_slot *s = &b->slots[i];
    free(s->big);
    s->big = NULL;
    s->state = NBD_SLOT_FREE;
    s->next = b->free_head;
    b->free_head = i;
}

/* Send the queued answers while the socket takes them; once the stream is
 * broken they are dropped. */
static void nbd_flush_out(struct aoe_eng *e)
{
    struct nbd_bridge *b = e->bridge_state;
    while (b->out_head != NONE) {
        struct iovec iov[NBD_OUT_IOV];
        int n = 0;
        uint32_t skip = b->out_sent;
        /* room for an answer's two iovecs, whatever the answers before it took */
        for (uint32_t i = b->out_head; i != NONE && n + 2 <= NBD_OUT_IOV; i = b->slots[i].next) {
            struct nbd_slot *s = &b->slots[i];
            uint32_t data_len = s->reply_len - NBD_REPLY_LEN;
            if (skip < NBD_REPLY_LEN)
                iov[n++] = (struct iovec){ s->reply + skip, NBD_REPLY_LEN - skip };
            if (data_len) {
                uint32_t off = skip > NBD_REPLY_LEN ? skip - NBD_REPLY_LEN : 0;
                iov[n++] = (struct iovec){ nbd_data(b, i) + off, data_len - off };
            }
            skip = 0;
        }
        ssize_t sent = -1;
        if (!e->bridge_finished) {
            struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n };
            sent = sendmsg(b->fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (sent < 0 && (errno == EAGAIN || errno == EINTR))
                return;
            if (sent < 0)
                nbd_finish(e, -errno);
        }
        if (sent < 0) {                     /* nobody reads them now */
            while (b->out_head != NONE) {
                uint32_t i = b->out_head;
                b->out_head = b->slots[i].next;
                nbd_free_slot(b, i);
                e->nbd_open--;
            }
            b->out_tail = NONE;             /* else the next answer is linked to a free slot */
            b->out_sent = 0;
            return;
        }
        size_t left = (size_t)sent + b->out_sent;
        while (b->out_head != NONE && left >= b->slots[b->out_head].reply_len) {
            uint32_t i = b->out_head;
            left -= b->slots[i].reply_len;
            b->out_head = b->slots[i].next;
            nbd_free_slot(b, i);
            e->nbd_open--;
        }
        if (b->out_head == NONE)
            b->out_tail = NONE;
        b->out_sent = (uint32_t)left;
    }
}

static void nbd_queue_reply(struct nbd_bridge *b, uint32_t i, int32_t error)
{
    struct nbd_slot *s = &b->slots[i];
    uint32_t magic = NBD_REPLY_MAGIC, err = (uint32_t)error;
    uint8_t *r = s->reply;
    for (int k = 0; k < 4; k++) {
        r[k] = (uint8_t)(magic >> (24 - 8 * k));
        r[4 + k] = (uint8_t)(err >> (24 - 8 * k));
    }
    memcpy(r + 8, s->handle, 8);
    s->reply_len = NBD_REPLY_LEN + (!error && s->command == NBD_CMD_READ ? s->length : 0);
    s->state = NBD_SLOT_REPLY;
    s->next = NONE;
    if (b->out_tail == NONE)
        b->out_head = i;
    else
        b->slots[b->out_tail].next = i;
    b->out_tail = i;
}

/* Answer a request aoe.py holds (handed over, or failed in the engine): error 0 or
 * an errno.  Returns 0, or -EINVAL when the slot is not aoe.py's to answer. */
int aoe_nbd_reply(struct aoe_eng *e, uint32_t slot, int32_t error)
{
    struct nbd_bridge *b = e ? nbd_of(e) : NULL;
    if (!b || slot >= b->nslots || error < 0 ||
        (b->slots[slot].state != NBD_SLOT_HANDED && b->slots[slot].state != NBD_SLOT_ENGINE))
        return -EINVAL;
    nbd_queue_reply(b, slot, error);
    nbd_flush_out(e);
    return 0;
}

/* A request read whole: into the engine, or to aoe.py. */
static void nbd_start(struct aoe_eng *e, uint32_t i)
{
    struct nbd_bridge *b = e->bridge_state;
    struct nbd_slot *s = &b->slots[i];
    int rc = -EAGAIN;
    s->state = NBD_SLOT_ENGINE;
    if (e->bridge_on) {
        uint64_t lba = s->offset / SECTOR_SIZE, count = s->length / SECTOR_SIZE;
        int op = s->command == NBD_CMD_READ ? OP_READ : OP_WRITE;
        if (s->command == NBD_CMD_FLUSH)
            rc = aoe_submit(e, nbd_request_id(OP_FLUSH, i), OP_FLUSH, 0, 0, NULL);
        else if ((s->command != NBD_CMD_READ &&
                  (s->command != NBD_CMD_WRITE || e->bridge_readonly)) ||
                 s->offset % SECTOR_SIZE || s->length % SECTOR_SIZE || !count ||
                 lba > e->bridge_sectors || count > e->bridge_sectors - lba)
            rc = -EINVAL;
        else
            rc = aoe_submit(e, nbd_request_id(op, i), op, lba, (uint32_t)count, nbd_data(b, i));
    }
    if (rc < 0) {
        s->state = NBD_SLOT_HANDED;
        b->handed[e->nhanded++] = (struct nbd_req){
            .slot = i, .command = s->command, .flags = s->flags,
            .offset = s->offset, .length = s->length };
    }
}

/* A request's bytes lie inside the device (NbdBackend.inside): only then does a length
 * read from the stream get a buffer of its own. */
static int nbd_inside(const struct aoe_eng *e, const struct nbd_slot *s)
{
    uint64_t size = e->bridge_sectors * SECTOR_SIZE;
    return s->length <= size && s->offset <= size - s->length;
}

/* Parse one request header from in[]; 0, or -1 when the bridge is finished. */
static int nbd_parse(struct aoe_eng *e)
{
    struct nbd_bridge *b = e->bridge_state;
    const uint8_t *h = b->in + b->in_start;
    b->in_start += NBD_REQUEST_LEN;
    if (be32(h) != NBD_REQUEST_MAGIC) {
        nbd_finish(e, -EPROTO);
        return -1;
    }
    uint32_t type = be32(h + 4);
    if ((type & 0xFFFF) == NBD_CMD_DISC) {
        nbd_finish(e, 0);
        return -1;
    }
    uint32_t i = b->free_head;
    struct nbd_slot *s = &b->slots[i];
    b->free_head = s->next;
    e->nbd_open++;
    s->command = (uint16_t)(type & 0xFFFF);
    s->flags = type & 0xFFFF0000u;
    memcpy(s->handle, h + 8, 8);
    s->offset = (uint64_t)be32(h + 16) << 32 | be32(h + 20);
    s->length = be32(h + 24);
    s->fua = s->command == NBD_CMD_WRITE && (s->flags & NBD_CMD_FLAG_FUA);
    s->got = 0;
    int moves_data = s->command == NBD_CMD_READ || s->command == NBD_CMD_WRITE;
    int too_big = moves_data && s->length > b->buf_size;
    s->discard = too_big && !nbd_inside(e, s);      /* refused in any case: no buffer */
    if (too_big && !s->discard && !(s->big = malloc(s->length))) {
        nbd_finish(e, -ENOMEM);
        return -1;
    }
    if (s->command == NBD_CMD_WRITE && s->length) {
        s->state = NBD_SLOT_DATA;
        b->reading = i;
        return 0;
    }
    nbd_start(e, i);
    return 0;
}

/* recv into buf; the count, 0 when nothing is there now, or -1 when the bridge
 * is finished (the end of the stream: the kernel disconnected).  A read shorter
 * than asked took all there was: *drained says so, sparing the next recv's EAGAIN
 * (poll tells when more comes). */
static ssize_t nbd_recv(struct aoe_eng *e, void *buf, size_t len, int *drained)
{
    if (*drained)
        return 0;
    const struct nbd_bridge *b = e->bridge_state;
    ssize_t n = recv(b->fd, buf, len, MSG_DONTWAIT);
    if (n > 0) {
        *drained = (size_t)n < len;
        return n;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        *drained = 1;
        return 0;
    }
    nbd_finish(e, n < 0 ? -errno : 0);
    return -1;
}

/* Read what the kernel sent while there are slots for it. */
static void nbd_take(struct aoe_eng *e)
{
    struct nbd_bridge *b = e->bridge_state;
    int drained = 0;
    while (!e->bridge_finished) {
        if (b->reading != NONE) {
            struct nbd_slot *s = &b->slots[b->reading];
            uint32_t want = s->length - s->got, have = b->in_end - b->in_start;
            uint8_t *to = s->discard ? NULL : nbd_data(b, b->reading) + s->got;
            ssize_t n;
            if (have) {                     /* what came with the header */
                n = have < want ? have : want;
                if (to)
                    memcpy(to, b->in + b->in_start, (size_t)n);
                b->in_start += (uint32_t)n;
            } else if (!to) {               /* dropped: in[] is empty, a scratch area */
                b->in_start = b->in_end = 0;
                if ((n = nbd_recv(e, b->in, want < NBD_IN_SIZE ? want : NBD_IN_SIZE,
                                  &drained)) <= 0)
                    return;
            } else if ((n = nbd_recv(e, to, want, &drained)) <= 0) {
                return;                     /* the rest straight into the slot */
            }
            s->got += (uint32_t)n;
            if (s->got == s->length) {
                uint32_t i = b->reading;
                b->reading = NONE;
                nbd_start(e, i);
            }
            continue;
        }
        if (b->free_head == NONE)
            return;                         /* answers free slots */
        if (b->in_end - b->in_start < NBD_REQUEST_LEN) {
            memmove(b->in, b->in + b->in_start, b->in_end - b->in_start);
            b->in_end -= b->in_start;
            b->in_start = 0;
            ssize_t n = nbd_recv(e, b->in + b->in_end, NBD_IN_SIZE - b->in_end, &drained);
            if (n <= 0)
                return;
            b->in_end += (uint32_t)n;
            continue;
        }
        if (nbd_parse(e) < 0)
            return;
    }
}

/* Answer the bridged requests that succeeded, those aoe.py submitted too (a FUA
 * write's flush first); leave every other event in done[]. */
static void nbd_settle(struct aoe_eng *e)
{
    struct nbd_bridge *b = e->bridge_state;
    int kept = 0;
    for (int i = 0; i < e->ndone; i++) {
        struct aoe_event ev = e->done[i];
        uint32_t slot = nbd_request_slot(ev.req_id);
        if (!is_nbd_request_id(ev.req_id) || slot >= b->nslots ||
            (b->slots[slot].state != NBD_SLOT_ENGINE && b->slots[slot].state != NBD_SLOT_HANDED)) {
            e->done[kept++] = ev;
            continue;
        }
        struct nbd_slot *s = &b->slots[slot];
        if (ev.status == 0 && s->fua) {
            s->fua = 0;
            ev.status = aoe_submit(e, nbd_request_id(OP_FLUSH, slot), OP_FLUSH, 0, 0, NULL);
        } else if (ev.status == 0) {
            nbd_queue_reply(b, slot, 0);
        }
        if (ev.status)
            e->done[kept++] = ev;
    }
    e->ndone = kept;
    nbd_flush_out(e);
}

/* What aoe_pump waits for on the socket: requests while there are slots for
 * them, room while answers wait. */
static short nbd_poll_events(const struct aoe_eng *e)
{
    const struct nbd_bridge *b = e->bridge_state;
    short ev = 0;
    if (b->reading != NONE || b->free_head != NONE)
        ev |= POLLIN;
    if (b->out_head != NONE)
        ev |= POLLOUT;
    return ev;
}

static const struct aoe_bridge_ops nbd_bridge_ops = {
    .take = nbd_take,
    .settle = nbd_settle,
    .poll_events = nbd_poll_events,
    .release = nbd_release,
};
