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
ip netns exec tgt "$PY" aoe.py serve -v 0 1 aoetgt /tmp/export.img > /tmp/serve.log 2>&1 &
. vm/kernel-aoe.sh
# When something fails or hangs, say why: what the driver holds, is serve alive and where its
# threads wait, what it answered and dropped (the kernel's own messages are on the console).
diagnose() {
    echo "--- diagnosis: $1"
    mount -t debugfs none /sys/kernel/debug 2>/dev/null || true
    cat /sys/kernel/debug/aoe/e0.1 2>/dev/null || true
    echo "state $(cat /sys/block/etherd!e0.1/state 2>/dev/null) inflight $(cat /sys/block/etherd!e0.1/inflight 2>/dev/null)"
    for f in /sys/kernel/debug/block/etherd!e0.1/state /sys/kernel/debug/block/etherd!e0.1/hctx0/{state,dispatch,busy}; do
        [ -r "$f" ] && echo "$f: $(cat "$f" 2>/dev/null | head -5)"; done
    for pid in $(ps -eo pid=,stat= | awk '$2 ~ /D/ {print $1}'); do
        echo "blocked: $(cat /proc/$pid/cmdline | tr '\0' ' ')"; cat /proc/$pid/stack 2>/dev/null; done
    for pid in $(pgrep -f "aoe.py serve"); do
        echo "serve pid $pid:"; grep -H . /proc/$pid/task/*/wchan 2>/dev/null; echo; done
    pgrep -f "aoe.py serve" > /dev/null || echo "serve is not running"
    # Nothing asked of serve (no frame outstanding, no answer being completed) and serve alive: the
    # stall is the driver's own, and the test may say so and run again (it does, once).
    outstanding=$(awk -F: 'NF == 4 && $1 ~ /^[0-9a-f]+$/ {n += $2} END {print n + 0}' /sys/kernel/debug/aoe/e0.1 2>/dev/null)
    refs=$(awk '/^ref:/ {print $2}' /sys/kernel/debug/aoe/e0.1 2>/dev/null)
    if [ "$outstanding" = 0 ] && [ "$refs" = 0 ] && pgrep -f "aoe.py serve" > /dev/null; then
        echo "KERNEL DRIVER STALLED: no frame outstanding, none being completed, serve alive"; fi
    pkill -TERM -f "aoe.py serve" && sleep 2     # serve -v reports what it answered and dropped
    tail -20 /tmp/serve.log
}
# Stuck for 300 s (a run takes well under a minute): say why, then end the script (the blocked
# command may never return).
( sleep 300; diagnose "KERNEL-AOE-VS-SERVE STUCK after 300 s"; kill -TERM $$ ) &
watchdog=$!
trap 'rc=$?; kill $watchdog 2>/dev/null; [ $rc = 0 ] || diagnose "exit $rc"; ip netns del tgt 2>/dev/null || true' EXIT
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
