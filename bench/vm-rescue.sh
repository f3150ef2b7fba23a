#!/bin/bash
# Rescuing a failing disk, side by side in one boot: a device-mapper disk with unreadable sectors under
# vblade -d (vm/failing-disk.sh), imaged by
#   aoe.py rescue (its defaults),
#   GNU ddrescue (its defaults), and ddrescue -d -r1 (direct, sector by sector, one retry pass),
#     each over aoe.py attach (ublk) and over the kernel's aoe driver.
# One row per run: wall time; bad sectors in the final map; of those, how many were readable (lost to a
# coarser granularity); sectors left untried; sectors whose bytes in the image differ from the disk's.
# Usage (from the checkout): vm/run '[ROUNDS=2] [SIZE_MIB=256 SCATTERED=1000 AREAS=4] bench/vm-rescue.sh PYTHON'
set -euo pipefail
PY=${1:?python interpreter}; MTU=9000; BACKEND=ublk; AOE_PY=aoe.py
ROUNDS=${ROUNDS:-2}; SIZE_MIB=${SIZE_MIB:-256}; SCATTERED=${SCATTERED:-1000}; AREAS=${AREAS:-4}
SLOW=1; DELAY_MS=1                       # (no slow sectors here)
. vm/lib.sh
. vm/kernel-aoe.sh
. vm/failing-disk.sh
make_failing_disk

row() {  # row NAME SECONDS MAP IMAGE
    ddrescuelog -l- -b512 "$3" > "$WORK/row.bad"
    ddrescuelog '-l?*/' -b512 "$3" > "$WORK/row.left"
    "$PY" - "$@" "$DATA" "$WORK/injected" "$WORK/row.bad" "$WORK/row.left" <<'EOF'
import sys
name, secs, _, image, data, injected, bad, left = sys.argv[1:]
sectors = lambda path: set(int(line) for line in open(path))
injected, bad, left = sectors(injected), sectors(bad), sectors(left)
data, got = open(data, "rb").read(), open(image, "rb").read()
wrong = sum(1 for s in range(len(data) // 512) if s not in bad and s not in left
            and data[s * 512:(s + 1) * 512] != got[s * 512:(s + 1) * 512])
print("%-24s %8s s %7d bad %7d readable %7d left %7d wrong" % (name, secs, len(bad), len(bad - injected),
                                                              len(left), wrong))
EOF
}
timed() {  # timed NAME COMMAND...: run it into $WORK/img and $WORK/map (made afresh), then its row
    local name=$1 t0 st=0; shift
    rm -f "$WORK/img" "$WORK/map"
    t0=$(date +%s.%N)
    "$@" "$WORK/img" "$WORK/map" > "$WORK/run.txt" 2>&1 || st=$?
    [ "$st" -le 1 ] || fail "$name ended with $st: $(tail -5 "$WORK/run.txt")"
    row "$name" "$(elapsed "$t0")" "$WORK/map" "$WORK/img"
}

echo "$(wc -l < "$WORK/injected") bad sectors injected; $(nproc) vCPUs; $(uname -r)"
for round in $(seq "$ROUNDS"); do
    step "round $round"
    timed "aoe.py rescue" "$PY" "$AOE_PY" rescue e0.0
    attach e0.0
    timed "ddrescue, attach" ddrescue -q "$DEV"
    timed "ddrescue -d -r1, attach" ddrescue -q -d -r1 "$DEV"
    aoe detach e0.0 || fail "detach"
    gone
    kernel_aoe_attach "$INI" e0.0 || fail "the kernel's aoe driver did not find e0.0"
    timed "ddrescue, aoe.ko" ddrescue -q /dev/etherd/e0.0
    timed "ddrescue -d -r1, aoe.ko" ddrescue -q -d -r1 /dev/etherd/e0.0
    rmmod aoe
done
