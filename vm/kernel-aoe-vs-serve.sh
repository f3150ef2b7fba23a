#!/bin/bash
# Inside the VM (vm/run): the kernel's own aoe driver as the initiator against
# `aoe.py serve`: mkfs.ext4 + e2fsck -fn clean, and fio writes verified with crc32c.
# Usage: vm/run 'vm/kernel-aoe-vs-serve.sh PYTHON MTU'
set -euo pipefail
PY=${1:?python interpreter}; MTU=${2:-1500}
ip netns add tgt
trap 'ip netns del tgt 2>/dev/null || true' EXIT
ip link add aoeini type veth peer name aoetgt netns tgt
ip link set aoeini mtu "$MTU" up
ip -n tgt link set aoetgt mtu "$MTU" up
truncate -s 256M /tmp/export.img
ip netns exec tgt "$PY" aoe.py serve 0 1 aoetgt /tmp/export.img > /tmp/serve.log 2>&1 &
. vm/kernel-aoe.sh
# If I/O hangs, say why before the harness's timeout: is serve alive, what it logged, what the driver holds.
( sleep 300; echo "KERNEL-AOE-VS-SERVE STUCK after 300 s"; pgrep -af "aoe.py serve" || echo "serve is not running"
  tail -20 /tmp/serve.log; mount -t debugfs none /sys/kernel/debug 2>/dev/null
  cat /sys/kernel/debug/aoe/e0.1 2>/dev/null; dmesg | tail -30 ) &
watchdog=$!
trap 'kill $watchdog 2>/dev/null; ip netns del tgt 2>/dev/null || true' EXIT
kernel_aoe_attach aoeini e0.1 || { echo "e0.1 did not appear"; cat /tmp/serve.log; exit 1; }
echo "kernel aoe sees: $(cat /sys/block/etherd!e0.1/size) sectors, payload $(cat /sys/block/etherd!e0.1/payload)"
mkfs.ext4 -q -F /dev/etherd/e0.1
mkdir -p /tmp/mnt && mount /dev/etherd/e0.1 /tmp/mnt
for i in 1 2 3 4; do head -c 4M /dev/urandom > /tmp/mnt/f$i; done
sha256sum /tmp/mnt/f* > /tmp/sums
umount /tmp/mnt
e2fsck -fn /dev/etherd/e0.1
mount /dev/etherd/e0.1 /tmp/mnt && (cd /tmp/mnt && sha256sum -c --quiet /tmp/sums) && umount /tmp/mnt
fio --name=verify --filename=/dev/etherd/e0.1 --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite \
    --bs=4k --offset=128M --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --output-format=terse >/dev/null
echo "KERNEL-AOE-VS-SERVE OK mtu $MTU"
