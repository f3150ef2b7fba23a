/*
 * harness.h - what the fuzz targets share; include it after ../_aoeio.c.
 *
 * An input is read as a script through struct script (bytes past its end read
 * as zero, so every input is a complete script).  CHECK aborts with the broken
 * invariant, which libFuzzer reports as a crash.  A target that defines
 * clock_gettime as fuzz_clock_gettime before including ../_aoeio.c runs the
 * engine on fuzz_now_us, a clock only the script moves: no input depends on how
 * fast it runs, and a crash replays exactly.
 */

#include <stdarg.h>
#include <stddef.h>

/* Checking code is left out of the coverage the fuzzer steers by (not inlined
 * either, which would bring it back): only the helper's code should count, and
 * the checks run faster. */
#define NO_COVERAGE __attribute__((no_sanitize("coverage"), noinline, unused))

#define CHECK(cond, ...) \
    do { \
        if (!(cond)) \
            check_failed(__FILE__, __LINE__, #cond, __VA_ARGS__); \
    } while (0)

__attribute__((noreturn, format(printf, 4, 5)))
static void check_failed(const char *file, int line, const char *cond, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s:%d: invariant broken: %s: ", file, line, cond);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    abort();
}

/* ---- the input as a script ------------------------------------------------ */

struct script {
    const uint8_t *p;
    size_t left;
};

static inline int script_done(const struct script *in)
{
    return in->left == 0;
}

static inline uint8_t next_u8(struct script *in)
{
    if (!in->left)
        return 0;
    in->left--;
    return *in->p++;
}

static inline uint16_t next_u16(struct script *in)
{
    uint16_t hi = next_u8(in);
    return (uint16_t)(hi << 8 | next_u8(in));
}

static inline uint32_t next_u32(struct script *in)
{
    uint32_t hi = next_u16(in);
    return hi << 16 | next_u16(in);
}

/* ---- the clock ---------------------------------------------------------- */

static int64_t fuzz_now_us;

int fuzz_clock_gettime(clockid_t clock, struct timespec *ts)
{
    (void)clock;
    ts->tv_sec = fuzz_now_us / 1000000;
    ts->tv_nsec = fuzz_now_us % 1000000 * 1000;
    return 0;
}

/* ---- buffers with guard bytes --------------------------------------------- */

#define GUARD_LEN   64
#define GUARD_BYTE  0xA5

/* len bytes between two guards; the caller fills them. */
static inline uint8_t *guarded_alloc(size_t len)
{
    uint8_t *base = malloc(len + 2 * GUARD_LEN);
    CHECK(base, "out of memory for %zu bytes", len);
    memset(base, GUARD_BYTE, GUARD_LEN);
    memset(base + GUARD_LEN + len, GUARD_BYTE, GUARD_LEN);
    return base + GUARD_LEN;
}

NO_COVERAGE static void guarded_check(const uint8_t *buf, size_t len)
{
    for (size_t i = 0; i < GUARD_LEN; i++)
        CHECK(buf[-1 - (ptrdiff_t)i] == GUARD_BYTE && buf[len + i] == GUARD_BYTE,
              "a guard byte of a %zu-byte buffer was overwritten", len);
}

static inline void guarded_free(uint8_t *buf, size_t len)
{
    if (!buf)
        return;
    guarded_check(buf, len);
    free(buf - GUARD_LEN);
}

/* ---- sectors that say what they are ----------------------------------------- */
/*
 * A stamped sector names its LBA and a version (what wrote it) and is filled
 * from both, so a sector in the wrong place, from the wrong request or cut
 * short is recognised.
 */

NO_COVERAGE static uint64_t stamp_word(uint64_t lba, uint64_t version, unsigned i)
{
    uint64_t x = lba * 0x9E3779B97F4A7C15ull ^ version * 0xC2B2AE3D27D4EB4Full ^ i;
    x ^= x >> 29;
    return x * 0xBF58476D1CE4E5B9ull;
}

NO_COVERAGE static void stamp_sector(uint8_t *sector, uint64_t lba, uint64_t version)
{
    uint64_t w[SECTOR_SIZE / 8];
    w[0] = lba;
    w[1] = version;
    for (unsigned i = 2; i < SECTOR_SIZE / 8; i++)
        w[i] = stamp_word(lba, version, i);
    memcpy(sector, w, SECTOR_SIZE);
}

NO_COVERAGE static void stamp_sectors(uint8_t *buf, uint64_t lba, uint32_t count, uint64_t version)
{
    for (uint32_t i = 0; i < count; i++)
        stamp_sector(buf + (size_t)i * SECTOR_SIZE, lba + i, version);
}

/* Whether sector is a whole stamp for lba; its version in *version. */
NO_COVERAGE static int stamp_read(const uint8_t *sector, uint64_t lba, uint64_t *version)
{
    uint64_t w[SECTOR_SIZE / 8];
    memcpy(w, sector, SECTOR_SIZE);
    if (w[0] != lba)
        return 0;
    for (unsigned i = 2; i < SECTOR_SIZE / 8; i++)
        if (w[i] != stamp_word(lba, w[1], i))
            return 0;
    *version = w[1];
    return 1;
}

/* ---- a reproducible stream of numbers ------------------------------------- */

/* The next number of the xorshift32 sequence in *x (which must not be 0): for choices
 * and data an input seeds. */
static inline uint32_t xorshift32(uint32_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 17;
    *x ^= *x << 5;
    return *x;
}

/* ---- the far end of a path -------------------------------------------------- */

/* A datagram socketpair: [0] the engine's, [1] the target's, with buffers of
 * about `small` bytes (still taking one frame that long), or the default (0).
 * 0, or -1 (no socket). */
static inline int path_sockets(int sv[2], int small)
{
    if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
        return -1;
    if (small) {
        int size = small;                   /* the kernel doubles it, for its overhead */
        for (int i = 0; i < 2; i++) {
            setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
            setsockopt(sv[i], SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
        }
    }
    return 0;
}

/* The answer header to request frame req: addresses swapped, a response,
 * everything else echoed, count 0, status DRDY. */
static inline void answer_header(uint8_t *a, const uint8_t *req)
{
    memcpy(a, req + 6, 6);
    memcpy(a + 6, req, 6);
    memcpy(a + 12, req + 12, ATA_HDR_LEN - 12);
    a[14] = AOE_HVER | AOEFL_RSP;
    a[15] = 0;
    a[25] = 0;
    a[26] = 0;
    a[27] = 0x40;                           /* DRDY */
}

/* The LBA an ATA header carries, read as its own aflags say. */
static inline uint64_t header_lba(const uint8_t *h)
{
    return echoed_lba(h, h[24] & AOEAFL_EXT);
}

/* ---- the engine's bookkeeping ------------------------------------------- */

/* One list of slots walked from head: each in `state`, linked both ways (unless
 * `single`), not seen before, oldest first by last transmission if `by_time`;
 * returns its length.  seen[] marks the slots with `mark`. */
NO_COVERAGE static uint32_t walk_slots(const struct aoe_eng *e, uint32_t head, uint32_t tail, int state,
                           int single, int by_time, uint32_t *seen, uint32_t mark)
{
    uint32_t count = 0, prev = NONE;
    for (uint32_t s = head; s != NONE; s = e->frames[s].next) {
        const struct aoe_frame *f = &e->frames[s];
        CHECK(s < e->max_frames, "slot %u on a list of %u slots", s, e->max_frames);
        CHECK(seen[s] != mark, "slot %u twice on the lists (a cycle or two lists)", s);
        seen[s] = mark;
        CHECK(f->state == state, "slot %u in state %d on the list of state %d", s, f->state,
              state);
        CHECK(single || f->prev == prev, "slot %u links back to %u, not %u", s, f->prev, prev);
        CHECK(!by_time || prev == NONE || e->frames[prev].last.sent_us <= f->last.sent_us,
              "slot %u sent before slot %u ahead of it", s, prev);
        prev = s;
        count++;
    }
    CHECK(count == 0 || single || tail == prev, "list tail %u, last slot %u", tail, prev);
    CHECK(count != 0 || single || tail == NONE, "empty list with tail %u", tail);
    return count;
}

/*
 * Every slot on exactly one list (free, pending, a path's in flight) whose
 * length its counter holds, and every active request with as many frames on
 * the lists as it waits for.  seen[] (max_frames entries) carries marks from
 * one call to the next: *mark moves on.  With `whole` 0 the free list and the
 * requests (as long as the engine is big) are not walked, for speed.
 */
NO_COVERAGE static void check_engine(const struct aoe_eng *e, uint32_t *seen, uint32_t *mark, int whole)
{
    uint32_t m = ++*mark;
    uint32_t pending = walk_slots(e, e->pend_head, e->pend_tail, FRAME_PENDING, 0, 0, seen, m);
    CHECK(pending == (uint32_t)e->pending_frames, "%u slots pending, counted %d", pending,
          e->pending_frames);
    uint32_t flying = 0;
    for (int p = 0; p < MAX_PATHS; p++) {
        if (p >= e->npaths) {
            CHECK(e->fly_head[p] == NONE, "path %d of %d has frames in flight", p, e->npaths);
            continue;
        }
        uint32_t n = walk_slots(e, e->fly_head[p], e->fly_tail[p], FRAME_INFLIGHT, 0, 1, seen, m);
        for (uint32_t s = e->fly_head[p]; s != NONE; s = e->frames[s].next)
            CHECK(e->frames[s].path == p, "slot %u on path %d's list says path %d", s, p,
                  e->frames[s].path);
        CHECK(n == (uint32_t)e->paths[p].outstanding, "path %d: %u in flight, outstanding %d", p,
              n, e->paths[p].outstanding);
        flying += n;
    }
    CHECK(flying == (uint32_t)e->inflight_frames, "%u in flight, counted %d", flying,
          e->inflight_frames);
    CHECK(e->nfree_frames + pending + flying == e->max_frames, "%u free + %u pending + %u in "
          "flight of %u slots", e->nfree_frames, pending, flying, e->max_frames);
    CHECK(e->active_requests >= 0 && (uint32_t)e->active_requests <= e->max_frames,
          "%d active requests", e->active_requests);
    if (!whole)
        return;
    uint32_t nfree = walk_slots(e, e->free_frame, NONE, FRAME_FREE, 1, 0, seen, m);
    CHECK(nfree == e->nfree_frames, "%u slots free, counted %u", nfree, e->nfree_frames);
    uint32_t free_reqs = 0;
    for (uint32_t r = e->free_req; r != NONE; r = e->reqs[r].next_free) {
        CHECK(r < e->max_frames && free_reqs < e->max_frames, "request list broken at %u", r);
        free_reqs++;
    }
    CHECK(free_reqs + (uint32_t)e->active_requests == e->max_frames,
          "%u free requests + %d active of %u", free_reqs, e->active_requests, e->max_frames);
    uint32_t *frames_of = calloc(e->max_frames, sizeof(*frames_of));
    CHECK(frames_of, "out of memory");
    for (uint32_t s = 0; s < e->max_frames; s++)
        if (e->frames[s].state != FRAME_FREE) {
            CHECK(e->frames[s].req < e->max_frames, "slot %u of request %u", s, e->frames[s].req);
            frames_of[e->frames[s].req]++;
        }
    uint32_t busy = 0;
    for (uint32_t r = 0; r < e->max_frames; r++)
        if (frames_of[r]) {
            CHECK(frames_of[r] == e->reqs[r].frames_left, "request %u has %u frames, waits for "
                  "%u", r, frames_of[r], e->reqs[r].frames_left);
            busy++;
        }
    CHECK(busy == (uint32_t)e->active_requests, "%u requests with frames, %d active", busy,
          e->active_requests);
    free(frames_of);
}
