#!/bin/bash
# Inside the VM (vm/run): a lossy, jittery, reordering link (netem on the target's side) between
# vblade and, in turn, the kernel's aoe driver and `aoe.py attach`: fio random writes verified
# with crc32c on each, and their rates side by side (same boot, same vblade, same netem); and
# aoetools' aoe-stat over the kernel driver beside aoe.py's drop-in aoe-stat over its own device.
# Usage: vm/run 'vm/netem-vs-kernel.sh PYTHON MTU [SIZE] [NETEM...]'
#   default SIZE 64M, NETEM "loss 5% duplicate 1% delay 1ms 1ms reorder 10%"
set -euo pipefail
PY=${1:?python interpreter}; MTU=${2:-9000}; SIZE=${3:-64M}; shift 3 || shift $#
NETEM=("$@"); [ ${#NETEM[@]} -gt 0 ] || NETEM=(loss 5% duplicate 1% delay 1ms 1ms reorder 10%)
IMG=/tmp/netem.img
export AOE_IFLIST=aoeini AOE_RUN_DIR=/tmp/aoe-run AOE_LINK_DIR=/tmp/aoe-etherd
. vm/kernel-aoe.sh
ip netns add tgt
trap 'ip netns del tgt 2>/dev/null || true' EXIT
ip link add aoeini type veth peer name aoetgt netns tgt
ip link set aoeini mtu "$MTU" up
ip -n tgt link set aoetgt mtu "$MTU" up
truncate -s 256M "$IMG"
ip netns exec tgt vblade 0 0 aoetgt "$IMG" > /tmp/vblade.log 2>&1 &
ip netns exec tgt tc qdisc add dev aoetgt root netem "${NETEM[@]}"
echo "netem on the target side: ${NETEM[*]}"

fio_verify() {  # fio_verify DEVICE WHO: 64k random writes at queue depth 16, verified; prints the rate
    fio --name=netem --filename="$1" --direct=1 --ioengine=libaio --rw=randwrite --bs=64k --iodepth=16 \
        --offset=64M --size="$SIZE" --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
        --output-format=json > /tmp/fio-$2.json || { echo "NETEM FAIL: fio verify on $2"; exit 1; }
    "$PY" -c 'import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
print("%s: randwrite 64k qd16 %.1f MB/s, verify errors %d" % (sys.argv[2], job["write"]["bw_bytes"] / 1e6,
      job["error"]))' /tmp/fio-$2.json "$2"
}

kernel_aoe_attach aoeini e0.0 || { echo "NETEM FAIL: the kernel driver did not find e0.0"; exit 1; }
fio_verify /dev/etherd/e0.0 kernel
aoe-stat > /tmp/aoe-stat.kernel || { echo "NETEM FAIL: aoe-stat over the kernel driver"; exit 1; }
rmmod aoe

DEV=$("$PY" aoe.py attach --json e0.0 | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["block_device"])')
fio_verify "$DEV" aoe.py
"$PY" aoe.py links /tmp/aoe-bin > /dev/null
/tmp/aoe-bin/aoe-stat > /tmp/aoe-stat.ours || { echo "NETEM FAIL: aoe.py's aoe-stat"; exit 1; }
echo "aoe-stat, kernel driver: $(cat /tmp/aoe-stat.kernel)"
echo "aoe-stat, aoe.py:        $(cat /tmp/aoe-stat.ours)"
cmp /tmp/aoe-stat.kernel /tmp/aoe-stat.ours || { echo "NETEM FAIL: the two aoe-stat lines differ"; exit 1; }
kill -USR1 "$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' $AOE_RUN_DIR/e0.0.json)"
sleep 1
"$PY" aoe.py detach e0.0 > /dev/null
sed -n '/state up/,$p' $AOE_RUN_DIR/e0.0.log | head -8
echo "NETEM OK mtu $MTU"
