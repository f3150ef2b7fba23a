#!/bin/bash
# Inside the VM (vm/run): `aoe.py attach` against real vblade, end to end.
#   ext4 (mkfs, files, e2fsck -fn), fio crc32c verify (sequential 1M and random 4k qd32),
#   the device's bytes against vblade's backing file, a partition (eX.Yp1), SIGTERM = clean detach,
#   read-only attach, target restarted within deadsecs, target dead past deadsecs (EIO, down, back up),
#   SIGKILL of the daemon + attach --recover, detach under load, flush; at MTU 9000 also the demo.
# Usage: vm/run 'vm/attach-check.sh PYTHON MTU'
set -euo pipefail
PY=${1:?python interpreter}; MTU=${2:-1500}
export AOE_IFLIST=aoeini
IMG=/tmp/e0.0.img
DEADSECS=8

step() { echo "== $*"; }
fail() {
    echo "FAIL: $*"
    for f in /run/aoe/*.log; do [ -e "$f" ] && { echo "--- $f"; cat "$f"; }; done
    exit 1
}
aoe() { timeout 180 "$PY" aoe.py "$@"; }
daemon_pid() { "$PY" -c 'import json,sys; print(json.load(open("/run/aoe/e0.0.json"))["pid"])'; }
start_vblade() { ip netns exec tgt vblade 0 0 aoetgt "$IMG" >> /tmp/vblade.log 2>&1 & VB=$!; sleep 0.3; }
stop_vblade() { kill "$VB"; wait "$VB" 2>/dev/null || true; }
state() { aoe stat --json -w 0.3 | "$PY" -c 'import json,sys; r=[d for d in json.load(sys.stdin) if d["device"]=="e0.0"]; print(r[0]["state"] if r else "none")'; }
wait_state() {  # wait_state WANT SECONDS
    for _ in $(seq $(($2 * 2))); do [ "$(state)" = "$1" ] && return 0; sleep 0.5; done
    fail "e0.0 did not become $1 within $2 s (state $(state))"
}
attach() {
    aoe attach --json "$@" > /tmp/attach.json || fail "attach $*"
    DEV=$("$PY" -c 'import json; print(json.load(open("/tmp/attach.json"))["ublk"])')
    for _ in $(seq 50); do [ -b "$DEV" ] && break; sleep 0.1; done
    [ -b "$DEV" ] || fail "$DEV is not a block device after attach"
}
gone() {  # the device, its link and its record are gone
    local t0=$SECONDS
    for _ in $(seq 600); do
        [ ! -e "$DEV" ] && [ ! -L /dev/etherd/e0.0 ] && [ ! -e /run/aoe/e0.0.json ] && break
        sleep 0.1
    done
    echo "gone after $((SECONDS - t0)) s"
    [ ! -e "$DEV" ] || fail "$DEV still exists"
    [ ! -L /dev/etherd/e0.0 ] || fail "/dev/etherd/e0.0 still exists"
    [ ! -e /run/aoe/e0.0.json ] || fail "the record /run/aoe/e0.0.json is still there"
}
same_as_image() {  # same_as_image OFFSET_MIB LENGTH_MIB: the device's bytes equal vblade's file
    sync
    cmp <(dd if="$DEV" bs=1M skip="$1" count="$2" iflag=direct status=none) \
        <(dd if="$IMG" bs=1M skip="$1" count="$2" status=none) || fail "device and image differ at $1 MiB"
}
FIO=(fio --direct=1 --ioengine=libaio --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0
     --output-format=terse)

ip netns add tgt
trap 'pkill -f "aoe.py attach" 2>/dev/null || true; ip netns del tgt 2>/dev/null || true' EXIT
ip link add aoeini type veth peer name aoetgt netns tgt
ip link set aoeini mtu "$MTU" up
ip -n tgt link set aoetgt mtu "$MTU" up
truncate -s 512M "$IMG"
start_vblade

step "attach, link, stat"
attach e0.0
[ "$(readlink /dev/etherd/e0.0)" = "$DEV" ] || fail "/dev/etherd/e0.0 does not point at $DEV"
[ "$(blockdev --getsize64 "$DEV")" = $((512 << 20)) ] || fail "$DEV has the wrong size"
aoe stat | tee /tmp/stat.txt
grep -q "e0.0 .* up .*$DEV pid" /tmp/stat.txt || fail "stat does not show $DEV"

step "ext4: mkfs, files, e2fsck -fn"
mkfs.ext4 -q -F /dev/etherd/e0.0
mkdir -p /tmp/mnt && mount /dev/etherd/e0.0 /tmp/mnt
for i in 1 2 3 4; do head -c 4M /dev/urandom > /tmp/mnt/f$i; done
sha256sum /tmp/mnt/f* > /tmp/sums
umount /tmp/mnt
e2fsck -fn /dev/etherd/e0.0 || fail "e2fsck found errors"
mount /dev/etherd/e0.0 /tmp/mnt && (cd /tmp/mnt && sha256sum -c --quiet /tmp/sums) || fail "files changed"
umount /tmp/mnt

step "fio verify: sequential 1M qd16, random 4k qd32"
"${FIO[@]}" --name=seq --filename="$DEV" --rw=write --bs=1M --iodepth=16 --offset=256M --size=64M > /dev/null \
    || fail "fio sequential verify"
"${FIO[@]}" --name=rand --filename="$DEV" --rw=randwrite --bs=4k --iodepth=32 --offset=320M --size=32M > /dev/null \
    || fail "fio random verify"
same_as_image 256 96

step "partition: sfdisk, e0.0p1"
printf 'label: dos\n,64M\n' | sfdisk -q "$DEV"
for _ in $(seq 50); do [ -L /dev/etherd/e0.0p1 ] && break; sleep 0.1; done
[ "$(readlink /dev/etherd/e0.0p1)" = "${DEV}p1" ] || fail "no /dev/etherd/e0.0p1 -> ${DEV}p1"
[ "$(blockdev --getsize64 /dev/etherd/e0.0p1)" = $((64 << 20)) ] || fail "e0.0p1 has the wrong size"

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
dd if="$DEV" of=/tmp/during.bin bs=1M skip=256 count=32 iflag=direct status=none &
READER=$!
stop_vblade
sleep 2
start_vblade
wait "$READER" || fail "a read during a short outage failed"
cmp /tmp/during.bin <(dd if="$IMG" bs=1M skip=256 count=32 status=none) || fail "data read across the outage differs"

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

step "SIGKILL of the daemon, then attach --recover"
OLD=$DEV
sync
kill -KILL "$(daemon_pid)"
wait_state dead 10
[ -b "$OLD" ] || fail "$OLD disappeared with its daemon"
if aoe attach e0.0 2>/tmp/err.txt; then fail "attach over a dead daemon's device succeeded"; fi
grep -q -- "--recover" /tmp/err.txt || fail "attach did not suggest --recover: $(cat /tmp/err.txt)"
attach --recover e0.0
[ "$DEV" = "$OLD" ] || fail "recovered as $DEV, not $OLD"
wait_state up 10
same_as_image 256 16
"${FIO[@]}" --name=after --filename="$DEV" --rw=randwrite --bs=4k --iodepth=8 --offset=400M --size=8M > /dev/null \
    || fail "fio verify after recovery"

step "detach under load"
timeout -s KILL 120 fio --name=load --filename="$DEV" --direct=1 --ioengine=libaio --rw=randrw --bs=64k \
    --iodepth=16 --time_based --runtime=60 --output-format=terse > /dev/null 2>&1 &
LOAD=$!
sleep 3
if aoe detach e0.0 2>/dev/null; then fail "detach of a device in use succeeded without --force"; fi
aoe detach --force e0.0 || fail "detach --force under load"
gone
wait "$LOAD" && fail "fio kept going on a detached device" || true

step "flush removes only down devices"
attach --deadsecs "$DEADSECS" e0.0
aoe flush
[ -b "$DEV" ] || fail "flush removed an up device"
stop_vblade
if dd if="$DEV" of=/dev/null bs=4k skip=1000 count=1 iflag=direct status=none 2>/dev/null; then
    fail "a read from a dead target succeeded"
fi
wait_state down 10
aoe flush
gone
if [ "$MTU" = 9000 ]; then
    step "demo, which attaches when ublk exists"
    aoe demo > /tmp/demo.txt 2>&1 || { cat /tmp/demo.txt; fail "demo"; }
    grep -q "the target holds what was written to /dev/ublkb" /tmp/demo.txt || { cat /tmp/demo.txt; fail "demo did not attach"; }
    ls /dev/ublkb* 2>/dev/null && fail "demo left a ublk device behind"
fi
echo "ATTACH-CHECK OK mtu $MTU"
