#!/bin/bash
# Inside the VM (vm/run): what newer ublk gives an attached device, or the clear refusal where the
# kernel lacks it.
#   revalidate after the target grew: the device and, after resize2fs, a mounted ext4 see the new size;
#   a shrink below a mounted filesystem is refused; attach --upgrade hands the device to a new daemon
#   while a reader keeps going: no I/O error, the same bytes, a new pid.
# On a kernel without UPDATE_SIZE/QUIESCE (before 6.16) both commands must fail with one clear line.
# Usage: vm/run 'vm/resize-upgrade.sh PYTHON'
set -euo pipefail
PY=${1:?python interpreter}; MTU=9000; BACKEND=ublk
AOE_PY=${AOE_PY:-aoe.py}
. "$(dirname "$0")/lib.sh"
truncate -s 256M "$IMG"
start_vblade -l $((128 << 11))              # export the first 128 MiB of the file
aoe version
attach -v e0.0
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$LINK"   # no writes behind the test's back
# noinit_itable: after an online resize, ext4 would zero the new inode tables in a kernel thread
# that keeps the filesystem alive (and the device busy) for a while after umount.
mkdir -p "$WORK/mnt" && mount -o noinit_itable "$LINK" "$WORK/mnt"
head -c 32M /dev/urandom > "$WORK/mnt/data"
sha256sum "$WORK/mnt/data" > "$WORK/sums"
sync
attached() {  # attached KEY: what stat --json says of e0.0's attached device
    aoe stat --json -w 0.3 | "$PY" -c 'import json,sys; a=[d for d in json.load(sys.stdin) if d["device"]=="e0.0"][0]["attached"][sys.argv[1]]; print(" ".join(a) if isinstance(a, list) else a)' "$1"
}
FEATURES=$(attached features)
echo "features: $FEATURES"

step "revalidate after the target grew to 192 MiB"
stop_vblade; start_vblade -l $((192 << 11))
if [[ " $FEATURES " == *" update-size "* ]]; then
    aoe revalidate e0.0 | tee "$WORK/reval.txt" || fail "revalidate"
    grep -q "resized from 262144 to 393216 sectors" "$WORK/reval.txt" || fail "revalidate did not say so"
    [ "$(blockdev --getsz "$DEV")" = 393216 ] || fail "$DEV has $(blockdev --getsz "$DEV") sectors"
    resize2fs "$LINK" || fail "resize2fs"
    blocks=$(df -k --output=size "$WORK/mnt" | tail -1)
    [ "$blocks" -gt $((150 << 10)) ] || fail "ext4 is $blocks KiB after resize2fs"
    echo "ext4: $blocks KiB"
    [ "$(attached sectors)" = 393216 ] || fail "stat does not show the new size"

    step "a shrink below the mounted filesystem is refused"
    mount -o remount,ro "$WORK/mnt"                    # nothing written while the target is short
    stop_vblade; start_vblade -l $((64 << 11))
    if aoe revalidate e0.0 2> "$WORK/shrink.err"; then fail "revalidate shrank a mounted device"; fi
    cat "$WORK/shrink.err"
    grep -q "refusing" "$WORK/shrink.err" || fail "no clear refusal"
    [ "$(wc -l < "$WORK/shrink.err")" = 1 ] || fail "more than one line of error"
    [ "$(blockdev --getsz "$DEV")" = 393216 ] || fail "$DEV changed size anyway"
    stop_vblade; start_vblade -l $((192 << 11))
    mount -o remount,rw "$WORK/mnt"
else
    if aoe revalidate e0.0 2> "$WORK/reval.err"; then fail "revalidate claimed to resize"; fi
    cat "$WORK/reval.err"
    grep -q "UPDATE_SIZE (Linux 6.16 or later)" "$WORK/reval.err" || fail "no clear message"
    [ "$(blockdev --getsz "$DEV")" = 262144 ] || fail "$DEV changed size"
    stop_vblade; start_vblade -l $((128 << 11))
fi

step "attach --upgrade while a reader runs"
OLD=$(daemon_pid)
# The reader reads the file through the device, uncached, until told to stop (at most 40 times):
# once the stop file appears it reads once more, all of it through whoever serves then.
( for i in $(seq 40); do
      [ -e "$WORK/stop" ] && stopping=1
      echo 3 > /proc/sys/vm/drop_caches
      sha256sum -c --quiet "$WORK/sums" || exit 1
      echo "read $i"
      [ -n "${stopping:-}" ] && break
  done ) > "$WORK/reader.log" 2>&1 &
READER=$!; OTHER_PIDS=$READER
for _ in $(seq 100); do grep -q "read 1" "$WORK/reader.log" && break; sleep 0.2; done
if [[ " $FEATURES " == *" quiesce "* ]]; then
    aoe attach --upgrade e0.0 | tee "$WORK/upgrade.txt" || fail "attach --upgrade"
    NEW=$(daemon_pid)
    [ "$NEW" != "$OLD" ] || fail "the same daemon still serves e0.0"
    ! kill -0 "$OLD" 2>/dev/null || fail "the old daemon $OLD is still running"
    touch "$WORK/stop"
    wait "$READER" || { cat "$WORK/reader.log"; fail "the reader saw an error across the upgrade"; }
    echo "pid $OLD handed e0.0 to pid $NEW; the reader read the file $(grep -c "^read" "$WORK/reader.log") times, no error"
    [ "$(state)" = up ] || fail "e0.0 is $(state) after the upgrade"
else
    if aoe attach --upgrade e0.0 2> "$WORK/upgrade.err"; then fail "attach --upgrade claimed to work"; fi
    cat "$WORK/upgrade.err"
    grep -q "QUIESCE (Linux 6.16 or later)" "$WORK/upgrade.err" || fail "no clear message"
    [ "$(daemon_pid)" = "$OLD" ] || fail "the daemon changed"
    touch "$WORK/stop"
    wait "$READER" || { cat "$WORK/reader.log"; fail "the reader saw an error"; }
fi
(cd "$WORK/mnt" && sha256sum -c --quiet "$WORK/sums") || fail "the data changed"
umount "$WORK/mnt"
e2fsck -fn "$LINK" || fail "e2fsck found errors"
aoe detach e0.0 || fail "detach"
gone
dmesg | grep -E 'Oops|BUG:' && fail "the kernel complained"
echo "RESIZE-UPGRADE OK $(uname -r) features: $FEATURES"
