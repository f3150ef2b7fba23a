#!/usr/bin/env python3
"""Build aoe.py's compiled helper: `python3 build_ffi.py` (needs cffi and a C compiler).

Compiles _aoeio.c into the _aoeio extension module (cffi, out-of-line API mode)
and puts it next to this file, whatever the current directory.  The build runs
in a temporary directory that is removed afterwards.
"""

import os
import shutil
import sys
import tempfile

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))

# What Python sees of _aoeio.c.  "...;" lets the compiler place the private
# fields of struct aoe_eng and struct aoe_srv; everything Python reads or sets is listed.
CDEF = """
struct aoe_counters {
    uint64_t frames_sent, frames_resent, frames_recv, bytes_data;
    uint64_t resent_needed;
    uint64_t resent_spurious;
    uint64_t drop_short;
    uint64_t drop_not_response;
    uint64_t drop_version;
    uint64_t drop_foreign;
    uint64_t drop_bad_mac;
    uint64_t drop_stale;
    uint64_t drop_late;
    uint64_t drop_bad_tag;
    uint64_t drop_echo;
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
    uint32_t reorder_us;
    int64_t newest_answered_us;
    uint64_t sent, recv;
    int64_t last_recv_us;
    uint32_t rtt_n, rtt_max_us;
    uint64_t rtt_sum_us;
    uint32_t spurious;
    uint32_t needed;
    uint32_t late;
};
struct aoe_event { uint64_t req_id; int32_t status; };
struct aoe_eng {
    uint16_t shelf; uint8_t slot; uint8_t lba48;
    uint8_t flush_cmd;
    int sectors_per_frame;
    int npaths; struct aoe_path paths[16];
    struct aoe_counters c;
    int ndone;    struct aoe_event *done;
    int nexpired; uint32_t *expired;
    int inflight_frames; int pending_frames; int active_requests;
    int bridge_on;
    int nhanded; struct ublk_req *handed;
    int bridge_finished;
    int bridge_error;
    uint64_t bq_sectors;
    ...;
};

struct aoe_eng *aoe_eng_new(uint16_t shelf, uint8_t slot, int max_frames, uint16_t gen_seed);
void aoe_eng_free(struct aoe_eng *);
int aoe_eng_add_path(struct aoe_eng *, int fd, const uint8_t *src6, const uint8_t *dst6);
int aoe_submit(struct aoe_eng *, uint64_t req_id, int op, uint64_t lba, uint32_t nsect, void *buf);
int aoe_pump(struct aoe_eng *, int timeout_us, int extra_fd);
int aoe_resend(struct aoe_eng *, uint32_t frame_slot);
int aoe_frame_path(struct aoe_eng *, uint32_t frame_slot);
int aoe_fail_all(struct aoe_eng *, int32_t status);
int64_t aoe_now_us(void);

struct aoe_srv_counters {
    uint64_t frames_recv, batches, frames_fast, frames_slow, frames_sent;
    uint64_t sectors_read, sectors_written;
    uint64_t io_errors;
    uint64_t drop_short;
    uint64_t drop_not_aoe;
    uint64_t drop_version;
    uint64_t drop_response;
    uint64_t drop_other_target;
    uint64_t drop_masked;
    uint64_t drop_oversize;
    uint64_t send_lost;
};
struct aoe_srv_frame { uint8_t *data; uint32_t len; };
struct aoe_srv {
    int sock_fd, file_fd;
    uint8_t mac[6];
    uint16_t shelf; uint8_t slot; uint8_t readonly;
    uint64_t base;
    uint64_t sectors;
    int scnt;
    struct aoe_srv_counters c;
    int nslow; struct aoe_srv_frame *slow;
    ...;
};

struct aoe_srv *aoe_srv_new(int frame_max);
void aoe_srv_free(struct aoe_srv *);
int aoe_srv_set_lists(struct aoe_srv *, const uint8_t *masks, int nmasks, const uint8_t *reserved, int nreserved);
int aoe_srv_pump(struct aoe_srv *, int timeout_us);

struct ublk_ctrl;
struct ublk_queue;
struct ublksrv_ctrl_dev_info {
    uint16_t nr_hw_queues; uint16_t queue_depth; uint16_t state;
    uint32_t max_io_buf_bytes; uint32_t dev_id; int32_t ublksrv_pid; uint64_t flags;
    ...;
};
struct ublk_dev_params {
    uint64_t dev_sectors; uint32_t attrs;
    uint8_t logical_bs_shift, physical_bs_shift, io_min_shift, io_opt_shift;
    uint32_t max_sectors, max_discard_sectors, max_write_zeroes_sectors, discard_granularity;
};
struct ublk_req {
    uint16_t tag; uint8_t op; uint8_t reserved; uint32_t flags; uint32_t nr_sectors;
    uint32_t reserved2; uint64_t start_sector; uint64_t addr;
};

int ublk_ctrl_open(struct ublk_ctrl **out);
void ublk_ctrl_close(struct ublk_ctrl *);
int ublk_ctrl_ring_fd(struct ublk_ctrl *);
int ublk_ctrl_get_features(struct ublk_ctrl *, uint64_t *features);
int ublk_ctrl_add_dev(struct ublk_ctrl *, int dev_id, unsigned nr_queues, unsigned depth,
                      unsigned max_io_buf_bytes, uint64_t flags);
int ublk_ctrl_set_params(struct ublk_ctrl *, int dev_id, const struct ublk_dev_params *);
int ublk_ctrl_get_dev_info(struct ublk_ctrl *, int dev_id, struct ublksrv_ctrl_dev_info *);
int ublk_ctrl_submit(struct ublk_ctrl *, unsigned nr, int dev_id, uint64_t data0);
int ublk_ctrl_wait(struct ublk_ctrl *, long long timeout_us, int *result);
int ublk_ctrl_cmd(struct ublk_ctrl *, unsigned nr, int dev_id, uint64_t data0);
int ublk_queue_open(struct ublk_queue **out, int dev_id, int q_id, int depth, unsigned buf_size);
void ublk_queue_close(struct ublk_queue *);
int ublk_queue_ring_fd(struct ublk_queue *);
int ublk_queue_cdev_fd(struct ublk_queue *);
void *ublk_queue_bufs(struct ublk_queue *);
unsigned ublk_queue_buf_size(struct ublk_queue *);
int ublk_queue_in_kernel(struct ublk_queue *);
int ublk_queue_last_error(struct ublk_queue *);
int ublk_queue_fetch_all(struct ublk_queue *);
int ublk_queue_reap(struct ublk_queue *, int max, struct ublk_req *out, long long timeout_us);
int ublk_queue_commit(struct ublk_queue *, int n, const uint16_t *tags, const int32_t *results);
int aoe_eng_bridge(struct aoe_eng *, struct ublk_queue *, uint64_t sectors, int readonly);
"""


def build():
    """Compile and install the module; returns its path."""
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    with open(os.path.join(HERE, "_aoeio.c")) as f:
        source = f.read()
    ffi.set_source("_aoeio", source, extra_compile_args=["-O2", "-Wall"])
    with tempfile.TemporaryDirectory(prefix="aoeio-build-") as tmp:
        built = ffi.compile(tmpdir=tmp)
        dest = os.path.join(HERE, os.path.basename(built))
        staged = os.path.join(HERE, "." + os.path.basename(built) + ".new")
        shutil.copyfile(built, staged)
        os.replace(staged, dest)                  # a running aoe.py keeps its old copy
    return dest


if __name__ == "__main__":
    try:
        print("built", build())
    except (cffi.CDefError, cffi.VerificationError, OSError) as e:
        sys.exit("build_ffi.py: %s" % e)
