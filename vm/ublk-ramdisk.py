"""A RAM-backed ublk device, for vm/ublk-check.sh: _aoeio's ublk plumbing on its
own (reap and commit from Python, no frame engine), with a file in /dev/shm
instead of a target.

Usage: PYTHON vm/ublk-ramdisk.py SIZE_MIB
Prints "READY <dev_id>" once /dev/ublkb<dev_id> is usable.  SIGTERM or SIGINT:
STOP_DEV, serve until every command came back, close the queue, DEL_DEV.
One thread serves the queue; START_DEV and STOP_DEV need it served while they
run, so they are submitted without waiting and polled together with the queue.
"""

import errno
import mmap
import os
import select
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import aoe  # noqa: E402

from aoe import (UBLK_IO_OP_READ as OP_READ, UBLK_IO_OP_WRITE as OP_WRITE,  # noqa: E402
                 UBLK_IO_OP_FLUSH as OP_FLUSH, UBLK_IO_OP_DISCARD as OP_DISCARD,
                 UBLK_IO_OP_WRITE_ZEROES as OP_WRITE_ZEROES, UBLK_CMD_DEL_DEV as CMD_DEL_DEV,
                 UBLK_CMD_START_DEV as CMD_START_DEV, UBLK_CMD_STOP_DEV as CMD_STOP_DEV,
                 UBLK_ATTR_VOLATILE_CACHE as ATTR_VOLATILE_CACHE)
DEPTH = 64
BUF = 512 * 1024                    # largest request, bytes


def check(ret, what):
    if ret < 0:
        raise OSError(-ret, "%s: %s" % (what, os.strerror(-ret)))
    return ret


class RamDisk:
    """One queue of one device, its requests answered from a mapped file."""

    def __init__(self, ffi, lib, dev_id, store):
        self.ffi, self.lib, self.store = ffi, lib, store
        qp = ffi.new("struct ublk_queue **")
        for _ in range(100):                    # /dev/ublkcN appears a little after ADD_DEV
            ret = lib.ublk_queue_open(qp, dev_id, 0, DEPTH, BUF)
            if ret != -errno.ENOENT:
                break
            time.sleep(0.02)
        check(ret, "open /dev/ublkc%d" % dev_id)
        self.q = qp[0]
        self.base = ffi.from_buffer(store)
        self.zeros = memoryview(bytes(BUF))
        self.reqs = ffi.new("struct ublk_req[]", DEPTH)
        self.tags = ffi.new("uint16_t[]", DEPTH)
        self.results = ffi.new("int32_t[]", DEPTH)
        self.poll = select.poll()
        self.poll.register(lib.ublk_queue_ring_fd(self.q), select.POLLIN)

    def answer(self, r):
        """Bytes done, or -errno."""
        if r.op == OP_FLUSH:                    # before the bounds check: its start_sector is garbage
            return 0
        off, length = r.start_sector << 9, r.nr_sectors << 9
        if off + length > len(self.store):
            return -errno.EIO
        if r.op == OP_READ:
            self.ffi.memmove(self.ffi.cast("char *", r.addr), self.base + off, length)
        elif r.op == OP_WRITE:
            self.ffi.memmove(self.base + off, self.ffi.cast("char *", r.addr), length)
        elif r.op in (OP_DISCARD, OP_WRITE_ZEROES):
            self.store[off:off + length] = self.zeros[:length]
        else:
            return -errno.EOPNOTSUPP
        return length

    def serve(self, timeout_ms):
        """Answer what has arrived, else wait up to timeout_ms; False once the queue is finished."""
        n = self.lib.ublk_queue_reap(self.q, DEPTH, self.reqs, 0)
        if n == -errno.ENODEV:
            return False
        check(n, "reap")
        for i in range(n):
            self.tags[i], self.results[i] = self.reqs[i].tag, self.answer(self.reqs[i])
        if n:
            check(self.lib.ublk_queue_commit(self.q, n, self.tags, self.results), "commit")
        else:
            self.poll.poll(timeout_ms)
        return True

    def serve_during(self, ctrl, nr, dev_id, data0, what):
        """Submit control command nr and serve the queue until it completes."""
        check(self.lib.ublk_ctrl_submit(ctrl, nr, dev_id, data0), what)
        ctrl_fd = self.lib.ublk_ctrl_ring_fd(ctrl)
        self.poll.register(ctrl_fd, select.POLLIN)
        result = self.ffi.new("int *")
        try:
            while not check(self.lib.ublk_ctrl_wait(ctrl, 0, result), what):
                self.serve(100)
        finally:
            self.poll.unregister(ctrl_fd)
        check(result[0], what)

    def close(self):
        self.lib.ublk_queue_close(self.q)


def main(size_mib):
    helper = aoe.load_helper()
    if helper is None:
        sys.exit("ublk-ramdisk: no compiled helper (python3 build_ffi.py)")
    ffi, lib = helper.ffi, helper.lib
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    cp = ffi.new("struct ublk_ctrl **")
    check(lib.ublk_ctrl_open(cp), "open /dev/ublk-control")
    ctrl = cp[0]
    features = ffi.new("uint64_t *")
    check(lib.ublk_ctrl_get_features(ctrl, features), "GET_FEATURES")
    size = size_mib << 20
    dev_id = check(lib.ublk_ctrl_add_dev(ctrl, -1, 1, DEPTH, BUF, 0), "ADD_DEV")
    params = ffi.new("struct ublk_dev_params *", dict(
        dev_sectors=size >> 9, attrs=ATTR_VOLATILE_CACHE, logical_bs_shift=9, physical_bs_shift=12,
        io_min_shift=12, io_opt_shift=12, max_sectors=BUF >> 9, max_discard_sectors=BUF >> 9,
        max_write_zeroes_sectors=BUF >> 9, discard_granularity=4096))
    check(lib.ublk_ctrl_set_params(ctrl, dev_id, params), "SET_PARAMS")
    store_path = "/dev/shm/ublk-ramdisk-%d" % dev_id
    with open(store_path, "w+b") as f:
        f.truncate(size)
        store = mmap.mmap(f.fileno(), size)
    disk = RamDisk(ffi, lib, dev_id, store)
    check(lib.ublk_queue_fetch_all(disk.q), "FETCH_REQ")
    disk.serve_during(ctrl, CMD_START_DEV, dev_id, os.getpid(), "START_DEV")
    print("READY %d (features %#x)" % (dev_id, features[0]), flush=True)
    while not stop:
        if not disk.serve(200):
            sys.exit("ublk-ramdisk: the queue was aborted")
    disk.serve_during(ctrl, CMD_STOP_DEV, dev_id, 0, "STOP_DEV")
    while disk.serve(100):                      # until every tag's command came back ABORTed
        pass
    error = lib.ublk_queue_last_error(disk.q)
    disk.close()                                # DEL_DEV waits until /dev/ublkcN is closed
    check(lib.ublk_ctrl_cmd(ctrl, CMD_DEL_DEV, dev_id, 0), "DEL_DEV")
    lib.ublk_ctrl_close(ctrl)
    os.unlink(store_path)
    print("STOPPED %d (last queue error %d)" % (dev_id, error), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
