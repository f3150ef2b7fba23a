#!/bin/bash
# Inside the VM (vm/run): many targets as devices of one attach process, as the kernel driver makes
# them.  N vblade targets (64 MiB each) attached by one `attach --all`: one process serves them
# all, and its memory (PSS) for N idle devices stays within LIMIT_MB.  Two devices take writes at
# once and hold the bytes written; one is detached alone while the others go on; one whose thread
# fails (a failure injected into its serving loop) is left for attach --recover while the others go
# on, and a new daemon serves it again; after a SIGKILL of the process attach --all --recover serves
# its devices again in one process; flush -a detaches them all.
# Usage: vm/run 'vm/many-check.sh PYTHON [N [LIMIT_MB]]'
set -euo pipefail
PY=${1:?python interpreter}; N=${2:-64}; LIMIT_MB=${3:-128}; MTU=9000; BACKEND=ublk
AOE_PY=${AOE_PY:-aoe.py}
. "$(dirname "$0")/lib.sh"
for i in $(seq "$N"); do
    truncate -s 64M "$WORK/e5.$i.img"
    nsenter --net="/run/netns/$NS" vblade 5 "$i" "$TGT" "$WORK/e5.$i.img" >> "$WORK/vblade.log" 2>&1 &
    OTHER_PIDS="${OTHER_PIDS:-} $!"
done
sleep 1
# aoe.py as it is, but a device's serving loop raises once RUN_DIR/eX.Y.fail exists
cat > "$WORK/aoe-failing.py" <<PYEOF
import os, sys
sys.path.insert(0, "$PWD")
import aoe
serve = aoe.AttachDaemon.serve
def serve_unless_told_to_fail(daemon, timeout_us):
    if os.path.exists(os.path.join(aoe.RUN_DIR, daemon.target.name + ".fail")):
        raise RuntimeError("a failure injected into %s's serving loop" % daemon.target.name)
    return serve(daemon, timeout_us)
aoe.AttachDaemon.serve = serve_unless_told_to_fail
sys.exit(aoe.main())
PYEOF
record() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2]))' "$RUN/$1.json" "$2"; }
block() { readlink "$AOE_LINK_DIR/$1"; }
written() {  # written eX.Y SEED: 4 MiB of SEED's bytes at 8 MiB into the device (direct)
    "$PY" -c 'import random,sys; sys.stdout.buffer.write(random.Random(int(sys.argv[1])).randbytes(4 << 20))' "$2" \
        > "$WORK/$1.data"
    dd if="$WORK/$1.data" of="$(block "$1")" bs=1M seek=8 oflag=direct status=none
}
holds() {  # holds eX.Y: the device and its image both hold what written wrote
    cmp "$WORK/$1.data" <(dd if="$(block "$1")" bs=1M skip=8 count=4 iflag=direct status=none) \
        || fail "$1 does not read back what was written"
    cmp "$WORK/$1.data" <(dd if="$WORK/$1.img" bs=1M skip=8 count=4 status=none) \
        || fail "$1's image does not hold what was written"
}

step "attach --all: $N targets, one process"
t0=$SECONDS
timeout 900 "$PY" "$WORK/aoe-failing.py" attach --all > "$WORK/all.txt" || { cat "$WORK/all.txt"; fail "attach --all"; }
n=$(grep -c ' is e5\.' "$WORK/all.txt" || true)
[ "$n" = "$N" ] || fail "attach --all attached $n of $N"
echo "attach --all: $n devices in $((SECONDS - t0)) s"
HOST=$(record e5.1 pid)
others=$("$PY" -c 'import glob,json,sys; print(" ".join(sorted({str(json.load(open(f))["pid"]) for f in glob.glob(sys.argv[1] + "/*.json")})))' "$RUN")
[ "$others" = "$HOST" ] || fail "the devices are not all served by pid $HOST: $others"
sleep 2
pss=$(awk '/^Pss:/{print $2}' "/proc/$HOST/smaps_rollup")
echo "MEMORY $N idle devices in one process: PSS $((pss / 1024)) MB in all, $((pss / N)) kB a device; $(ls /proc/$HOST/task | wc -l) threads (io_uring's workers too)"
[ "$pss" -le $((LIMIT_MB * 1024)) ] || fail "PSS $((pss / 1024)) MB is over $LIMIT_MB MB"

step "two devices written at once"
written e5.1 1 & w1=$!
written e5.2 2 & w2=$!
wait "$w1" || fail "writing e5.1"; wait "$w2" || fail "writing e5.2"
holds e5.1; holds e5.2

step "detach one; the others go on"
aoe detach e5.3 > /dev/null || fail "detach e5.3"
[ ! -e "$RUN/e5.3.json" ] && [ ! -L "$AOE_LINK_DIR/e5.3" ] || fail "e5.3 left behind"
kill -0 "$HOST" || fail "the attach process ended with the detach of one device"
holds e5.1

step "one device's thread fails; the others go on; attach --recover serves it again"
touch "$RUN/e5.2.fail"
for _ in $(seq 100); do [ "$(record e5.2 pid)" = None ] && break; sleep 0.1; done
[ "$(record e5.2 pid)" = None ] || fail "e5.2's record still names pid $(record e5.2 pid)"
aoe stat e5.2 -w 0.3 | tee "$WORK/stat.txt"
grep -q dead "$WORK/stat.txt" || fail "stat does not show e5.2 dead"
grep -q "a failure injected" "$RUN/e5.2.log" || fail "e5.2's log does not say what failed"
written e5.1 3; holds e5.1
kill -0 "$HOST" || fail "the attach process ended with one device's failure"
rm "$RUN/e5.2.fail"
aoe attach --recover e5.2 | tee "$WORK/recover.txt" || fail "attach --recover e5.2"
[ "$(record e5.2 pid)" != "$HOST" ] && [ "$(record e5.2 state)" = up ] || fail "e5.2 is not served anew"
holds e5.2
written e5.2 4; holds e5.2

step "SIGKILL of the process: attach --all --recover serves its devices again, in one process"
kill -KILL "$HOST"
for _ in $(seq 50); do kill -0 "$HOST" 2> /dev/null || break; sleep 0.1; done
t0=$SECONDS
aoe attach --all --recover > "$WORK/recovered.txt" || { cat "$WORK/recovered.txt"; fail "attach --all --recover"; }
n=$(grep -c ' is e5\.' "$WORK/recovered.txt" || true)
[ "$n" = $((N - 2)) ] || fail "attach --all --recover recovered $n of $((N - 2))"
echo "attach --all --recover: $n devices in $((SECONDS - t0)) s"
HOST=$(record e5.1 pid)
others=$("$PY" -c 'import glob,json,sys; print(" ".join(sorted({str(json.load(open(f))["pid"]) for f in glob.glob(sys.argv[1] + "/*.json")} - {sys.argv[2]})))' "$RUN" "$(record e5.2 pid)")
[ "$others" = "$HOST" ] || fail "the recovered devices are not all served by pid $HOST: $others"
holds e5.1
written e5.1 5; holds e5.1
if aoe attach --all --recover 2> "$WORK/none.err"; then fail "a second attach --all --recover succeeded"; fi
grep -q "waits for attach --recover" "$WORK/none.err" || fail "no clear message: $(cat "$WORK/none.err")"

step "flush -a detaches them all"
t0=$SECONDS
aoe flush -a > "$WORK/flush.txt" || { cat "$WORK/flush.txt"; fail "flush -a"; }
echo "flush -a: $(grep -c removed "$WORK/flush.txt") devices in $((SECONDS - t0)) s"
! compgen -G "$RUN/*.json" || fail "records left after flush -a"
ls /dev/ublkb* 2> /dev/null && fail "devices left after flush -a"
for _ in $(seq 50); do kill -0 "$HOST" 2> /dev/null || break; sleep 0.1; done
! kill -0 "$HOST" 2> /dev/null || fail "the attach process did not end with its last device"
echo "MANY-CHECK OK $N"
