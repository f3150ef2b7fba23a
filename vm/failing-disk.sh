# Sourced by vm/failing-disk-check.sh and bench/vm-rescue.sh, after vm/lib.sh, with SIZE_MIB, SCATTERED,
# AREAS, SLOW and DELAY_MS set.  make_failing_disk: a disk made with device-mapper — a loop device over
# random data ($DATA) with dm-error segments: SCATTERED single bad sectors (some side by side) and AREAS
# of 128 (listed in $WORK/injected) — exported as e0.0 by vblade -d (O_DIRECT: a bad sector fails only
# the reads that touch it).  slow_sectors_too adds SLOW more behind dm-delay ($WORK/slow), failing after
# DELAY_MS as a disk retrying a sector does.  checked NAME IMAGE MAP: a rescue's result checked.
for tool in ddrescue ddrescuelog dmsetup losetup; do
    command -v $tool > /dev/null || fail "$tool is not installed (apt-get install gddrescue dmsetup util-linux)"
done
export DM_DISABLE_UDEV=1                 # no udev in the VM: dmsetup makes the nodes itself
DISK=aoebad$$; ERRDEV=aoeerr$$; LOOP=
DATA=$WORK/disk.data
disk_cleanup() {
    [ -z "${VB:-}" ] || stop_vblade
    dmsetup remove "$DISK" 2>/dev/null || true
    dmsetup remove "$ERRDEV" 2>/dev/null || true
    [ -z "$LOOP" ] || losetup -d "$LOOP" 2>/dev/null || true
    cleanup
}
trap disk_cleanup EXIT
elapsed() { awk -v t0="$1" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }'; }

make_failing_disk() {  # two tables: table.fast, and table.slow with the slow sectors too
    "$PY" - "$WORK" $((SIZE_MIB << 11)) "$SCATTERED" "$AREAS" "$SLOW" <<'EOF'
import random, sys
work, sectors, scattered, areas, slow = sys.argv[1], *map(int, sys.argv[2:])
rng = random.Random(sectors + scattered)
bad = set()
for _ in range(areas):
    start = rng.randrange(sectors - 256) // 8 * 8 + 3
    bad.update(range(start, start + 128))
while len(bad) < areas * 128 + scattered:
    s = rng.randrange(sectors - 1)
    bad.update([s, s + 1] if rng.random() < 0.1 else [s])
start = rng.randrange(sectors // 2, sectors - slow)
while bad & set(range(start - 8, start + slow + 8)):
    start += 16
slow_set = set(range(start, start + slow))
def kind(s, delayed, unreadable):
    return "slow" if s in delayed else "bad" if s in unreadable else "good"
def table(unreadable, delayed):
    lines, s = [], 0
    while s < sectors:
        e = s + 1
        while e < sectors and kind(e, delayed, unreadable) == kind(s, delayed, unreadable):
            e += 1
        lines.append("%d %d %s" % (s, e - s, {"good": "linear LOOP %d" % s, "bad": "error",
                                               "slow": "delay ERRDEV 0 DELAY"}[kind(s, delayed, unreadable)]))
        s = e
    return "\n".join(lines) + "\n"
open(work + "/injected", "w").write("".join("%d\n" % s for s in sorted(bad)))
open(work + "/slow", "w").write("".join("%d\n" % s for s in sorted(slow_set)))
open(work + "/table.fast", "w").write(table(bad, set()))
open(work + "/table.slow", "w").write(table(bad, slow_set))
EOF
    head -c "${SIZE_MIB}M" /dev/urandom > "$DATA"
    LOOP=$(losetup -f --show "$DATA")
    dmsetup create "$ERRDEV" --table "0 $SLOW error"
    sed -i "s|LOOP|$LOOP|; s|ERRDEV|/dev/mapper/$ERRDEV|; s|DELAY|$DELAY_MS|" "$WORK/table.fast" "$WORK/table.slow"
    dmsetup create "$DISK" < "$WORK/table.fast"
    IMG=/dev/mapper/$DISK
    echo "disk: $SIZE_MIB MiB, $(wc -l < "$WORK/injected") bad sectors in $(grep -c error "$WORK/table.fast") areas"
    start_vblade -d
    OTHER_PIDS=$VB
}

slow_sectors_too() {  # the slow sectors as well, from now on ($WORK/all-bad lists every bad sector)
    dmsetup suspend "$DISK"; dmsetup load "$DISK" < "$WORK/table.slow"; dmsetup resume "$DISK"
    sort -n "$WORK/injected" "$WORK/slow" > "$WORK/all-bad"
}

checked() {  # checked NAME IMAGE MAP [BAD-LIST]: the map's bad sectors are exactly BAD-LIST ($WORK/injected),
    # nothing else is left and the image holds the disk's bytes everywhere else
    ddrescuelog -l- -b512 "$3" > "$WORK/$1.bad"
    cmp -s "$WORK/$1.bad" "${4:-$WORK/injected}" \
        || fail "$1: bad sectors differ from the injected ones: $(diff "$WORK/$1.bad" "${4:-$WORK/injected}" | head -c 600)"
    [ "$(ddrescuelog '-l?*/' -b512 "$3" | wc -l)" = 0 ] \
        || fail "$1: the map has untried, untrimmed or unscraped sectors"
    "$PY" - "$DATA" "$2" "$WORK/$1.bad" <<'EOF' || fail "$1: the image differs from the disk outside its bad sectors"
import sys
data, image, bad = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read(), sys.argv[3]
bad = set(int(line) for line in open(bad))
assert len(image) >= len(data), (len(image), len(data))
wrong = [s for s in range(len(data) // 512) if s not in bad and data[s * 512:(s + 1) * 512] != image[s * 512:(s + 1) * 512]]
assert not wrong, (len(wrong), wrong[:10])
EOF
    echo "$1: $(wc -l < "$WORK/$1.bad") bad sectors, every other one rescued with the disk's bytes"
}
