#!/bin/bash
# Inside the VM (vm/run): `aoe.py attach --backend nbd` through nbd's ioctl interface (the path of
# kernels without its netlink family; AOE_NBD_IOCTL=1 forces it): ext4 and fio verify, SIGTERM, a
# clear refusal of --recover after SIGKILL (the device goes with its daemon), then detach tidies up.
# Usage: vm/run 'vm/nbd-ioctl-check.sh PYTHON'
set -euo pipefail
PY=${1:?python interpreter}
WORK=$(mktemp -d /tmp/aoe-nbd-ioctl.XXXXXX)
export AOE_IFLIST=aoeini AOE_RUN_DIR=$WORK/run AOE_LINK_DIR=$WORK/etherd AOE_NBD_IOCTL=1
fail() { echo "FAIL: $*"; cat "$WORK"/run/*.log 2>/dev/null; exit 1; }
aoe() { timeout 120 "$PY" aoe.py "$@"; }
ip netns add tgt
trap 'ip netns del tgt 2>/dev/null || true' EXIT
ip link add aoeini type veth peer name aoetgt netns tgt
ip link set aoeini up
ip -n tgt link set aoetgt up
truncate -s 256M "$WORK/img"
ip netns exec tgt vblade 0 0 aoetgt "$WORK/img" > "$WORK/vblade.log" 2>&1 &
sleep 0.5
record() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$WORK/run/e0.0.json" "$1"; }

aoe attach --backend nbd e0.0 || fail "attach"
DEV=/dev/$(record dev)
grep -q "through nbd (ioctl" "$WORK/run/e0.0.log" || fail "not through the ioctl interface"
[ "$(record recoverable)" = False ] || fail "an ioctl device recorded as recoverable"
mkfs.ext4 -q -F "$DEV" && e2fsck -fn "$DEV" > /dev/null || fail "ext4 on $DEV"
fio --name=v --filename="$DEV" --direct=1 --ioengine=libaio --rw=randwrite --bs=16k --iodepth=16 --offset=128M \
    --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --output-format=terse \
    > /dev/null || fail "fio verify"
cmp <(dd if="$DEV" bs=1M skip=128 count=16 iflag=direct status=none) \
    <(dd if="$WORK/img" bs=1M skip=128 count=16 status=none) || fail "device and image differ"
kill -TERM "$(record pid)"
for _ in $(seq 100); do [ -e "$WORK/run/e0.0.json" ] || break; sleep 0.1; done
[ ! -e "$WORK/run/e0.0.json" ] || fail "SIGTERM did not detach"
[ ! -e "/sys/block/${DEV#/dev/}/pid" ] || fail "$DEV is still connected after SIGTERM"

aoe attach --backend nbd e0.0 || fail "attach again"
DEV=/dev/$(record dev)
kill -KILL "$(record pid)"
for _ in $(seq 100); do [ -e "/sys/block/${DEV#/dev/}/pid" ] || break; sleep 0.1; done
[ ! -e "/sys/block/${DEV#/dev/}/pid" ] || fail "$DEV outlived its daemon"
if aoe attach --recover e0.0 2> "$WORK/err"; then fail "--recover of an ioctl device succeeded"; fi
grep -q "ioctl interface" "$WORK/err" || fail "--recover did not say why: $(cat "$WORK/err")"
aoe detach e0.0 || fail "detach after the daemon died"
[ ! -e "$WORK/run/e0.0.json" ] || fail "detach left the record"
echo "NBD-IOCTL OK"
