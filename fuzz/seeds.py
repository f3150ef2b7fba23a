#!/usr/bin/env python3
"""Seed inputs for the fuzz targets, written to fuzz/corpus/TARGET as seed-* (other files
there, past findings, stay).

An input is a script (the formats: the comments at the top of fuzz/pump.c and fuzz/nbd.c):
the harness builds the frames and the NBD stream from it, since an answer names the
transmission it answers by a tag known only once the engine has sent it.  The seeds play
what the test suite does: test_pumps_agree_and_take_only_true_answers' requests and hostile
answers, expiry and resends, several paths; nbd_requests' stream (reads, writes, flushes,
FUA writes, and some that must fail) cut anywhere, a target that answers, fails or goes
down, and the ways the stream ends; the frames test_serve_fast_path_answers_exactly_like_python
and the Fuzzer class send serve (reads and writes, EXT and LBA28, masked, reserved, past the
end, cut short, too long, among other commands); the requests a kernel posts on a ublk queue
(reads, writes, flushes, discards, past the end, empty, aborted) to a target that answers
them well, with errors, late or not at all."""

import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import aoe  # noqa: E402  (the constants the helper shares with aoe.py)


def u16(v):
    return struct.pack(">H", v)


def u32(v):
    return struct.pack(">I", v)


# --- pump -------------------------------------------------------------------------------

SUBMIT, PUMP, PATH, TIME, RESEND, FAIL, ANSWER, ANSWER_ALL = range(8)
# fuzz/pump.c's mutations of an answer (0 leaves it right)
(RIGHT, AOE_ERROR, ATA_ERROR, DEVICE_FAULT, TAG_BIT, GEN_ZERO, GEN_MAX, GEN_OTHER, SLOT_OTHER,
 NOT_ENGINE, SRC_MAC, DST_MAC, SHELF, SLOT, COMMAND, VERSION, NOT_RESPONSE, AFLAGS, LBA, COUNT,
 DATA_LENGTH, GARBAGE) = [0] + list(range(6, 27))
MAXOUT, RTO, REORDER, ENABLED = range(4)
T_RTO_0, T_LONG = 0, 4                          # fuzz/pump.c's times_us[] indices
STEP_1MS, STEP_PAST_RTO = 2, 3                  # ... and steps_us[]


def pump_setup(frames=64, gen_seed=7 << 1, lba48=True, small=False, sockets=1, paths=((0, 0, 8),),
               spf=2):
    """paths: (socket, target MAC, window) each; spf 255 is MAX_SPF."""
    how = (1 if lba48 else 0) | (4 if small else 0) | (8 if sockets == 2 else 0) | \
        (len(paths) - 1) << 4
    out = u16(frames - 1) + u16(gen_seed) + bytes([how, 255 if spf == 255 else spf - 1])
    for sock, mac, window in paths:
        out += bytes([sock | mac << 1 | (window - 1) << 3])
    return out


def submit(op, nsect, lba):
    where = 0 if lba < 1 << 16 else 2               # fuzz/pump.c: the low 16 bits, or 32
    return bytes([SUBMIT, op]) + u16(nsect if nsect < 64 else 0x8000 | nsect) + bytes([where]) + \
        u32(lba)


def answer(which, mutation=RIGHT, x=0, copies=1, other_socket=False, garbage=b""):
    return bytes([ANSWER, which, mutation, x, copies - 1 | (4 if other_socket else 0)]) + garbage


def pump_seeds():
    R, W, F = aoe.OP_READ, aoe.OP_WRITE, aoe.OP_FLUSH
    requests = submit(R, 8, 100) + submit(R, 4, 200) + submit(W, 4, 300) + submit(F, 0, 0)
    # a stray answer from another initiator's exchange, cut to what a garbage answer carries
    stray = aoe.pack_ata(b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x01\x01", 3, 7,
                         0xC0001235, aoe.AtaFields(aoe.AOEAFL_EXT, 0, 0, aoe.ATA_DRDY, 100,
                                                   bytes(512)), aoe.AOEFL_RSP)[:61]
    hostile = b"".join(answer(7, m, x) for m, x in (
        (TAG_BIT, 17), (GEN_OTHER, 0x81), (SRC_MAC, 3), (DATA_LENGTH, 3), (SLOT_OTHER, 1),
        (LBA, 2), (COUNT, 3), (AFLAGS, 1), (SHELF, 1), (NOT_RESPONSE, 0), (GEN_MAX, 0),
        (NOT_ENGINE, 0), (COMMAND, 1), (VERSION, 2))) + answer(7, GARBAGE, 30, garbage=stray)
    yield "answers", pump_setup() + requests + bytes([PUMP]) + bytes([ANSWER_ALL, 0, PUMP])
    yield "hostile", (pump_setup() + requests + bytes([PUMP]) + hostile + bytes([PUMP])
                      + answer(0) + answer(1) + answer(3, copies=2) + bytes([PUMP]))
    # unanswered frames expire, are resent in reverse order as Engine does, then the first
    # transmission (spurious), the resend (needed) and a late one answer
    yield "resend", (pump_setup() + requests + bytes([PUMP, ANSWER_ALL, 1, PUMP])
                     + bytes([PATH, 0, RTO, T_RTO_0, TIME, STEP_1MS, PUMP, RESEND, 0,
                              PATH, 0, RTO, T_LONG, PUMP])
                     + answer(0) + answer(2) + answer(1, ATA_ERROR, 4) + bytes([PUMP])
                     + answer(5) + bytes([PUMP]))
    yield "reorder", (pump_setup(paths=((0, 0, 16),)) + submit(R, 32, 1000) + bytes([PUMP])
                      + answer(3) + bytes([PATH, 0, REORDER, T_RTO_0, TIME, STEP_1MS, PUMP,
                                           RESEND, 1, PUMP, ANSWER_ALL, 1, PUMP]))
    yield "paths", (pump_setup(sockets=2, paths=((0, 0, 4), (0, 1, 4), (1, 0, 4)))
                    + submit(R, 40, 5000) + submit(W, 12, 6000) + bytes([PUMP])
                    + answer(0, other_socket=True) + answer(2, SRC_MAC, 1)
                    + bytes([PATH, 1, ENABLED, 0, ANSWER_ALL, 0, PUMP, PUMP]))
    yield "fail-all", (pump_setup(frames=16) + submit(R, 20, 10) + submit(W, 64, 0)
                       + bytes([PUMP, FAIL]) + answer(0) + answer(1) + bytes([PUMP])
                       + submit(F, 0, 0) + bytes([PUMP, ANSWER_ALL, 0, PUMP]))
    yield "lba28-jumbo", (pump_setup(lba48=False, spf=255, small=True)
                          + submit(R, 300, (1 << 28) - 300) + submit(W, 255, 7)
                          + submit(R, 1, 1 << 28) + bytes([PUMP, ANSWER_ALL, 0, PUMP])
                          + answer(0, DATA_LENGTH, 9) + bytes([PUMP, ANSWER_ALL, 0, PUMP]))
    yield "errors", (pump_setup(spf=1) + submit(R, 3, 40) + submit(W, 3, 80) + bytes([PUMP])
                     + answer(0, AOE_ERROR, 3) + answer(1, DEVICE_FAULT) + answer(2, ATA_ERROR, 0x40)
                     + bytes([ANSWER_ALL, 0, PUMP]))


# --- nbd --------------------------------------------------------------------------------

QUEUE, SEND, READ, PUMP_NBD, SERVE_ALL, SERVE_ONE, TIME_NBD, DEAD, END = \
    0, 3, 5, 7, 10, 12, 13, 14, 15
# fuzz/nbd.c's queue_requests: command and shape bytes
C_READ, C_WRITE, C_FUA_WRITE, C_FLUSH, C_TRIM = 0, 6, 9, 11, 13
S_INSIDE, S_EMPTY, S_UNALIGNED, S_UNALIGNED_LENGTH, S_PAST_END, S_HUGE, S_HUGE_OFFSET = \
    0, 10, 11, 12, 13, 14, 15
SEND_ALL, SEND_CUTS = 6, (0, 1, 2, 3, 4, 5)     # sends[]: 1, 7, 28, 100, 4096, 70000 bytes
READ_ALL = 3
FRAMES = {1024: 0, 16: 5, 256: 6, aoe.MAX_FRAMES: 7}
WINDOWS = {64: 0, 128: 1, 255: 2, 16: 3}
BUF_SIZES = {64 << 10: 0, 128 << 10: 1, 512 << 10: 2, 4 << 10: 3}
SECTORS = {2048: 0, 64: 1, 65536: 2, 8: 3}


def nbd_setup(frames=1024, spf=2, lba48=True, readonly=False, small_stream=False,
              small_frames=False, aborts_flush_ext=False, short_rto=False, window=16,
              slots=aoe.NBD_MAX_READ, buf_size=aoe.MIN_REQUEST * 512, sectors=2048):
    how = (0 if lba48 else 1) | (2 if readonly else 0) | (4 if small_stream else 0) | \
        (8 if small_frames else 0) | (16 if aborts_flush_ext else 0) | (32 if short_rto else 0) | \
        WINDOWS[window] << 6
    return (bytes([FRAMES[frames]]) + u16(7) + bytes([spf - 1, how])
            + bytes([0 if slots == aoe.NBD_MAX_READ else 128 + slots - 1,
                     BUF_SIZES[buf_size], SECTORS[sectors]]))


def queue(command, shape=S_INSIDE, sector=0, size=0, count=1):
    """count requests back to back; size picks the sectors each (1 + size % 8 below 128)."""
    n = count - 1 if count <= 8 else 192 + count - 1
    return bytes([QUEUE, n, command, shape]) + u16(sector) + bytes([size])


def rounds(n, cut=SEND_ALL):
    return bytes([SEND, cut, PUMP_NBD, SERVE_ALL, 0, PUMP_NBD, READ, READ_ALL]) * n


def nbd_seeds():
    mix = (queue(C_READ, sector=3, size=2, count=4) + queue(C_WRITE, sector=40, size=7)
           + queue(C_FLUSH) + queue(C_FUA_WRITE, sector=100, size=130)
           + queue(C_READ, sector=36, size=5, count=3) + queue(C_READ, sector=2000, size=200))
    yield "stream", nbd_setup() + mix + rounds(6)
    yield "cuts", nbd_setup(small_stream=True) + mix + b"".join(
        bytes([SEND, cut, PUMP_NBD, SERVE_ALL, 1, PUMP_NBD, READ, cut % 4]) for cut in SEND_CUTS)
    yield "refused", (nbd_setup(readonly=True) + queue(C_READ, S_UNALIGNED, 5)
                      + queue(C_WRITE, sector=9) + queue(C_TRIM, sector=1)
                      + queue(C_READ, S_PAST_END, size=3) + queue(C_READ, S_EMPTY)
                      + queue(C_READ, S_UNALIGNED_LENGTH, 7, 1) + queue(C_READ, S_HUGE_OFFSET, 2)
                      + queue(C_READ, S_HUGE, size=2) + rounds(3))
    yield "fua-fallback", (nbd_setup(aborts_flush_ext=True, spf=17, window=64)
                           + queue(C_FUA_WRITE, sector=10, size=150) + queue(C_FLUSH)
                           + queue(C_READ, sector=10, size=150) + rounds(5))
    yield "target-errors", (nbd_setup(spf=8) + queue(C_READ, sector=0, size=20, count=3)
                            + queue(C_WRITE, sector=500, size=40) + bytes([SEND, SEND_ALL, PUMP_NBD])
                            + bytes([SERVE_ONE, 0, 3, SERVE_ONE, 1, 4, SERVE_ONE, 0, 5,
                                     SERVE_ONE, 2, 6, SERVE_ONE, 0, 7])
                            + rounds(1) + bytes([TIME_NBD, 1]) + rounds(3))
    yield "down", (nbd_setup() + queue(C_READ, sector=64, size=9, count=5) + bytes([SEND, SEND_ALL,
                                                                                  PUMP_NBD])
                   + bytes([DEAD, 1]) + rounds(1) + queue(C_WRITE, sector=1, size=3)
                   + rounds(1) + bytes([DEAD, 1]) + queue(C_READ, sector=1, size=3) + rounds(3))
    yield "big-requests", (nbd_setup(buf_size=4 << 10, spf=17, window=128, sectors=65536)
                           + queue(C_WRITE, sector=1000, size=200) + queue(C_READ, sector=1000,
                                                                             size=200)
                           + queue(C_READ, S_HUGE, 3, 1) + rounds(8, cut=4))
    yield "full-engine", (nbd_setup(frames=16, spf=1, window=16, small_frames=True)
                          + queue(C_READ, sector=0, size=140, count=2)
                          + queue(C_WRITE, sector=300, size=3, count=4) + rounds(4)
                          + bytes([TIME_NBD, 1]) + rounds(4))
    yield "lba28-short-rto", (nbd_setup(lba48=False, short_rto=True, frames=aoe.MAX_FRAMES,
                                        sectors=64)
                              + queue(C_READ, sector=60, size=2) + queue(C_WRITE, sector=0, size=63)
                              + bytes([SEND, SEND_ALL, PUMP_NBD, TIME_NBD, 1, PUMP_NBD])
                              + rounds(2))
    for end, name in ((0, "disc"), (1, "no-magic"), (2, "shutdown")):
        yield "end-" + name, (nbd_setup(sectors=64) + queue(C_READ, sector=1, size=4, count=3)
                              + rounds(1) + bytes([END, end]) + rounds(2))


# --- serve ------------------------------------------------------------------------------

CMD_READ, CMD_READ_EXT, CMD_WRITE, CMD_WRITE_EXT = range(4)   # fuzz/serve.c's command index
# fuzz/serve.c's mutate()
(M_OTHER_SHELF, M_OTHER_SLOT, M_ANY_SHELF, M_ANY_SLOT, M_BROADCAST, M_VERSION, M_RESPONSE,
 M_ERROR_FLAG, M_OTHER_COMMAND, M_CUT, M_OVERSIZE, M_NOT_AOE, M_UNLISTED, M_DST_BROADCAST,
 M_FRAME_MAX, M_HEADER_CUT) = range(16)


def serve_setup(jumbo=False, readonly=False, masks=None, reserved=None, scnt=None, shelf=3,
                slot=7, base=8, sectors=400, cut=None):
    """masks, reserved: a bit per initiator; cut: the file ends cut * 67 bytes before the
    export does."""
    how = (1 if jumbo else 0) | (2 if readonly else 0) | (4 if masks is not None else 0) | \
        (8 if reserved is not None else 0) | (16 if cut is not None else 0)
    return bytes([how, 0 if scnt is None else 0x80 | scnt]) + u16(shelf) + \
        bytes([slot, 1]) + u16(base) + u16(sectors) + bytes([masks or 0, reserved or 0, cut or 0])


def ata(cmd, lba, count, initiator=2, mutation=None, x=0, lba_mode=0, aflags_xor=0,
        data=None, seed=0):
    """An ATA request; lba_mode 0 takes lba modulo the export's sectors + 1; data (if
    given) sets the data's length to data * 61 bytes."""
    b3 = lba_mode | (0 if mutation is None else (32 + mutation) << 2)
    b11 = initiator | 8 | (0 if data is None else 0x80)
    return (bytes([0, cmd, aflags_xor, count, b3]) + (lba % (1 << 48)).to_bytes(6, "little")
            + bytes([x, b11, seed if data is None else data]))


def raw_frame(frame):
    return bytes([2]) + u16(len(frame)) + frame


def batch_end(masks=None, reserved=None):
    """Pump the batch; then new lists if given."""
    if masks is None and reserved is None:
        return bytes([3])
    return bytes([7, masks or 0, reserved or 0])


def request_header(command, shelf=3, slot=7, verflags=0x10):
    return (b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x01\x02" + b"\x88\xa2"
            + bytes([verflags, 0]) + u16(shelf) + bytes([slot, command]) + u32(0x11223344))


def serve_seeds():
    R, RX, W, WX = CMD_READ, CMD_READ_EXT, CMD_WRITE, CMD_WRITE_EXT
    # test_serve_fast_path_batches_like_python's batch: runs of reads, reads of what was
    # just written, before and after a write, empty requests
    yield "read-write", serve_setup() + b"".join([
        ata(RX, 0, 2), ata(RX, 2, 2), ata(R, 4, 1), ata(WX, 10, 2, seed=1), ata(W, 12, 2, seed=2),
        ata(RX, 10, 2), ata(R, 11, 1), batch_end(), ata(WX, 100, 2, seed=3), ata(RX, 100, 2),
        ata(RX, 399, 1), ata(RX, 0, 0), ata(WX, 5, 0), batch_end()])
    yield "jumbo", serve_setup(jumbo=True, sectors=500) + b"".join([
        ata(WX, 0, 17, seed=4), ata(RX, 0, 17), ata(W, 17, 17, seed=5), ata(R, 8, 17),
        ata(RX, 483, 17), ata(RX, 484, 17), batch_end()])
    # past the end (IDNF), more than scnt, LBA28 with junk in the high nibble, LBA48 bits
    # in an LBA28 command
    yield "bounds", serve_setup(sectors=300) + b"".join([
        ata(RX, 299, 2), ata(RX, 300, 1), ata(WX, 299, 2, seed=6), ata(RX, 0, 3), ata(WX, 0, 3),
        ata(R, 5, 1, lba_mode=3), ata(W, 7, 2, lba_mode=3, seed=7),
        ata(RX, (1 << 28) + 5, 1, lba_mode=2),
        ata(R, (1 << 28) + 5, 1, lba_mode=2, aflags_xor=0x40), batch_end()])
    yield "readonly", serve_setup(readonly=True) + b"".join([
        ata(WX, 1, 2, seed=8), ata(RX, 1, 2), ata(W, 3, 1, seed=9), batch_end()])
    # writes without all their data, a read with some: aoe.py's
    yield "short-data", serve_setup() + b"".join([
        ata(WX, 20, 2, data=10), ata(WX, 20, 1, data=9), ata(RX, 20, 2, data=30), batch_end()])
    # every mutation once, each followed by a good request
    yield "mutations", serve_setup() + b"".join(
        ata(WX, 30 + m, 1, mutation=m, x=(0x21 * m + 1) % 256, seed=m) + ata(RX, 30 + m, 1)
        for m in range(16)) + batch_end()
    yield "mutations-jumbo", serve_setup(jumbo=True) + b"".join(
        ata(WX, 30 + m, 9, mutation=m, x=(0x33 * m + 5) % 256, seed=m) for m in range(16))
    # test_serve_fast_path_answers_exactly_like_python's lists: masked, reserved, changed
    yield "lists", serve_setup(masks=0b0110, reserved=0b0100) + b"".join([
        ata(WX, 42, 1, initiator=3, seed=12), ata(RX, 40, 1, mutation=M_UNLISTED),
        ata(WX, 41, 1, initiator=2, seed=11), ata(WX, 40, 1, initiator=1, seed=10),
        batch_end(masks=0, reserved=0b0010), ata(WX, 43, 1, initiator=1, seed=13),
        ata(RX, 43, 1, initiator=1), ata(RX, 43, 1, initiator=3), batch_end()])
    # frames for aoe.py (Query Config, IDENTIFY) inside a batch: the rest goes there too,
    # but for a frame too long for its slot
    query_config = request_header(aoe.AOECMD_CFG) + bytes(8)
    identify = request_header(aoe.AOECMD_ATA) + bytes([0, 0, 1, aoe.ATA_CMD_ID_ATA]) + bytes(8)
    yield "slow-in-batch", serve_setup() + b"".join([
        ata(RX, 50, 1), raw_frame(query_config), ata(WX, 50, 1, seed=14),
        ata(RX, 60, 2, mutation=M_OVERSIZE, x=9), raw_frame(identify), batch_end(),
        ata(RX, 50, 1), ata(RX, 0, 1, mutation=M_ANY_SHELF), batch_end()])
    # other targets' frames, and not version 1, short, broadcast
    yield "others", serve_setup(shelf=0x1234, slot=0x56) + b"".join([
        ata(RX, 1, 1, mutation=M_OTHER_SHELF), ata(RX, 1, 1, mutation=M_OTHER_SLOT),
        raw_frame(request_header(0, verflags=0x18)), raw_frame(bytes(23)), ata(RX, 1, 1),
        ata(RX, 1, 1, mutation=M_BROADCAST), ata(RX, 1, 1, mutation=M_ANY_SLOT),
        raw_frame(request_header(0, shelf=0x1234, slot=0x56)), batch_end()])
    yield "small-scnt", serve_setup(jumbo=True, scnt=3) + b"".join([
        ata(RX, 0, 3), ata(RX, 0, 4), ata(WX, 8, 3, seed=15), batch_end()])
    # the file shorter than the export (it shrank under serve): reads past its end fail (UNC),
    # a run of reads only where it passes the end; writes there grow it
    yield "file-cut", serve_setup(sectors=200, cut=140) + b"".join([
        ata(RX, 174, 2), ata(RX, 176, 2), ata(RX, 178, 2), ata(RX, 180, 2), ata(RX, 182, 2),
        ata(WX, 190, 2, seed=17), ata(RX, 188, 2), ata(RX, 190, 2), batch_end(),
        ata(WX, 175, 2, seed=18), ata(RX, 174, 2), batch_end()])
    yield "empty-export", serve_setup(sectors=0) + b"".join([
        ata(RX, 0, 0), ata(RX, 0, 1), ata(WX, 0, 1, seed=16), batch_end()])


# --- ublk -------------------------------------------------------------------------------

U_READ, U_WRITE, U_FLUSH, U_DISCARD, U_WRITE_ZEROES = 0, 2, 4, 5, 6   # fuzz/ublk.c's op index
NEAR_START, NEAR_END, PAST_END, ANYWHERE = range(4)
END_ABORT, END_EIO, END_NEED_DATA, STRAY = 12, 13, 14, 15     # CQEs other than a request
POST, ANSWER_HELD, U_PUMP, U_TIME, U_FAIL, ADMIT_RESIZE, REPLAY = 0, 2, 3, 4, 5, 6, 7


def ublk_setup(depth=4, spf=2, readonly=False, lba28=False, ring_fd=True, down=False, paths=1,
               other_flush=False, small_engine=None, maxout=8, max_sectors=16, size_mode=0,
               size=2048, gen_seed=0x1234, rto_ms=10):
    how = (1 if readonly else 0) | (2 if lba28 else 0) | (4 if ring_fd else 0) | \
        (8 if down else 0) | (paths - 1) << 4 | (0x40 if other_flush else 0) | \
        (0x80 if small_engine is not None else 0)
    return (bytes([depth - 1, spf - 1, how, maxout - 1, (small_engine or 1) - 1, max_sectors - 1,
                   size_mode]) + u16(size) + u16(gen_seed) + bytes([rto_ms - 1]))


def post(op, v, length=1, tag=0, where=NEAR_START, fua=False, end=0, special=False,
         raw_op=None):
    """A request (or another CQE: end) on the first waiting tag from tag on; v and where
    place it (fuzz/ublk.c), length sectors."""
    opsel = 7 | raw_op << 3 if raw_op is not None else op
    return (bytes([POST, tag, opsel, (1 if fua else 0) | end << 4, where | (16 if special else 0)])
            + u32(v) + bytes([max(0, length - 1)]))


def answer_held(n=0, chaos=0, seed=0, newest_first=False):
    return bytes([ANSWER_HELD, n | (0x80 if newest_first else 0), chaos, seed])


def later(ms=0):
    """The clock moves ms (0: past the rto), then a pump."""
    return bytes([U_TIME, ms])


def resize(sectors):
    return bytes([ADMIT_RESIZE, sectors // 33 << 1])


ADMIT = bytes([ADMIT_RESIZE, 1])
ROUND_TRIP = bytes([U_PUMP]) + answer_held() + bytes([U_PUMP])


def ublk_seeds():
    P, F = bytes([U_PUMP]), bytes([U_FAIL])
    yield "read-write-flush", ublk_setup() + b"".join([
        post(U_READ, 10, 8), post(U_WRITE, 100, 16, tag=1), post(U_FLUSH, 0, tag=2),
        post(U_WRITE, 40, 3, tag=3, fua=True)]) + ROUND_TRIP + post(U_READ, 100, 16) + ROUND_TRIP
    yield "jumbo-deep", ublk_setup(depth=16, spf=17, max_sectors=64, maxout=16) + b"".join(
        post(U_WRITE if t % 3 == 0 else U_READ, 64 * t, 64, tag=t) for t in range(16)) + \
        ROUND_TRIP * 2
    # a lossy target: errors, drops, duplicates, junk; expiry and resends; old answers again
    yield "lossy", ublk_setup(depth=8, rto_ms=5) + b"".join(
        post(U_WRITE if t & 1 else U_READ, 20 * t, 12, tag=t) for t in range(8)) + \
        P + answer_held(0, 0x0F, 1) + P + later(3) + answer_held(0, 0x0F, 2, True) + later() + \
        answer_held(0, 0x0F, 3) + later() + answer_held() + P + bytes([REPLAY, 0, REPLAY, 3]) + P
    yield "reorder", ublk_setup(depth=4, maxout=16, rto_ms=20) + b"".join(
        post(U_READ, 16 * t, 16, tag=t) for t in range(4)) + P + \
        answer_held(3, newest_first=True) + P + later(12) + answer_held() + P
    # the engine gives up with requests in flight, and takes new ones after
    yield "fail-all", ublk_setup() + post(U_WRITE, 5, 9) + post(U_READ, 50, 4, tag=1) + P + \
        answer_held(1) + F + post(U_READ, 5, 9) + ROUND_TRIP
    # requests the bridge hands to aoe.py: past the end, empty, DISCARD (huge), other ops
    yield "handed", ublk_setup(size=300) + b"".join([
        post(U_READ, 5, 10, where=NEAR_END), post(U_WRITE, 0, 0, special=True, tag=1),
        post(U_DISCARD, 7, 200, special=True, tag=2), post(0, 0, raw_op=4, tag=3)]) + \
        ROUND_TRIP + post(U_WRITE_ZEROES, 1, 8) + post(U_READ, 0, 4, where=PAST_END, tag=1) + \
        post(U_READ, 0, 4, where=PAST_END | 4, tag=2) + ROUND_TRIP
    yield "readonly", ublk_setup(readonly=True) + post(U_WRITE, 1, 4) + \
        post(U_READ, 1, 4, tag=1) + post(U_FLUSH, 0, tag=2) + ROUND_TRIP
    # the target goes down and comes back
    yield "down-up", ublk_setup(down=True) + post(U_READ, 1, 4) + post(U_FLUSH, 0, tag=1) + \
        ROUND_TRIP + ADMIT + post(U_WRITE, 1, 4, tag=2) + ROUND_TRIP + ADMIT + P
    # the device shrinks under a request in flight, then grows
    yield "resize", ublk_setup(size=1000) + post(U_WRITE, 900, 16) + P + resize(660) + \
        post(U_READ, 650, 16, tag=1) + post(U_READ, 600, 16, tag=2) + ROUND_TRIP + \
        resize(2000) + post(U_READ, 900, 16, tag=1) + ROUND_TRIP
    # an LBA28 target on a device of 2^28 + 952 sectors: requests below 2^28, up to it,
    # across it; a device of 2^40 sectors
    yield "lba28", ublk_setup(lba28=True, size_mode=2, size=3000) + b"".join([
        post(U_READ, 3000, 16, where=NEAR_END), post(U_WRITE, 968, 16, where=NEAR_END, tag=1),
        post(U_WRITE, 960, 16, where=NEAR_END, tag=2), post(U_FLUSH, 0, tag=3)]) + ROUND_TRIP
    yield "huge", ublk_setup(size_mode=3, size=77) + post(U_READ, 100, 16, where=NEAR_END) + \
        post(U_WRITE, 1 << 30, 16, where=ANYWHERE, tag=1) + ROUND_TRIP
    # tags aborted (the device stops), a failed fetch, stray CQEs
    yield "abort", ublk_setup(depth=3) + post(U_READ, 1, 2) + P + \
        post(0, 0, tag=1, end=END_ABORT) + post(0, 0, tag=2, end=END_EIO) + \
        post(0, 0, tag=1, end=STRAY) + answer_held() + P + P + post(U_READ, 1, 2) + ROUND_TRIP
    yield "all-aborted", ublk_setup(depth=2) + post(0, 0, end=END_ABORT) + \
        post(0, 0, tag=1, end=END_NEED_DATA) + post(0, 0, end=STRAY) + P + P
    # an engine too small for the requests: the bridge hands them over
    yield "small-engine", ublk_setup(depth=6, small_engine=12, spf=1) + b"".join(
        post(U_READ, 8 * t, 8 if t & 1 else 4, tag=t) for t in range(6)) + ROUND_TRIP + \
        post(U_FLUSH, 0) + ROUND_TRIP * 2
    yield "paths", ublk_setup(depth=8, paths=3, maxout=2) + b"".join(
        post(U_WRITE if t < 4 else U_READ, 30 * t, 16, tag=t) for t in range(8)) + \
        P + answer_held(0, 0x07, 5) + later() + answer_held() + P
    yield "no-ring-fd", ublk_setup(ring_fd=False, other_flush=True) + post(U_FLUSH, 0) + \
        post(U_READ, 3, 3, tag=1) + ROUND_TRIP


def write(kind, seeds):
    folder = os.path.join(HERE, "corpus", kind)
    os.makedirs(folder, exist_ok=True)
    for name, data in seeds:
        with open(os.path.join(folder, "seed-" + name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    write("pump", pump_seeds())
    write("nbd", nbd_seeds())
    write("serve", serve_seeds())
    write("ublk", ublk_seeds())
