/*
 * fuzz/nbd.c - the kernel's NBD request stream into the nbd bridge
 * (aoe_nbd_bridge: nbd_take, nbd_parse, nbd_start, nbd_settle, nbd_flush_out,
 * aoe_nbd_reply), with an AoE target behind the engine.  The script plays the
 * kernel on the other end of a stream socketpair, aoe.py's NbdBridged and
 * Engine around aoe_pump (resends, failures answered EIO, handed requests
 * answered or submitted as NbdBridged._start does, the flush fallback, the
 * target going down), and the target on the far end of the engine's datagram
 * socketpair, serving frames from a disk model.
 *
 * Input (bytes past the end read as 0):
 *   u8  frames      engine slots: % 8 -> 1024 (0-4), 16, 256, 32768 (aoe.py's; rarely, as
 *                   it takes most of the time of an input)
 *   u16 gen_seed
 *   u8  spf         sectors per frame: 1 + spf % 17, or MAX_SPF for 255
 *   u8  setup       bit 0: LBA28 (else lba48); bit 1: read-only; bit 2: small stream
 *                   buffers; bit 3: small datagram buffers; bit 4: the target aborts
 *                   FLUSH CACHE EXT (as vblade does); bit 5: rto 2 ms (else 250 ms);
 *                   bits 6-7: window 64, 128, 255 or 16
 *   u8  slots       64 (aoe.py's NBD_MAX_READ) below 128, else 1 + slots % 64
 *   u8  buf_size    % 4 -> 64 KiB, 128 KiB, 512 KiB (aoe.py's range), 4 KiB
 *   u8  sectors     device size: % 4 -> 2048, 64, 65536, 8
 *   then at most MAX_STEPS steps, an opcode byte (% 16) each:
 *     0-2   queue requests: u8 n (1 + n % 8, or a burst of 1 + n % 64 when n >= 192),
 *           u8 command, u8 shape, u16 position, u8 size (see queue_requests)
 *     3-4   the kernel sends u8 (% 8 -> 1, 7, 28, 100, 4096, 70000 bytes, all, all)
 *           of the queued stream
 *     5-6   the kernel reads u8 (% 4 -> 16, 100, 4096 bytes, all) of the answers
 *     7-9   aoe_pump(e, 0, fd), then aoe.py's part
 *     10-11 the target serves the frames it holds, u8 bit 0: newest first
 *     12    the target serves one: u8 which, u8 how (right, ATA error, AoE error,
 *           lost, twice, right but kept to be answered again later)
 *     13    time passes: u8 bit 0: past the retransmit timeout, else 1 ms
 *     14    u8 bit 0: the target is declared dead (aoe_fail_all, bridge off) or,
 *           if it is, it comes back
 *     15    the stream ends: u8 % 4 -> NBD_CMD_DISC, a header without the magic,
 *           the kernel's shutdown (once all it queued is sent), the kernel closing its end
 *   Once the script ends, while the bridge goes on, everything left is sent and
 *   served right until every request is answered (checked).
 *
 * Invariants: every answer on the stream is framed right (magic, then for a good
 * read exactly its length of data), comes once, for a request sent and not yet
 * answered, never for NBD_CMD_DISC, with the error aoe.py gives that request;
 * read data equals the disk model (writes applied as the target served them);
 * a write answered well reached the disk, and a FUA one was followed by a
 * flush the target answered; every frame stays inside the device and carries
 * its own write's data; requests handed over are exactly what was sent;
 * e->nbd_open equals the slots in use, never more than the requests waiting;
 * the bridge's lists and the engine's (check_engine) hold together.
 */

#define clock_gettime fuzz_clock_gettime    /* the engine runs on the script's clock */
#include "../_aoeio.c"
#include "harness.h"

#define MAX_STEPS       96
#define MAX_REQUESTS    512
#define STREAM_MAX      (4u << 20)  /* bytes the kernel may queue in all */
#define SECTORS_MAX     8192        /* sectors all requests inside the device move */
#define ANSWERS_MAX     (1u << 20)  /* answers read and not yet parsed */
#define HELD_MAX        1024        /* request frames the target holds, the oldest lost */
#define DRAIN_ROUNDS    4000
#define HANDLE_BASE     0x6e62640000000000ull
#define MAC_INITIATOR   "\x02\x00\x00\x00\x00\x01"
#define MAC_TARGET      "\x02\x00\x00\x00\x01\x01"

enum { EXPECT_OK_OR_EIO, EXPECT_ERROR, EXPECT_NOTHING_OR_ERROR, EXPECT_NOTHING };

struct nbd_request {
    uint16_t command;
    uint32_t flags;
    uint64_t offset;
    uint32_t length;
    uint32_t sent_at;               /* stream offset where its header ends */
    int expect, error;              /* EXPECT_ERROR: this errno */
    int waiting;                    /* queued, and its answer not read yet */
    int overlapped;                 /* a read that had a write to its sectors waiting too */
    /* a write inside the device: which sectors the target wrote, and when all were */
    uint8_t *written;
    uint32_t nwritten;
    uint64_t all_written_seq;
};

struct held {
    uint8_t hdr[ATA_HDR_LEN];
    uint64_t version;               /* a write's data */
};

struct run {
    struct aoe_eng *e;
    int kernel, bridged;            /* the stream socketpair: the kernel's end, the bridge's */
    int sv[2];                      /* the datagram socketpair: the engine's end, the target's */
    uint64_t sectors;
    int readonly, aborts_flush_ext, dead, ever_dead, ended, stream_closed;
    uint32_t rto_us, nslots;
    struct nbd_request reqs[MAX_REQUESTS];
    int nreqs;
    uint8_t *stream;                /* what the kernel has queued */
    uint32_t stream_len, stream_sent;
    uint8_t *answers;
    uint32_t answers_len;
    uint32_t *disk;                 /* the version of every sector: 0, or the write's index + 1 */
    uint32_t moved;                 /* sectors of the requests inside the device */
    struct held held[HELD_MAX];
    uint32_t held_first, nheld;
    uint64_t seq, flush_seq;        /* events at the target; the last flush answered well */
    uint32_t *seen, mark;
    int progress;                   /* something moved in the last round (drain) */
};

static uint8_t frame_buf[ATA_HDR_LEN + MAX_SPF * SECTOR_SIZE];
static uint8_t stream_buf[STREAM_MAX];
static uint8_t answers_buf[ANSWERS_MAX];

static void put_be32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (24 - 8 * i));
}

static uint64_t be64(const uint8_t *p)
{
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

static struct nbd_request *by_handle(struct run *r, const uint8_t *handle)
{
    uint64_t h = be64(handle);
    CHECK(h >= HANDLE_BASE && h < HANDLE_BASE + (uint64_t)r->nreqs, "unknown handle %016llx",
          (unsigned long long)h);
    return &r->reqs[h - HANDLE_BASE];
}

static int is_write(const struct nbd_request *q)
{
    return q->command == NBD_CMD_WRITE;
}

static int moves_sectors(const struct nbd_request *q)
{
    return (q->command == NBD_CMD_READ || q->command == NBD_CMD_WRITE) &&
           q->expect == EXPECT_OK_OR_EIO;
}

/* ---- the kernel ------------------------------------------------------------- */

/* What aoe.py answers a request with, found as NbdBackend.refusal and
 * Engine.submit check it. */
static void expect_answer(struct run *r, struct nbd_request *q)
{
    q->expect = EXPECT_ERROR;
    if (q->command == NBD_CMD_DISC)
        q->expect = EXPECT_NOTHING;
    else if (q->command == NBD_CMD_FLUSH)
        q->expect = EXPECT_OK_OR_EIO;
    else if ((q->command != NBD_CMD_READ && q->command != NBD_CMD_WRITE) ||
             q->offset % SECTOR_SIZE || q->length % SECTOR_SIZE || !q->length)
        q->error = EINVAL;
    else if (is_write(q) && r->readonly)
        q->error = EPERM;
    else if (q->offset / SECTOR_SIZE > r->sectors ||
             q->length / SECTOR_SIZE > r->sectors - q->offset / SECTOR_SIZE)
        q->error = EIO;
    else
        q->expect = EXPECT_OK_OR_EIO;
}

static int overlap(const struct nbd_request *a, const struct nbd_request *b)
{
    return a->offset < b->offset + b->length && b->offset < a->offset + a->length;
}

/* Append one request (and a write's data) to the stream. */
static void queue_request(struct run *r, uint16_t command, uint32_t flags, uint64_t offset,
                          uint32_t length)
{
    if (r->stream_closed || r->nreqs == MAX_REQUESTS)
        return;
    int write = command == NBD_CMD_WRITE;
    int huge = write && length > STREAM_MAX / 4;        /* its data never all comes */
    uint32_t data = write && !huge ? length : 0;
    if (NBD_REQUEST_LEN + data > STREAM_MAX - r->stream_len)
        return;
    struct nbd_request *q = &r->reqs[r->nreqs];
    memset(q, 0, sizeof(*q));
    q->command = command;
    q->flags = flags;
    q->offset = offset;
    q->length = length;
    expect_answer(r, q);
    if (moves_sectors(q)) {                 /* (bounds the frames, and so the time, an input takes) */
        if (length / SECTOR_SIZE > SECTORS_MAX - r->moved)
            return;
        r->moved += length / SECTOR_SIZE;
    }
    int index = r->nreqs++;
    if (huge) {
        q->expect = EXPECT_NOTHING_OR_ERROR;
        r->stream_closed = 1;
    }
    q->waiting = 1;
    uint8_t *h = r->stream + r->stream_len;
    put_be32(h, NBD_REQUEST_MAGIC);
    put_be32(h + 4, flags | command);
    put_be32(h + 8, (uint32_t)((HANDLE_BASE + index) >> 32));
    put_be32(h + 12, (uint32_t)(HANDLE_BASE + index));
    put_be32(h + 16, (uint32_t)(offset >> 32));
    put_be32(h + 20, (uint32_t)offset);
    put_be32(h + 24, length);
    r->stream_len += NBD_REQUEST_LEN;
    q->sent_at = r->stream_len;
    if (data) {
        uint8_t *d = r->stream + r->stream_len;
        if (offset % SECTOR_SIZE == 0) {
            stamp_sectors(d, offset / SECTOR_SIZE, length / SECTOR_SIZE, (uint64_t)index + 1);
            memset(d + length / SECTOR_SIZE * SECTOR_SIZE, 0x77, length % SECTOR_SIZE);
        } else {
            memset(d, 0x77, length);
        }
        r->stream_len += data;
    }
    if (moves_sectors(q)) {
        if (write) {
            q->written = calloc(length / SECTOR_SIZE, 1);
            CHECK(q->written, "out of memory");
        }
        for (int i = 0; i < index; i++) {
            struct nbd_request *o = &r->reqs[i];
            if (!o->waiting || !moves_sectors(o) || !overlap(q, o))
                continue;
            if (write && !is_write(o))
                o->overlapped = 1;
            else if (!write && is_write(o))
                q->overlapped = 1;
        }
    }
}

/*
 * n requests (a burst: back to back): command % 16 -> read (0-5), write (6-8),
 * FUA write (9-10), flush (11), read with FUA (12), a command aoe.py does not
 * take (13: 4 + (command >> 4) % 4), flush with FUA (14), write with another
 * flag (15); shape % 16 -> inside the device (0-9), length 0 (10), offset
 * unaligned (11), length unaligned (12), past the end (13), a huge length (14),
 * a huge offset (15); position picks the sector, size the sectors (up to 8,
 * 128 or 1024).
 */
static void queue_requests(struct run *r, struct script *in)
{
    uint8_t n = next_u8(in), command = next_u8(in), shape = next_u8(in);
    uint16_t position = next_u16(in);
    uint8_t size = next_u8(in);
    int count = n >= 192 ? 1 + n % 64 : 1 + n % 8;
    static const uint16_t commands[16] = {
        NBD_CMD_READ, NBD_CMD_READ, NBD_CMD_READ, NBD_CMD_READ, NBD_CMD_READ, NBD_CMD_READ,
        NBD_CMD_WRITE, NBD_CMD_WRITE, NBD_CMD_WRITE, NBD_CMD_WRITE, NBD_CMD_WRITE,
        NBD_CMD_FLUSH, NBD_CMD_READ, 4, NBD_CMD_FLUSH, NBD_CMD_WRITE };
    uint16_t cmd = commands[command % 16];
    uint32_t flags = command % 16 == 9 || command % 16 == 10 || command % 16 == 12 ||
                     command % 16 == 14 ? NBD_CMD_FLAG_FUA
                   : command % 16 == 15 ? 1u << 17 : 0;
    if (command % 16 == 13)
        cmd = 4 + (command >> 4) % 4;
    uint32_t most = size < 128 ? 8 : size < 224 ? 128 : 1024;
    uint64_t lba = position % r->sectors;
    for (int i = 0; i < count; i++) {
        uint64_t sectors = 1 + (size + (uint32_t)i) % most;
        if (sectors > r->sectors - lba)
            sectors = r->sectors - lba;
        uint64_t offset = lba * SECTOR_SIZE, length = sectors * SECTOR_SIZE;
        switch (shape % 16) {
        case 10: length = 0; break;
        case 11: offset += 1 + size % 511; break;
        case 12: length += 1 + size % 511; break;
        case 13: offset = (r->sectors - 1 - size % 4) * SECTOR_SIZE;
                 length = (5 + (uint64_t)size % 8) * SECTOR_SIZE; break;
        case 14: length = size & 1 ? 0xFFFFFFFFu : 0xFFFFFE00u; break;
        case 15: offset = (uint64_t)position << 48 | (uint64_t)size << 9; break;
        }
        if (cmd == NBD_CMD_FLUSH && shape % 16 < 10)
            offset = length = 0;
        queue_request(r, cmd, flags, offset, (uint32_t)length);
        lba = (lba + sectors) % r->sectors;
    }
}

/* NBD_CMD_DISC, a header without the magic, the kernel's shutdown (once all
 * it queued is sent) or its end closed: the bridge must finish, answering
 * nothing more. */
static void end_stream(struct run *r, int how)
{
    if (r->stream_closed)
        return;
    if (how == 0) {
        queue_request(r, NBD_CMD_DISC, 0, 0, 0);
    } else if (how == 1 && r->stream_len + NBD_REQUEST_LEN <= STREAM_MAX) {
        memset(r->stream + r->stream_len, 0x25, NBD_REQUEST_LEN);
        r->stream_len += NBD_REQUEST_LEN;
    } else if (how == 2 && r->stream_sent == r->stream_len) {
        shutdown(r->kernel, SHUT_WR);
    } else if (how == 3) {
        close(r->kernel);                   /* (send and recv then fail: nothing moves) */
        r->kernel = -1;
    } else {
        return;
    }
    r->stream_closed = 1;
}

static void kernel_send(struct run *r, uint32_t most)
{
    while (r->stream_sent < r->stream_len && most) {
        uint32_t len = r->stream_len - r->stream_sent < most ? r->stream_len - r->stream_sent
                                                              : most;
        ssize_t n = send(r->kernel, r->stream + r->stream_sent, len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n <= 0)
            return;                         /* full (or the bridge is gone) */
        r->stream_sent += (uint32_t)n;
        most -= (uint32_t)n;
        r->progress = 1;
    }
}

/* One answer, whole in answers[]: checked against what its request expects. */
NO_COVERAGE static void check_answer(struct run *r, struct nbd_request *q, uint32_t error,
                                     const uint8_t *data)
{
    switch (q->expect) {
    case EXPECT_OK_OR_EIO:
        CHECK(error == 0 || error == EIO, "answer error %u", error);
        break;
    case EXPECT_ERROR:
        CHECK(error == (uint32_t)q->error || (error == EIO && r->ever_dead),
              "answer error %u to command %u at %llu+%u, not %d", error, q->command,
              (unsigned long long)q->offset, q->length, q->error);
        break;
    case EXPECT_NOTHING_OR_ERROR:
        CHECK(error != 0, "a huge write answered well");
        break;
    default:
        CHECK(0, "an answer to NBD_CMD_DISC");
    }
    if (error)
        return;
    uint64_t lba = q->offset / SECTOR_SIZE;
    uint32_t count = q->length / SECTOR_SIZE;
    if (q->command == NBD_CMD_READ) {
        for (uint32_t i = 0; i < count; i++) {
            const uint8_t *got = data + (size_t)i * SECTOR_SIZE;
            uint64_t version;
            CHECK(stamp_read(got, lba + i, &version), "read at %llu: sector %u is another "
                  "sector's or no sector's", (unsigned long long)lba, i);
            CHECK(q->overlapped || version == r->disk[lba + i], "read at %llu: sector %u of "
                  "version %llu, the disk holds %u", (unsigned long long)lba, i,
                  (unsigned long long)version, r->disk[lba + i]);
        }
    } else if (is_write(q)) {
        CHECK(q->nwritten == count, "write at %llu answered well with %u of %u sectors written",
              (unsigned long long)lba, q->nwritten, count);
        CHECK(!(q->flags & NBD_CMD_FLAG_FUA) || r->flush_seq > q->all_written_seq,
              "FUA write at %llu answered before a flush after it", (unsigned long long)lba);
    }
}

/* Parse the answers read so far. */
static void parse_answers(struct run *r)
{
    uint32_t at = 0;
    while (r->answers_len - at >= NBD_REPLY_LEN) {
        const uint8_t *a = r->answers + at;
        CHECK(be32(a) == NBD_REPLY_MAGIC, "answer magic %08x", be32(a));
        struct nbd_request *q = by_handle(r, a + 8);
        CHECK(q->waiting, "a second answer, or one to a request never sent, for handle %llu",
              (unsigned long long)(q - r->reqs));
        CHECK(r->stream_sent >= q->sent_at, "an answer to a request not yet sent");
        uint32_t error = be32(a + 4);
        uint32_t data = !error && q->command == NBD_CMD_READ && q->expect == EXPECT_OK_OR_EIO
                        ? q->length : 0;
        if (r->answers_len - at < NBD_REPLY_LEN + data)
            break;
        check_answer(r, q, error, a + NBD_REPLY_LEN);
        q->waiting = 0;
        at += NBD_REPLY_LEN + data;
        r->progress = 1;
    }
    memmove(r->answers, r->answers + at, r->answers_len - at);
    r->answers_len -= at;
}

static void kernel_read(struct run *r, uint32_t most)
{
    while (most) {
        uint32_t room = ANSWERS_MAX - r->answers_len;
        ssize_t n = recv(r->kernel, r->answers + r->answers_len, room < most ? room : most,
                         MSG_DONTWAIT);
        if (n <= 0)
            break;
        r->answers_len += (uint32_t)n;
        most -= (uint32_t)n;
        parse_answers(r);
    }
}

/* ---- the target behind the engine ----------------------------------------- */

/* A request frame as it must be: ours, a valid tag, inside the device, a
 * write's data its own write's for exactly these sectors.  Returns the
 * version of a write's data. */
NO_COVERAGE static uint64_t check_frame(struct run *r, const uint8_t *h, size_t len)
{
    const struct aoe_eng *e = r->e;
    CHECK(len >= ETH_ZLEN, "request frame of %zu bytes", len);
    CHECK(memcmp(h, MAC_TARGET, 6) == 0 && memcmp(h + 6, MAC_INITIATOR, 6) == 0 &&
          h[12] == 0x88 && h[13] == 0xA2 && h[14] == AOE_HVER && h[15] == 0 &&
          h[16] == 0 && h[17] == 3 && h[18] == 7 && h[19] == AOECMD_ATA, "request header");
    uint32_t tag = be32(h + 20);
    CHECK((tag & ENGINE_TAG) == ENGINE_TAG && !(__builtin_popcount(tag) & 1) &&
          (tag >> 16 & GEN_MAX) != 0 && tag_slot(tag) < e->max_frames, "request tag %08x", tag);
    CHECK(!(h[24] & AOEAFL_EXT) == !e->lba48, "aflags %02x", h[24]);
    uint64_t lba = header_lba(h);
    uint8_t count = h[26], cmd = h[27];
    if (cmd == ATA_CMD_FLUSH || cmd == ATA_CMD_FLUSH_EXT) {
        CHECK(count == 0 && !(h[24] & AOEAFL_WRITE) && len == ETH_ZLEN, "flush frame");
        return 0;
    }
    CHECK(count >= 1 && count <= e->sectors_per_frame, "frame of %u sectors", count);
    CHECK(lba < r->sectors && count <= r->sectors - lba, "frame of %u sectors at %llu past "
          "the device's end (%llu)", count, (unsigned long long)lba,
          (unsigned long long)r->sectors);
    if (!(h[24] & AOEAFL_WRITE)) {
        CHECK(cmd == (e->lba48 ? ATA_CMD_PIO_READ_EXT : ATA_CMD_PIO_READ) && len == ETH_ZLEN,
              "read frame");
        return 0;
    }
    CHECK(cmd == (e->lba48 ? ATA_CMD_PIO_WRITE_EXT : ATA_CMD_PIO_WRITE) &&
          len == ATA_HDR_LEN + (size_t)count * SECTOR_SIZE, "write frame");
    uint64_t version = 0;
    for (uint32_t i = 0; i < count; i++) {
        uint64_t v;
        CHECK(stamp_read(h + ATA_HDR_LEN + (size_t)i * SECTOR_SIZE, lba + i, &v) &&
              (i == 0 || v == version), "write frame at %llu: sector %u is not its write's",
              (unsigned long long)lba, i);
        version = v;
    }
    CHECK(version >= 1 && version <= (uint64_t)r->nreqs, "write data of version %llu",
          (unsigned long long)version);
    const struct nbd_request *q = &r->reqs[version - 1];
    CHECK(is_write(q) && q->written && q->offset / SECTOR_SIZE <= lba &&
          lba + count <= (q->offset + q->length) / SECTOR_SIZE,
          "write frame at %llu with the data of request %llu", (unsigned long long)lba,
          (unsigned long long)version - 1);
    return version;
}

/* What the engine sent, checked and held. */
static void target_receive(struct run *r)
{
    ssize_t n;
    while ((n = recv(r->sv[1], frame_buf, sizeof(frame_buf), MSG_DONTWAIT)) >= 0) {
        uint64_t version = check_frame(r, frame_buf, (size_t)n);
        if (r->nheld == HELD_MAX) {         /* lost */
            r->held_first = (r->held_first + 1) % HELD_MAX;
            r->nheld--;
        }
        struct held *f = &r->held[(r->held_first + r->nheld++) % HELD_MAX];
        memcpy(f->hdr, frame_buf, ATA_HDR_LEN);
        f->version = version;
    }
}

enum { SERVE_RIGHT, SERVE_ATA_ERROR, SERVE_AOE_ERROR, SERVE_LOST, SERVE_TWICE, SERVE_KEEP };

/* Answer one held frame; 0, or -1 when the engine's socket is full. */
static int serve(struct run *r, const struct held *f, int how, uint8_t err)
{
    uint8_t *a = frame_buf;
    const uint8_t *h = f->hdr;
    uint64_t lba = header_lba(h);
    uint8_t count = h[26];
    size_t len = ETH_ZLEN;
    if (how == SERVE_LOST)
        return 0;
    answer_header(a, h);
    memset(a + ATA_HDR_LEN, 0, ETH_ZLEN - ATA_HDR_LEN);
    if (how == SERVE_AOE_ERROR) {
        a[14] |= AOEFL_ERR;
        a[15] = 2;                          /* bad argument */
    } else if (how == SERVE_ATA_ERROR ||
               (h[27] == ATA_CMD_FLUSH_EXT && r->aborts_flush_ext)) {
        a[25] = how == SERVE_ATA_ERROR && err & 1 ? ATA_UNC : ATA_ABORTED;
        a[26] = count;
        a[27] = 0x40 | ATA_ERR;
    } else if (h[27] == ATA_CMD_FLUSH || h[27] == ATA_CMD_FLUSH_EXT) {
        r->flush_seq = ++r->seq;
    } else if (h[24] & AOEAFL_WRITE) {
        struct nbd_request *q = &r->reqs[f->version - 1];
        if (q->waiting) {                   /* (a late copy after the answer lands nowhere) */
            uint64_t first = q->offset / SECTOR_SIZE;
            r->seq++;
            for (uint32_t i = 0; i < count; i++) {
                r->disk[lba + i] = (uint32_t)f->version;
                if (!q->written[lba + i - first]) {
                    q->written[lba + i - first] = 1;
                    if (++q->nwritten == q->length / SECTOR_SIZE)
                        q->all_written_seq = r->seq;
                }
            }
        }
    } else {
        for (uint32_t i = 0; i < count; i++)
            stamp_sector(a + ATA_HDR_LEN + (size_t)i * SECTOR_SIZE, lba + i, r->disk[lba + i]);
        len = ATA_HDR_LEN + (size_t)count * SECTOR_SIZE;
    }
    for (int copies = how == SERVE_TWICE ? 2 : 1; copies > 0; copies--)
        if (send(r->sv[1], a, len, MSG_DONTWAIT) < 0)
            return -1;
    r->progress = 1;
    return 0;
}

/* Serve the held frames right, oldest (or newest) first, while the socket takes them. */
static void serve_all(struct run *r, int newest_first)
{
    target_receive(r);
    while (r->nheld) {
        uint32_t i = newest_first ? (r->held_first + r->nheld - 1) % HELD_MAX : r->held_first;
        if (serve(r, &r->held[i], SERVE_RIGHT, 0) < 0)
            return;
        if (!newest_first)
            r->held_first = (r->held_first + 1) % HELD_MAX;
        r->nheld--;
    }
}

static void serve_one(struct run *r, uint8_t which, uint8_t how)
{
    static const int hows[8] = { SERVE_RIGHT, SERVE_RIGHT, SERVE_RIGHT, SERVE_ATA_ERROR,
                                 SERVE_AOE_ERROR, SERVE_LOST, SERVE_TWICE, SERVE_KEEP };
    target_receive(r);
    if (!r->nheld)
        return;
    uint32_t k = which % r->nheld, i = (r->held_first + k) % HELD_MAX;
    int mode = hows[how % 8];
    serve(r, &r->held[i], mode == SERVE_KEEP ? SERVE_RIGHT : mode, how >> 3);
    if (mode == SERVE_KEEP)
        return;
    for (; k + 1 < r->nheld; k++)           /* out of the queue, the others in order */
        r->held[(r->held_first + k) % HELD_MAX] = r->held[(r->held_first + k + 1) % HELD_MAX];
    r->nheld--;
}

/* ---- aoe.py around the pump ----------------------------------------------- */

static void reply(struct run *r, uint32_t slot, int error)
{
    int rc = aoe_nbd_reply(r->e, slot, error);
    CHECK(rc == 0, "aoe_nbd_reply(%u, %d): %d", slot, error, rc);
}

/* Engine.submit under NbdBridged's id, or its AoeError answered EIO (_engine). */
static void engine_submit(struct run *r, uint32_t slot, int op, uint64_t lba, uint64_t count)
{
    struct aoe_eng *e = r->e;
    int refused = r->dead ||
                  (op != OP_FLUSH && (count == 0 || lba + count > r->sectors ||
                                      (!e->lba48 && lba + count > 0x0FFFFFFF)));
    if (refused || aoe_submit(e, nbd_request_id((unsigned)op, slot), op, lba, (uint32_t)count,
                              op == OP_FLUSH ? NULL : aoe_nbd_buf(e, slot)) < 0)
        reply(r, slot, EIO);
}

/* The request in a slot the bridge gave back: the script's own. */
NO_COVERAGE static struct nbd_request *slot_request(struct run *r, uint32_t slot)
{
    CHECK(slot < r->nslots, "slot %u of %u", slot, r->nslots);
    const struct nbd_slot *s = &nbd_of(r->e)->slots[slot];
    CHECK(s->state == NBD_SLOT_ENGINE || s->state == NBD_SLOT_HANDED, "slot %u in state %u",
          slot, s->state);
    struct nbd_request *q = by_handle(r, s->handle);
    CHECK(q->waiting && s->command == q->command && s->flags == q->flags &&
          s->offset == q->offset && s->length == q->length,
          "slot %u holds command %u at %llu+%u, the kernel sent %u at %llu+%u", slot, s->command,
          (unsigned long long)s->offset, s->length, q->command, (unsigned long long)q->offset,
          q->length);
    return q;
}

/* NbdBridged.completed: only failures come back. */
static void completed(struct run *r, uint64_t id, int32_t status)
{
    CHECK(id & NBD_ID && status != 0, "completion %llx status %d", (unsigned long long)id,
          status);
    uint32_t slot = (uint32_t)id;
    int op = (int)(id >> 32 & 0xFF);
    const struct nbd_request *q = slot_request(r, slot);
    CHECK(op == OP_FLUSH ? q->command == NBD_CMD_FLUSH || q->flags & NBD_CMD_FLAG_FUA
                         : op == (q->command == NBD_CMD_READ ? OP_READ : OP_WRITE),
          "op %d for command %u", op, q->command);
    if (op == OP_FLUSH && status == -(STATUS_ATA_ERROR | ATA_ABORTED) &&
        r->e->flush_cmd == ATA_CMD_FLUSH_EXT) {
        r->e->flush_cmd = ATA_CMD_FLUSH;    /* Engine.fall_back_flush, then again */
        engine_submit(r, slot, OP_FLUSH, 0, 0);
        return;
    }
    reply(r, slot, EIO);
}

/* NbdBridged._start: a request the bridge handed over. */
static void start(struct run *r, const struct nbd_req *h)
{
    const struct nbd_request *q = slot_request(r, h->slot);
    CHECK(h->command == q->command && h->flags == q->flags && h->offset == q->offset &&
          h->length == q->length, "handed command %u at %llu+%u", h->command,
          (unsigned long long)h->offset, h->length);
    int error = 0;
    if (r->dead)
        error = EIO;
    else if (h->command == NBD_CMD_FLUSH)
        error = 0;
    else if ((h->command != NBD_CMD_READ && h->command != NBD_CMD_WRITE) ||
             h->offset % SECTOR_SIZE || h->length % SECTOR_SIZE || !h->length)
        error = EINVAL;
    else if (h->command == NBD_CMD_WRITE && r->readonly)
        error = EPERM;
    if (error)
        reply(r, h->slot, error);
    else if (h->command == NBD_CMD_FLUSH)
        engine_submit(r, h->slot, OP_FLUSH, 0, 0);
    else
        engine_submit(r, h->slot, h->command == NBD_CMD_READ ? OP_READ : OP_WRITE,
                      h->offset / SECTOR_SIZE, h->length / SECTOR_SIZE);
}

/* Engine.poll's part after aoe_pump (expired frames resent), then the daemon's
 * serve(): completions, the target declared dead, intake. */
static void pump(struct run *r)
{
    struct aoe_eng *e = r->e;
    int rc = aoe_pump(e, 0, r->bridged);
    CHECK(rc >= 0 && rc == e->ndone, "aoe_pump returned %d with %d done", rc, e->ndone);
    CHECK((uint32_t)e->ndone <= e->max_frames && (uint32_t)e->nexpired <= e->max_frames &&
          (uint32_t)e->nfailed <= e->max_frames && (uint32_t)e->nhanded <= r->nslots,
          "%d done, %d expired, %d failed, %d handed", e->ndone, e->nexpired, e->nfailed,
          e->nhanded);
    if (e->ndone || e->nhanded)
        r->progress = 1;
    for (int i = e->nexpired; i-- > 0;)
        aoe_resend(e, e->expired[i]);
    /* done[] and nbd_handed[] change under aoe_nbd_reply and aoe_submit: copies */
    int ndone = e->ndone, nhanded = e->nhanded;
    struct aoe_event *done = malloc(sizeof(*done) * (size_t)(ndone + 1));
    struct nbd_req *handed = malloc(sizeof(*handed) * (size_t)(nhanded + 1));
    CHECK(done && handed, "out of memory");
    memcpy(done, e->done, sizeof(*done) * (size_t)ndone);
    memcpy(handed, e->nbd_handed, sizeof(*handed) * (size_t)nhanded);
    for (int i = 0; i < ndone; i++)
        completed(r, done[i].req_id, done[i].status);
    if (e->bridge_finished)
        r->ended = 1;                       /* the daemon lets go */
    else
        for (int i = 0; i < nhanded; i++)
            start(r, &handed[i]);
    free(done);
    free(handed);
}

/* Declared dead as Engine.poll does it after deadsecs (every request fails, the
 * daemon sets the backend down), or back up again. */
static void dead_or_alive(struct run *r)
{
    struct aoe_eng *e = r->e;
    if (r->dead) {
        r->dead = 0;
        e->bridge_on = 1;
        return;
    }
    int n = aoe_fail_all(e, -ETIMEDOUT);
    CHECK(n == e->ndone, "aoe_fail_all returned %d with %d done", n, e->ndone);
    r->dead = r->ever_dead = 1;
    int ndone = e->ndone;
    struct aoe_event *done = malloc(sizeof(*done) * (size_t)(ndone + 1));
    CHECK(done, "out of memory");
    memcpy(done, e->done, sizeof(*done) * (size_t)ndone);
    for (int i = 0; i < ndone; i++)
        completed(r, done[i].req_id, done[i].status);
    free(done);
    e->bridge_on = 0;
}

/* ---- invariants -------------------------------------------------------------- */

NO_COVERAGE static void check_bridge(struct run *r, int whole)
{
    struct aoe_eng *e = r->e;
    check_engine(e, r->seen, &r->mark, whole || e->max_frames <= 1024);
    const struct nbd_bridge *b = nbd_of(e);
    if (!b)
        return;
    uint32_t nfree = 0, nreply = 0, in_use = 0, reading = 0;
    for (uint32_t i = b->free_head; i != NONE; i = b->slots[i].next) {
        CHECK(i < b->nslots && nfree < b->nslots && b->slots[i].state == NBD_SLOT_FREE,
              "free list broken at %u", i);
        nfree++;
    }
    for (uint32_t i = 0; i < b->nslots; i++) {
        in_use += b->slots[i].state != NBD_SLOT_FREE;
        nreply += b->slots[i].state == NBD_SLOT_REPLY;
        reading += b->slots[i].state == NBD_SLOT_DATA;
    }
    CHECK(nfree + in_use == b->nslots, "%u free, %u in use, %u slots", nfree, in_use, b->nslots);
    CHECK(in_use == (uint32_t)e->nbd_open, "%u slots in use, nbd_open %d", in_use, e->nbd_open);
    CHECK(reading <= 1 && (reading == 0) == (b->reading == NONE) &&
          (b->reading == NONE || b->slots[b->reading].state == NBD_SLOT_DATA),
          "%u slots reading data, reading %u", reading, b->reading);
    uint32_t queued = 0, last = NONE;
    for (uint32_t i = b->out_head; i != NONE; i = b->slots[i].next) {
        CHECK(i < b->nslots && queued < b->nslots && b->slots[i].state == NBD_SLOT_REPLY,
              "answer queue broken at %u", i);
        last = i;
        queued++;
    }
    CHECK(queued == nreply && b->out_tail == last, "%u answers queued of %u, tail %u", queued,
          nreply, b->out_tail);
    uint32_t waiting = 0;
    for (int i = 0; i < r->nreqs; i++)
        waiting += r->reqs[i].waiting && r->stream_sent >= r->reqs[i].sent_at;
    CHECK((uint32_t)e->nbd_open <= waiting, "nbd_open %d with %u requests waiting", e->nbd_open,
          waiting);
}

/* ---- one input ------------------------------------------------------------ */

static int setup(struct run *r, struct script *in)
{
    static const int frames_of[8] = { 1024, 1024, 1024, 1024, 1024, 16, 256, 32768 };
    static const unsigned buf_sizes[4] = { 64 << 10, 128 << 10, 512 << 10, 4 << 10 };
    static const uint64_t sectors_of[4] = { 2048, 64, 65536, 8 };
    static const int windows[4] = { 64, 128, 255, 16 };
    int frames = frames_of[next_u8(in) % 8];
    uint16_t gen_seed = next_u16(in);
    uint8_t spf = next_u8(in), how = next_u8(in), slots = next_u8(in);
    unsigned buf_size = buf_sizes[next_u8(in) % 4];
    r->sectors = sectors_of[next_u8(in) % 4];
    r->readonly = how >> 1 & 1;
    r->aborts_flush_ext = how >> 4 & 1;
    r->rto_us = how & 32 ? 2000 : 250000;
    r->nslots = slots < 128 ? 64 : 1 + slots % 64;

    struct aoe_eng *e = r->e = aoe_eng_new(3, 7, frames, gen_seed);
    CHECK(e, "aoe_eng_new(%d) failed", frames);
    e->lba48 = !(how & 1);
    e->flush_cmd = e->lba48 ? ATA_CMD_FLUSH_EXT : ATA_CMD_FLUSH;
    e->sectors_per_frame = spf == 255 ? MAX_SPF : 1 + spf % 17;
    r->seen = calloc(e->max_frames, sizeof(*r->seen));
    r->disk = calloc(r->sectors, sizeof(*r->disk));
    CHECK(r->seen && r->disk, "out of memory");
    if (path_sockets(r->sv, how & 8 ? ATA_HDR_LEN + e->sectors_per_frame * SECTOR_SIZE : 0) < 0)
        return -1;
    int p = aoe_eng_add_path(e, r->sv[0], (const uint8_t *)MAC_INITIATOR,
                             (const uint8_t *)MAC_TARGET);
    CHECK(p == 0, "aoe_eng_add_path: %d", p);
    e->paths[0].maxout = windows[how >> 6];
    e->paths[0].rto_us = e->paths[0].reorder_us = r->rto_us;

    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
        return -1;
    r->kernel = sv[0];
    r->bridged = sv[1];
    if (how & 4) {
        int size = 1;                       /* the kernel makes it its smallest */
        for (int i = 0; i < 2; i++) {
            setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
            setsockopt(sv[i], SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
        }
    }
    int rc = aoe_nbd_bridge(e, r->bridged, (int)r->nslots, buf_size, r->sectors, r->readonly);
    CHECK(rc == 0, "aoe_nbd_bridge: %d", rc);
    return 0;
}

/* Everything sent and served right, until every request is answered; the
 * socket buffers grow back to their usual size, so that a window goes by per
 * round. */
static void drain(struct run *r)
{
    struct aoe_eng *e = r->e;
    if (r->dead)
        dead_or_alive(r);                   /* the target answers again */
    int fds[4] = { r->kernel, r->bridged, r->sv[0], r->sv[1] }, size = 1 << 20;
    for (int i = 0; i < 4; i++) {
        setsockopt(fds[i], SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
        setsockopt(fds[i], SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
    }
    for (int round = 0; round < DRAIN_ROUNDS && !r->ended; round++) {
        int waiting = 0;
        for (int i = 0; i < r->nreqs; i++)
            waiting += r->reqs[i].waiting && r->reqs[i].expect != EXPECT_NOTHING;
        if (!waiting && e->nbd_open == 0)
            return;
        r->progress = 0;
        kernel_send(r, UINT32_MAX);
        pump(r);
        serve_all(r, 0);
        kernel_read(r, UINT32_MAX);
        if (!r->progress)
            fuzz_now_us += r->rto_us + 1;   /* what was lost is resent */
    }
    CHECK(r->ended, "requests left unanswered after %d rounds", DRAIN_ROUNDS);
}

static void teardown(struct run *r)
{
    if (r->e) {
        if (nbd_of(r->e))
            aoe_nbd_bridge(r->e, -1, 0, 0, 0, 0);
        check_engine(r->e, r->seen, &r->mark, 1);
        CHECK(r->e->active_requests == 0, "%d requests left", r->e->active_requests);
        aoe_eng_free(r->e);
    }
    for (int i = 0; i < r->nreqs; i++)
        free(r->reqs[i].written);
    int fds[4] = { r->kernel, r->bridged, r->sv[0], r->sv[1] };
    for (int i = 0; i < 4; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    free(r->seen);
    free(r->disk);
    free(r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint32_t sends[8] = { 1, 7, 28, 100, 4096, 70000, UINT32_MAX, UINT32_MAX };
    static const uint32_t reads[4] = { 16, 100, 4096, UINT32_MAX };
    struct script in = { data, size };
    struct run *r = calloc(1, sizeof(*r));
    CHECK(r, "out of memory");
    r->kernel = r->bridged = r->sv[0] = r->sv[1] = -1;
    r->stream = stream_buf;
    r->answers = answers_buf;
    fuzz_now_us = 1000000000000;
    if (setup(r, &in) == 0) {
        for (int step = 0; step < MAX_STEPS && !script_done(&in) && !r->ended; step++) {
            uint8_t op = next_u8(&in) % 16;
            if (op <= 2) {
                queue_requests(r, &in);
            } else if (op <= 4) {
                kernel_send(r, sends[next_u8(&in) % 8]);
            } else if (op <= 6) {
                kernel_read(r, reads[next_u8(&in) % 4]);
            } else if (op <= 9) {
                pump(r);
            } else if (op <= 11) {
                serve_all(r, next_u8(&in) & 1);
            } else if (op == 12) {
                uint8_t which = next_u8(&in);
                serve_one(r, which, next_u8(&in));
            } else if (op == 13) {
                fuzz_now_us += next_u8(&in) & 1 ? r->rto_us + 1 : 1000;
            } else if (op == 14) {
                if (next_u8(&in) & 1)
                    dead_or_alive(r);
            } else {
                end_stream(r, next_u8(&in) % 4);
            }
            check_bridge(r, 0);
        }
        if (!r->stream_closed)
            drain(r);
        kernel_read(r, UINT32_MAX);
        check_bridge(r, 1);
    }
    teardown(r);
    return 0;
}
