#!/bin/bash
# Inside the VM (vm/run): a failing disk made with device-mapper, under vblade (vm/failing-disk.sh).
# `aoe.py rescue` beside GNU ddrescue -d over `aoe.py attach` (ublk) and over the kernel's aoe driver:
# the same bad sectors (exactly the injected ones) and the same readable bytes (those of the disk).
# Then slow bad sectors: a rescue interrupted while vblade works off its reads of them, and one started
# right after, which waits for the busy target instead of calling it absent, and ends with the right map.
# Usage: vm/run 'vm/failing-disk-check.sh PYTHON'.  Knobs: SIZE_MIB (16), SCATTERED (24 single bad
# sectors), AREAS (2 bad 64 KiB areas), SLOW (16 slow bad sectors), DELAY_MS (2000), SKIP (of the steps
# rescue, attach, kernel, slow).
set -euo pipefail
PY=${1:?python interpreter}; MTU=9000; BACKEND=ublk
AOE_PY=${AOE_PY:-aoe.py}
SIZE_MIB=${SIZE_MIB:-16}; SCATTERED=${SCATTERED:-24}; AREAS=${AREAS:-2}; SLOW=${SLOW:-16}; DELAY_MS=${DELAY_MS:-2000}
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/kernel-aoe.sh"
. "$(dirname "$0")/failing-disk.sh"
make_failing_disk

if wanted rescue; then
step "aoe.py rescue"
t0=$(date +%s.%N)
st=0; aoe rescue e0.0 "$WORK/rescue.img" "$WORK/rescue.map" > "$WORK/rescue.txt" 2>&1 || st=$?
echo "rescue: exit $st in $(elapsed "$t0") s"
[ "$st" = 1 ] || fail "rescue ended with $st, not 1 (bad sectors remain): $(cat "$WORK/rescue.txt")"
checked rescue "$WORK/rescue.img" "$WORK/rescue.map"
rm -f "$WORK/rescue.img"
fi

if wanted attach; then
step "GNU ddrescue -d over aoe.py attach ($BACKEND)"
attach e0.0
t0=$(date +%s.%N)
ddrescue -q -d -b512 "$DEV" "$WORK/attach.img" "$WORK/attach.map" || fail "ddrescue over $DEV failed"
echo "ddrescue over attach: $(elapsed "$t0") s"
[ "$(state)" = up ] || fail "e0.0 is $(state) after ddrescue"
checked attach "$WORK/attach.img" "$WORK/attach.map"
rm -f "$WORK/attach.img"
aoe detach e0.0 || fail "detach"
gone
fi

if wanted kernel; then
step "GNU ddrescue -d over the kernel's aoe driver"
kernel_aoe_attach "$INI" e0.0 || fail "the kernel's aoe driver did not find e0.0"
t0=$(date +%s.%N)
ddrescue -q -d -b512 /dev/etherd/e0.0 "$WORK/kernel.img" "$WORK/kernel.map" || fail "ddrescue over aoe.ko failed"
echo "ddrescue over aoe.ko: $(elapsed "$t0") s"
rmmod aoe
checked kernel "$WORK/kernel.img" "$WORK/kernel.map"
rm -f "$WORK/kernel.img"
fi

wanted slow || exit 0
step "slow bad sectors: $SLOW more fail after $DELAY_MS ms each"
slow_sectors_too
# started as itself, not through a function: $! is its pid (a background job ignores SIGINT: TERM
# interrupts rescue the same way)
"$PY" "$AOE_PY" rescue -v e0.0 "$WORK/slow.img" "$WORK/slow.map" > "$WORK/slow1.txt" 2>&1 & R=$!
# interrupted once its map says scraping: the slow area's middle is asked for then, all at once, and
# vblade fails those reads one at a time, DELAY_MS each
phase() { grep -v '^#' "$WORK/slow.map" 2>/dev/null | head -1 | awk '{print $2}'; }
t0=$(date +%s.%N)
for _ in $(seq 600); do
    kill -0 $R 2>/dev/null || break
    [ "$(phase)" = / ] && break
    sleep 0.2
done
kill -TERM $R 2>/dev/null || fail "rescue ended before it reached the slow sectors: $(cat "$WORK/slow1.txt")"
st=0; wait $R || st=$?
echo "first run interrupted after $(elapsed "$t0") s in scraping: exit $st"
[ "$st" = 130 ] || fail "the interrupted rescue ended with $st, not 130: $(cat "$WORK/slow1.txt")"
t0=$(date +%s.%N)
st=0; aoe rescue e0.0 "$WORK/slow.img" "$WORK/slow.map" > "$WORK/slow2.txt" 2>&1 || st=$?
echo "second run: exit $st in $(elapsed "$t0") s; it said: $(head -c 300 "$WORK/slow2.txt")"
[ "$st" = 1 ] || fail "the second rescue ended with $st: $(cat "$WORK/slow2.txt")"
grep -q "no answer yet; asking again" "$WORK/slow2.txt" \
    || fail "the second rescue did not find vblade busy (the check did not test waiting)"
checked slow "$WORK/slow.img" "$WORK/slow.map" "$WORK/all-bad"
echo "FAILING-DISK-CHECK OK"
