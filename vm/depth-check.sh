#!/bin/bash
# Inside the VM (vm/run): attach against targets that advertise 64 buffers (vblade -b 64, and
# aoe.py serve, whose default that is), reads and writes mixed at depth, every byte checked.
# For each CASE, one attach, then two fio runs (4k at depth 64, 64k at depth 32) of two jobs side
# by side at half the depth each:
#   reader  random reads, each checked (crc32c, and the offset it was written for), of blocks fio
#           wrote beforehand straight into the target's file: once over them, for at most RUNTIME;
#   writer  random writes for RUNTIME, read back and checked as it goes (verify_backlog) and at
#           the end.
# (One randrw job would not do: fio checks none of its reads, only what it wrote, read back once
# the mixed part is over.)  Afterwards: the daemon is alive (its record's pid) and up (stat), the
# kernel logged nothing about the device, the device's bytes where the writer wrote equal the
# target's file, and the window reached 64: the daemon's reports (SIGUSR1, every 0.2 s during
# each run) show a window limit of 64 and, in the 64k run, 64 frames in flight.
# Usage: vm/run 'vm/depth-check.sh PYTHON MTU CASE...'; CASE is BACKEND:TARGET:DATA_PATH with
# BACKEND ublk or nbd, TARGET vblade or serve, DATA_PATH helper or python (attach --no-helper;
# ublk has no pure-Python path).  $AOE_PY: the aoe.py to run (default: this checkout's).
# Only in the VM: it raises net.core.rmem_default and rmem_max for vblade (see there).
set -euo pipefail
PY=${1:?python interpreter}; MTU=${2:?MTU}; shift 2
[ $# -gt 0 ] || { echo "FAIL: no CASE given"; exit 1; }
AOE_PY=${AOE_PY:-aoe.py}
BUFFERS=64
RUNTIME=3                         # seconds of each fio run
READ_MIB=96                       # the reader's blocks
WRITE_AT=128; WRITE_MIB=8         # the writer's region (MiB)
. "$(dirname "$0")/lib.sh"
# The checkout is read-only here: without a cache elsewhere every aoe.py command compiles it
# anew, seconds each under TCG.
export PYTHONPYCACHEPREFIX=$WORK/pycache; unset PYTHONDONTWRITEBYTECODE
truncate -s $((WRITE_AT + WRITE_MIB))M "$IMG"
# vblade leaves its socket's receive buffer at the default, about a dozen jumbo frames (its README
# says to raise it); the rest of 64 would be dropped.  Room for two windows of full frames at what
# the kernel counts for each, about twice its size (as serve reckons when it sizes its own).  The
# setting is the whole kernel's, not the namespace's.
RCVBUF=$((2 * BUFFERS * (2 * (MTU + 14) + 512)))
for key in net.core.rmem_max net.core.rmem_default; do
    [ "$(sysctl -n $key)" -ge $RCVBUF ] || sysctl -qw $key=$RCVBUF
    [ "$(sysctl -n $key)" -ge $RCVBUF ] || fail "cannot raise $key to $RCVBUF"
done
step "the reader's blocks, written into the target's file"
"${FIO[@]}" --name=fill --filename="$IMG" --ioengine=psync --direct=0 --rw=write --bs=1M --size=${READ_MIB}M \
    --verify_interval=4k --do_verify=0 > /dev/null || fail "fio could not fill $IMG"

start_serve() {
    ip netns exec "$NS" "$PY" "$AOE_PY" serve 0 0 "$TGT" "$IMG" > "$WORK/serve.log" 2>&1 &
    SERVE=$!; OTHER_PIDS="${OTHER_PIDS:-} $SERVE"
    for _ in $(seq 200); do grep -q "^pid $SERVE:" "$WORK/serve.log" && break; sleep 0.1; done
    grep "^pid $SERVE:" "$WORK/serve.log" || fail "serve did not start: $(cat "$WORK/serve.log")"
    grep -q "$BUFFERS buffers, .* helper, .* data path" "$WORK/serve.log" ||
        fail "serve is not on the helper's fast path with $BUFFERS buffers"
}
stop_serve() { kill "$SERVE"; wait "$SERVE" 2>/dev/null || true; }

mixed_io() {  # mixed_io BS DEPTH: the reader and the writer, the daemon reporting meanwhile
    local bs=$1 depth=$2 log_at fio figures windows limits most
    log_at=$(stat -c %s "$RUN/e0.0.log")
    "${FIO[@]}" --output-format=json --filename="$DEV" --verify_interval=4k --runtime=$RUNTIME \
        --name=reader --rw=randread --bs="$bs" --iodepth=$((depth / 2)) --size=${READ_MIB}M \
        --name=writer --rw=randwrite --bs="$bs" --iodepth=$((depth / 2)) --offset=${WRITE_AT}M \
        --size=${WRITE_MIB}M --time_based --verify_backlog=64 > "$WORK/fio.json" 2> "$WORK/fio.err" &
    fio=$!
    while kill -0 $fio 2>/dev/null; do
        sleep 0.2
        kill -USR1 "$DAEMON" 2>/dev/null || ! kill -0 $fio 2>/dev/null ||
            fail "the attach daemon died during fio $bs; the kernel's last words: $(dmesg | tail -3)"
    done
    wait $fio || fail "fio $bs at depth $depth: $(cat "$WORK/fio.err")"
    figures=$("$PY" - "$WORK/fio.json" <<'EOF'
import json, sys
jobs = {j["jobname"]: j for j in json.load(open(sys.argv[1]))["jobs"]}
reader, writer = jobs["reader"], jobs["writer"]
problems = ["%s: error %d" % (j["jobname"], j["error"]) for j in (reader, writer) if j["error"]]
if not reader["read"]["io_bytes"] or not writer["write"]["io_bytes"] or not writer["read"]["io_bytes"]:
    problems.append("nothing read, written or read back")
print("read %d IOPS %.1f MB/s (%d MiB in %d ms), write %d IOPS %.1f MB/s (%d MiB read back), "
      "verify errors %d%s"
      % (reader["read"]["iops"], reader["read"]["bw_bytes"] / 1e6, reader["read"]["io_bytes"] >> 20,
         reader["read"]["runtime"], writer["write"]["iops"], writer["write"]["bw_bytes"] / 1e6,
         writer["read"]["io_bytes"] >> 20, reader["error"] + writer["error"],
         "; " + "; ".join(problems) if problems else ""))
EOF
)
    windows=$(tail -c +$((log_at + 1)) "$RUN/e0.0.log" |
              grep -o "window [0-9]* of [0-9]*, [0-9]* frames in flight" || true)
    [ -n "$windows" ] || fail "no window figures in the daemon's log after SIGUSR1"
    limits=$(echo "$windows" | awk '{print $4}' | tr -d , | sort -u | tr '\n' ' ')
    most=$(echo "$windows" | awk '{print $5}' | sort -n | tail -1)
    echo "$CASE $bs qd$depth: $figures; frames in flight at most $most, window limit ${limits% }" \
        "($(echo "$windows" | wc -l) reports)"
    [[ $figures != *"; "* ]] || fail "fio $bs at depth $depth: ${figures#*; }"
    [ "$limits" = "$BUFFERS " ] || fail "the window's limit was $limits, not the target's $BUFFERS buffers"
    [ "$bs" != 64k ] || [ "$most" = $BUFFERS ] || fail "at most $most frames in flight, not $BUFFERS"
}

for CASE in "$@"; do
    IFS=: read -r BACKEND target data_path <<< "$CASE"
    step "$CASE"
    case $target in
        vblade) start_vblade -b $BUFFERS;;
        serve) start_serve;;
        *) fail "unknown target $target in $CASE";;
    esac
    case $data_path in
        helper) attach -v e0.0 2> "$WORK/attach.err"; want="helper data path";;
        python) attach -v --no-helper e0.0 2> "$WORK/attach.err"; want="pure-Python data path";;
        *) fail "unknown data path $data_path in $CASE";;
    esac
    grep -q "$want" "$WORK/attach.err" || fail "attach did not take the $want: $(cat "$WORK/attach.err")"
    DAEMON=$(daemon_pid)
    dmesg -C
    mixed_io 4k 64
    mixed_io 64k 32
    [ "$(daemon_pid)" = "$DAEMON" ] && kill -0 "$DAEMON" || fail "the attach daemon (pid $DAEMON) is gone"
    [ "$(state)" = up ] || fail "e0.0 is $(state), not up"
    if dmesg | grep -E "${DEV#/dev/}|I/O error"; then fail "the kernel logged the above"; fi
    same_as_image $WRITE_AT $WRITE_MIB
    echo "$CASE: daemon alive, up, no kernel message, the writer's region equals the target's file"
    aoe detach e0.0 || fail "detach"
    gone
    if [ "$target" = vblade ]; then stop_vblade; else stop_serve; fi
done
echo "DEPTH-CHECK OK mtu $MTU $*"
