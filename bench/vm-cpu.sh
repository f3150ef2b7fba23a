#!/bin/bash
# Where the CPU goes, the kernel's aoe driver against aoe.py attach (ublk), side by side in one boot:
# for each fio job, the rate, then CPU time per I/O of vblade, of aoe.py's daemon and of the whole
# VM (all vCPUs, busy time from /proc/stat).  Shows whether a row is bound by the target, by the
# daemon, or by neither (the VM idle while requests wait on each other).
# Usage (from the checkout): vm/run '[ROUNDS=N] bench/vm-cpu.sh PYTHON [SECONDS [MTU]]'
set -euo pipefail
PY=${1:?python interpreter}; SECS=${2:-5}; MTU=${3:-9000}
ROUNDS=${ROUNDS:-2}
IMG=/tmp/bench.img
. vm/kernel-aoe.sh
. bench/vm-target.sh
JOBS=("rand-read-4k-qd32 randread 4k 32" "rand-write-4k-qd32 randwrite 4k 32"
      "seq-read-1M-qd16 read 1M 16" "seq-write-1M-qd16 write 1M 16" "rand-write-64k-qd16 randwrite 64k 16")
HZ=$(getconf CLK_TCK)

start_target "$MTU"
trap stop_target EXIT

ticks() { [ -n "$1" ] && awk '{print $14 + $15}' "/proc/$1/stat" || echo 0; }  # utime + stime
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }              # all vCPUs

run_jobs() {  # run_jobs WHO DEV [DAEMON_PID]
    local who=$1 dev=$2 daemon=${3:-} job v0 d0 b0 v1 d1 b1 ios
    for job in "${JOBS[@]}"; do
        set -- $job
        v0=$(ticks "$VB"); d0=$(ticks "$daemon"); b0=$(busy)
        ios=$(fio --name="$1" --filename="$dev" --direct=1 --ioengine=libaio --rw="$2" --bs="$3" \
                  --iodepth="$4" --size=448M --time_based --runtime="$SECS" --output-format=json \
                  2>/dev/null | "$PY" -c '
import json, sys
job = json.load(sys.stdin)["jobs"][0]
print(job["write"]["total_ios"] + job["read"]["total_ios"])')
        v1=$(ticks "$VB"); d1=$(ticks "$daemon"); b1=$(busy)
        "$PY" -c '
import sys
who, job, secs, ios, hz, vb, dm, busy = sys.argv[1:3] + [float(a) for a in sys.argv[3:]]
us = lambda ticks: ticks / hz * 1e6 / ios
print("%-7s %-19s %8.0f I/O per s   CPU per I/O: vblade %5.0f us, daemon %5.0f us, VM %5.0f us"
      % (who, job, ios / secs, us(vb), us(dm), us(busy)))' \
            "$who" "$1" "$SECS" "$ios" "$HZ" $((v1 - v0)) $((d1 - d0)) $((b1 - b0))
    done
}

for round in $(seq "$ROUNDS"); do
    kernel_aoe_attach aoeini e0.0 || { echo "the kernel driver did not find e0.0"; exit 1; }
    run_jobs kernel /dev/etherd/e0.0
    rmmod aoe
    DEV=$(AOE_IFLIST=aoeini "$PY" aoe.py attach --json --backend ublk e0.0 |
          "$PY" -c 'import json,sys; print(json.load(sys.stdin)["block_device"])')
    PID=$(AOE_IFLIST=aoeini "$PY" aoe.py stat --json -w 0.3 | "$PY" -c '
import json, sys
print([d for d in json.load(sys.stdin) if d["device"] == "e0.0"][0]["attached"]["pid"])')
    run_jobs aoe.py "$DEV" "$PID"
    AOE_IFLIST=aoeini "$PY" aoe.py detach e0.0 > /dev/null
done
echo "CPU DONE"
