#!/bin/bash
# Inside the VM (vm/run): _aoeio's ublk plumbing under a real block device, served from RAM by
# vm/ublk-ramdisk.py: mkfs.ext4 + e2fsck -fn clean, fio writes verified with crc32c, and a clean
# stop on SIGTERM that removes the device.
# Usage: vm/run 'vm/ublk-check.sh PYTHON'
set -euo pipefail
PY=${1:?python interpreter}
"$PY" vm/ublk-ramdisk.py 256 > /tmp/ramdisk.log 2>&1 &
SRV=$!
trap 'kill $SRV 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    grep -q '^READY' /tmp/ramdisk.log && break
    kill -0 $SRV 2>/dev/null || break
    sleep 0.1
done
grep -q '^READY' /tmp/ramdisk.log || { echo "the RAM disk did not start"; cat /tmp/ramdisk.log; exit 1; }
DEV=/dev/ublkb$(sed -n 's/^READY \([0-9]*\).*/\1/p' /tmp/ramdisk.log)
for _ in $(seq 50); do [ -b "$DEV" ] && break; sleep 0.1; done
echo "$DEV: $(blockdev --getsize64 "$DEV") bytes"
mkfs.ext4 -q -F "$DEV"
mkdir -p /tmp/mnt && mount "$DEV" /tmp/mnt
for i in 1 2 3 4; do head -c 4M /dev/urandom > /tmp/mnt/f$i; done
sha256sum /tmp/mnt/f* > /tmp/sums
umount /tmp/mnt
e2fsck -fn "$DEV"
mount "$DEV" /tmp/mnt && (cd /tmp/mnt && sha256sum -c --quiet /tmp/sums) && umount /tmp/mnt
fio --name=verify --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite \
    --bs=4k --offset=128M --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
    --output-format=terse >/dev/null
kill -TERM $SRV
wait $SRV
trap - EXIT
cat /tmp/ramdisk.log
for _ in $(seq 50); do [ -e "$DEV" ] || break; sleep 0.1; done
[ ! -e "$DEV" ] || { echo "$DEV is still there after the server stopped"; exit 1; }
echo "UBLK-CHECK OK"
