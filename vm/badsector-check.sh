#!/bin/bash
# Inside the VM (vm/run): `aoe.py attach` on a target with unreadable sectors (aoe.py serve --fault-bad),
# through ublk and through nbd in turn.  Only the requests that touch them fail, with the data before them
# kept: a whole-device read stops at the first; a buffered read stops exactly there (the page cache reads
# page by page after a failure); ublk completes a failed READ up to its first failed frame and the kernel
# sends the rest again, so its I/O error names the bad sector (nbd's names the request's start).  The
# device stays up and writable.  GNU ddrescue -d -b512 over each device and `aoe.py rescue` over the target
# map exactly the injected sectors.
# Usage: vm/run 'vm/badsector-check.sh PYTHON', or as root on a machine with ublk and nbd (then everything
# it makes is its own: namespace, veth pair, work directory, aoe.py's records and links).
set -euo pipefail
PY=${1:?python interpreter}; MTU=9000; BACKEND=ublk
AOE_PY=${AOE_PY:-aoe.py}
. "$(dirname "$0")/lib.sh"
for tool in ddrescue ddrescuelog; do
    command -v $tool > /dev/null || fail "$tool is not installed (apt-get install gddrescue)"
done
# 64 MiB; the first bad sector is page-aligned and 50 frames (17 sectors at MTU 9000) into the request
# that starts at READ_AT; one 64 KiB area (128 sectors); the others odd and even.
FIRST=10000; READ_AT=$((FIRST - 50 * 17))
BAD="$FIRST, 30001, 50000+128, 90000, 120001"
head -c 64M /dev/urandom > "$IMG"
ip netns exec "$NS" "$PY" "$AOE_PY" serve --fault-bad "$BAD" 0 0 "$TGT" "$IMG" >> "$WORK/serve.log" 2>&1 &
OTHER_PIDS=$!
sleep 1
"$PY" - "$BAD" > "$WORK/injected" <<'EOF'
import sys
for part in sys.argv[1].split(","):
    first, _, count = part.partition("+")
    for sector in range(int(first), int(first) + int(count or 1)):
        print(sector)
EOF

read_at() {  # read_at MODE SECTOR BYTES ...: each pread's byte count or errno (MODE: direct or buffered); the
    "$PY" - "$DEV" "$WORK/read.bin" "$@" <<'EOF'   # first one's data in $WORK/read.bin
import errno, mmap, os, sys
dev, out, reads = sys.argv[1], sys.argv[2], sys.argv[3:]
said = []
for i in range(0, len(reads), 3):
    mode, sector, length = reads[i], int(reads[i + 1]), int(reads[i + 2])
    fd = os.open(dev, os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0))
    buf = mmap.mmap(-1, length)                  # page-aligned, as O_DIRECT needs
    try:
        n = os.preadv(fd, [buf], sector * 512)
        said.append(str(n))
        if not i:
            with open(out, "wb") as f:
                f.write(buf[:n])
    except OSError as e:
        said.append(errno.errorcode[e.errno])
    os.close(fd)
print(" ".join(said))
EOF
}
elapsed() { awk -v t0="$1" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }'; }
io_errors() { dmesg | grep -o "I/O error, dev ${DEV#/dev/}, sector [0-9]*" | awk '{print $NF}' | sort -un | tr '\n' ' '; }

for BACKEND in ublk nbd; do
    step "$BACKEND: attach"
    attach e0.0
    PID=$(daemon_pid)
    dmesg -C

    step "$BACKEND: dd of the whole device fails at the first bad sector; the good areas read as the image"
    if dd if="$DEV" of="$WORK/whole.bin" bs=1M iflag=direct 2> "$WORK/dd.txt"; then
        fail "dd of the whole device succeeded"
    fi
    grep -q "^$((FIRST * 512 >> 20))+0 records in" "$WORK/dd.txt" || fail "dd: $(cat "$WORK/dd.txt")"
    cmp "$WORK/whole.bin" <(head -c $((FIRST * 512 >> 20 << 20)) "$IMG") || fail "what dd read differs"
    same_as_image 0 4
    same_as_image 30 8
    same_as_image 60 4

    step "$BACKEND: 1 MiB reads at sector $READ_AT, $((FIRST - READ_AT)) before the first bad one"
    blockdev --flushbufs "$DEV"
    got=$(read_at buffered "$READ_AT" $((1 << 20)) buffered "$FIRST" 4096)
    echo "buffered: $got"
    [ "$got" = "$(((FIRST - READ_AT) * 512)) EIO" ] \
        || fail "buffered reads gave $got, not the bytes up to sector $FIRST, then EIO from it"
    cmp "$WORK/read.bin" <(tail -c +$((READ_AT * 512 + 1)) "$IMG" | head -c $(((FIRST - READ_AT) * 512))) \
        || fail "the short read's data differ"
    dmesg -C
    got=$(read_at direct "$READ_AT" $((1 << 20)))
    echo "direct: $got; the kernel's I/O errors at sectors: $(io_errors)"
    [ "$got" = EIO ] || fail "a direct read across sector $FIRST gave $got"
    if [ "$BACKEND" = ublk ]; then     # completed up to the bad frame, the rest sent again and failed
        [ "$(io_errors)" = "$FIRST " ] || fail "the kernel's I/O error is not at sector $FIRST: $(io_errors)"
        grep -q "a read at sector $READ_AT, completed up to $FIRST" "$RUN/e0.0.log" \
            || fail "the daemon did not complete the read up to sector $FIRST"
    else                               # nbd fails the whole request
        [ "$(io_errors)" = "$READ_AT " ] || fail "nbd's I/O error is not at the request's start: $(io_errors)"
    fi

    step "$BACKEND: writes elsewhere work, the device stays up, the daemon alive"
    head -c 1M /dev/urandom > "$WORK/new.bin"
    dd if="$WORK/new.bin" of="$DEV" bs=1M seek=40 oflag=direct status=none || fail "a write failed"
    cmp <(dd if="$DEV" bs=1M skip=40 count=1 iflag=direct status=none) "$WORK/new.bin" || fail "read back differs"
    cmp <(dd if="$IMG" bs=1M skip=40 count=1 status=none) "$WORK/new.bin" || fail "the target does not hold the write"
    [ "$(state)" = up ] || fail "e0.0 is $(state) after read errors"
    kill -0 "$PID" || fail "the daemon died"

    step "$BACKEND: ddrescue -d -b512"
    rm -f "$WORK/dr.img" "$WORK/dr.map"
    t0=$(date +%s.%N)
    ddrescue -q -d -b512 "$DEV" "$WORK/dr.img" "$WORK/dr.map" || fail "ddrescue failed"
    echo "$BACKEND: ddrescue took $(elapsed "$t0") s"
    ddrescuelog -l- -b512 "$WORK/dr.map" > "$WORK/ddrescue-$BACKEND"
    cmp "$WORK/ddrescue-$BACKEND" "$WORK/injected" \
        || fail "ddrescue's bad sectors: $(tr '\n' ' ' < "$WORK/ddrescue-$BACKEND" | head -c 600)"
    [ "$(state)" = up ] || fail "e0.0 is $(state) after ddrescue"
    kill -0 "$PID" || fail "the daemon died during ddrescue"
    grep -c ": cannot read\|ABRT\|aborted" "$RUN/e0.0.log" | sed "s/^/$BACKEND: failures logged: /" || true
    aoe detach e0.0 || fail "detach"
    gone
done

step "aoe.py rescue over the same target"
t0=$(date +%s.%N)
aoe rescue e0.0 "$WORK/rescue.img" "$WORK/rescue.map" > "$WORK/rescue.txt" 2>&1 || true
echo "rescue took $(elapsed "$t0") s"
ddrescuelog -l- -b512 "$WORK/rescue.map" > "$WORK/rescue-bad"
cmp "$WORK/rescue-bad" "$WORK/ddrescue-ublk" || fail "rescue's bad sectors differ from ddrescue's: $(cat "$WORK/rescue.txt")"
cmp "$WORK/dr.img" "$WORK/rescue.img" || fail "ddrescue's and rescue's images differ"
echo "bad sectors: $(wc -l < "$WORK/injected") injected, the same $(wc -l < "$WORK/rescue-bad") found by ddrescue (ublk, nbd) and rescue"
echo "BADSECTOR-CHECK OK"
