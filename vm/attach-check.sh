#!/bin/bash
# Inside the VM (vm/run): `aoe.py attach` against real vblade, end to end.
#   ext4 (mkfs, files, e2fsck -fn), fio crc32c verify (sequential 1M and random 4k qd32),
#   the device's bytes against vblade's backing file, a partition (eX.Yp1), SIGTERM = clean detach,
#   read-only attach, target restarted within deadsecs, target dead past deadsecs (EIO, down, back up),
#   SIGKILL of the daemon + attach --recover (or detach), a hostile target (serve --fault-forge),
#   detach under load, flush; at MTU 9000 the demo.
# Usage: vm/run 'vm/attach-check.sh PYTHON MTU [BACKEND]', or as root on a machine with ublk or nbd:
# vm/attach-check.sh PYTHON MTU [BACKEND] (then everything it makes is its own: namespace, veth pair,
# work directory, aoe.py's records and links).  BACKEND: ublk (default) or nbd.  $AOE_PY: the aoe.py to
# run (default: this checkout's), e.g. one copied alone into an empty directory.  $SKIP: steps to leave
# out because another run covers them, the engine's parts, not the kernel's: hostile (the hostile target),
# idle (the idle time before the outage within deadsecs does not count towards it).
set -euo pipefail
PY=${1:?python interpreter}; MTU=${2:-1500}; BACKEND=${3:-ublk}
AOE_PY=${AOE_PY:-aoe.py}
. "$(dirname "$0")/lib.sh"
truncate -s 512M "$IMG"
start_vblade

aoe version
UBLK_BEFORE=$(ls /dev/ublkb* 2>/dev/null || true)
step "attach, link, stat"
attach e0.0
[ "$(readlink $LINK)" = "$DEV" ] || fail "$LINK does not point at $DEV"
[ "$(blockdev --getsize64 "$DEV")" = $((512 << 20)) ] || fail "$DEV has the wrong size"
aoe stat | tee $WORK/stat.txt
grep -q "e0.0 .* up .*$DEV ($BACKEND) pid" $WORK/stat.txt || fail "stat does not show $DEV"
SCHED=/sys/block/${DEV#/dev/}/queue/scheduler     # attach's default: none
for _ in $(seq 50); do grep -q '\[none\]' $SCHED && break; sleep 0.1; done
grep -q '\[none\]' $SCHED || fail "$DEV's I/O scheduler: $(cat $SCHED)"
grep "I/O scheduler" "$RUN/e0.0.log" || fail "the log does not say which I/O scheduler"

step "ext4: mkfs, files, e2fsck -fn"
mkfs.ext4 -q -F $LINK
mkdir -p $WORK/mnt && mount $LINK $WORK/mnt
for i in 1 2 3 4; do head -c 4M /dev/urandom > $WORK/mnt/f$i; done
sha256sum $WORK/mnt/f* > $WORK/sums
umount $WORK/mnt
e2fsck -fn $LINK || fail "e2fsck found errors"
mount $LINK $WORK/mnt && (cd $WORK/mnt && sha256sum -c --quiet $WORK/sums) || fail "files changed"
umount $WORK/mnt

step "fio verify: sequential 1M qd16, random 4k qd32"
"${FIO[@]}" --name=seq --filename="$DEV" --rw=write --bs=1M --iodepth=16 --offset=256M --size=32M > /dev/null \
    || fail "fio sequential verify"
"${FIO[@]}" --name=rand --filename="$DEV" --rw=randwrite --bs=4k --iodepth=32 --offset=288M --size=16M > /dev/null \
    || fail "fio random verify"
same_as_image 256 48

step "partition: sfdisk, e0.0p1"
printf 'label: dos\n,64M\n' | sfdisk -q "$DEV"
for _ in $(seq 50); do [ -L ${LINK}p1 ] && break; sleep 0.1; done
[ "$(readlink ${LINK}p1)" = "${DEV}p1" ] || fail "no ${LINK}p1 -> ${DEV}p1"
[ "$(blockdev --getsize64 ${LINK}p1)" = $((64 << 20)) ] || fail "e0.0p1 has the wrong size"

step "SIGTERM: clean detach"
kill -TERM "$(daemon_pid)"
gone

step "read-only attach"
attach --ro e0.0
[ "$(blockdev --getro "$DEV")" = 1 ] || fail "$DEV is not read-only"
if dd if=/dev/zero of="$DEV" bs=4k count=1 oflag=direct status=none 2>/dev/null; then fail "a write succeeded"; fi
same_as_image 256 8
aoe detach "$DEV"
gone

step "target restarted within deadsecs: I/O waits and completes"
attach --deadsecs "$DEADSECS" e0.0
if wanted idle; then              # idle for longer than deadsecs: the silence that counts starts with the I/O
    sleep $((DEADSECS + 1))
fi
dd if="$DEV" of=$WORK/during.bin bs=1M skip=256 count=32 iflag=direct status=none &
READER=$!
stop_vblade
sleep 2
start_vblade
wait "$READER" || fail "a read during a short outage failed"
cmp $WORK/during.bin <(dd if="$IMG" bs=1M skip=256 count=32 status=none) || fail "data read across the outage differs"

step "target dead past deadsecs: EIO, down, then back up"
stop_vblade
t0=$(date +%s)
if dd if="$DEV" of=/dev/null bs=1M skip=300 count=1 iflag=direct status=none 2>/dev/null; then
    fail "a read from a dead target succeeded"
fi
echo "EIO after $(( $(date +%s) - t0 )) s (deadsecs $DEADSECS)"
[ $(( $(date +%s) - t0 )) -le $((DEADSECS + 20)) ] || fail "EIO came too late"
wait_state down 10
start_vblade
wait_state up 20
same_as_image 300 4

step "SIGKILL of the daemon while a read is in flight, then attach --recover: the read completes"
OLD=$DEV
sync
dd if="$DEV" of=$WORK/across.bin bs=1M skip=256 count=32 iflag=direct status=none &
READER=$!
sleep 1
kill -KILL "$(daemon_pid)"
wait_state dead 10
present "$OLD" || fail "$OLD disappeared with its daemon"
if aoe attach --backend "$BACKEND" e0.0 2>$WORK/err.txt; then fail "attach over a dead daemon's device succeeded"; fi
grep -q -- "--recover" $WORK/err.txt || fail "attach did not suggest --recover: $(cat $WORK/err.txt)"
attach --recover e0.0
[ "$DEV" = "$OLD" ] || fail "recovered as $DEV, not $OLD"
wait_state up 10
wait "$READER" || fail "a read in flight while the daemon was killed failed"
cmp $WORK/across.bin <(dd if="$IMG" bs=1M skip=256 count=32 status=none) || fail "data read across the recovery differs"
same_as_image 256 16
"${FIO[@]}" --name=after --filename="$DEV" --rw=randwrite --bs=4k --iodepth=8 --offset=400M --size=8M > /dev/null \
    || fail "fio verify after recovery"

if wanted hostile; then
    step "a hostile target: forged answers before every true one, the device still reads exactly"
    HOSTILE=$WORK/e0.9.img
    head -c 16M /dev/urandom > "$HOSTILE"
    ip netns exec "$NS" "$PY" "$AOE_PY" serve --fault-forge 1 0 9 "$TGT" "$HOSTILE" >> "$WORK/hostile.log" 2>&1 &
    HOSTILE_PID=$!; OTHER_PIDS=$HOSTILE_PID
    sleep 1
    aoe attach --backend "$BACKEND" --json e0.9 > "$WORK/attach9.json" || fail "attach e0.9"
    DEV9=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["block_device"])' "$WORK/attach9.json")
    for _ in $(seq 50); do [ -b "$DEV9" ] && break; sleep 0.1; done
    cmp <(dd if="$DEV9" bs=1M iflag=direct status=none) "$HOSTILE" || fail "e0.9 read through the hostile target differs"
    "${FIO[@]}" --name=hostile --filename="$DEV9" --rw=randwrite --bs=16k --iodepth=16 --size=8M > /dev/null \
        || fail "fio verify through the hostile target"
    kill -USR1 "$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$RUN/e0.9.json")"
    sleep 1
    grep -A3 "state up" "$RUN/e0.9.log" | grep "dropped:" || fail "no drop counters in the e0.9 log"
    aoe detach e0.9 || fail "detach e0.9"
    kill "$HOSTILE_PID"; wait "$HOSTILE_PID" 2>/dev/null || true
fi

step "detach under load"
timeout -s KILL 120 fio --name=load --filename="$DEV" --direct=1 --ioengine=libaio --rw=randrw --bs=64k \
    --iodepth=16 --time_based --runtime=60 --output-format=terse > /dev/null 2>&1 &
LOAD=$!
sleep 3
if aoe detach e0.0 2>/dev/null; then fail "detach of a device in use succeeded without --force"; fi
aoe detach --force e0.0 || fail "detach --force under load"
gone
wait "$LOAD" && fail "fio kept going on a detached device" || true

step "SIGKILL, then detach without a daemon"
attach e0.0
kill -KILL "$(daemon_pid)"
wait_state dead 10
aoe detach e0.0 || fail "detach of a device whose daemon died"
gone

step "flush removes only down devices"
attach --deadsecs "$DEADSECS" e0.0
aoe flush
present "$DEV" || fail "flush removed an up device"
stop_vblade
if dd if="$DEV" of=/dev/null bs=4k skip=1000 count=1 iflag=direct status=none 2>/dev/null; then
    fail "a read from a dead target succeeded"
fi
wait_state down 10
aoe flush
gone
if [ "$MTU" = 9000 ] && [ "$BACKEND" = ublk ]; then
    step "demo, which attaches when the kernel can"
    aoe demo > "$WORK/demo.txt" 2>&1 || { cat $WORK/demo.txt; fail "demo"; }
    grep -q "the target holds what was written to /dev/ublkb" $WORK/demo.txt || { cat $WORK/demo.txt; fail "demo did not attach"; }
    [ "$(ls /dev/ublkb* 2>/dev/null)" = "$UBLK_BEFORE" ] || fail "demo left a ublk device behind"
fi
echo "ATTACH-CHECK OK mtu $MTU backend $BACKEND"
