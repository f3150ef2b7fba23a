# Sourced by vm/'s check scripts (after PY, MTU, BACKEND and AOE_PY are set): a namespace with the
# target's end of a veth pair, a work directory with aoe.py's records and links in it, removed on exit,
# and the helpers the checks share.  vblade serves $IMG as e0.0 (start_vblade); OTHER_PIDS are killed
# on exit too.
command -v vblade > /dev/null || { echo "FAIL: vblade is not installed (apt-get install vblade)"; exit 1; }
NS=aoechk$$; INI=aoeci$$; TGT=aoect$$
WORK=$(mktemp -d /tmp/aoe-attach-check.XXXXXX)
export AOE_IFLIST=$INI AOE_RUN_DIR=$WORK/run AOE_LINK_DIR=$WORK/etherd
RUN=$AOE_RUN_DIR; LINK=$AOE_LINK_DIR/e0.0
IMG=$WORK/e0.0.img
DEADSECS=8

step() { echo "== $* (at $SECONDS s, $(date +%T))"; }
wanted() {  # wanted NAME: the step NAME is not in $SKIP (else say so)
    [[ " ${SKIP:-} " != *" $1 "* ]] && return 0
    echo "== $1: skipped (SKIP=$SKIP)"; return 1
}
fail() {
    echo "FAIL: $* ($(date +%T))"
    for f in "$RUN"/*.json; do [ -e "$f" ] && { echo "--- $f"; cat "$f"; echo; }; done
    ps -eo pid,stat,args | grep "[a]oe.py" || true
    for f in "$RUN"/*.log; do [ -e "$f" ] && { echo "--- $f"; cat "$f"; }; done
    exit 1
}
aoe() { timeout 180 "$PY" "$AOE_PY" "$@"; }
daemon_pid() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$RUN/e0.0.json"; }
# nsenter, not ip netns exec: that gives vblade a mount namespace of its own, holding a copy of
# every filesystem mounted at the time (a umount here would leave the device busy).
start_vblade() { nsenter --net="/run/netns/$NS" vblade "$@" 0 0 "$TGT" "$IMG" >> "$WORK/vblade.log" 2>&1 & VB=$!; sleep 0.3; }
stop_vblade() { kill "$VB"; wait "$VB" 2>/dev/null || true; }
state() { aoe stat --json -w 0.3 | "$PY" -c 'import json,sys; r=[d for d in json.load(sys.stdin) if d["device"]=="e0.0"]; print(r[0]["state"] if r else "none")'; }
wait_state() {  # wait_state WANT SECONDS
    for _ in $(seq $(($2 * 2))); do [ "$(state)" = "$1" ] && return 0; sleep 0.5; done
    fail "e0.0 did not become $1 within $2 s (state $(state))"
}
attach() {
    aoe attach --backend "$BACKEND" --json "$@" > "$WORK/attach.json" || fail "attach $*"
    DEV=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["block_device"])' "$WORK/attach.json")
    for _ in $(seq 50); do [ -b "$DEV" ] && break; sleep 0.1; done
    [ -b "$DEV" ] || fail "$DEV is not a block device after attach"
}
present() {  # the kernel has the device (nbd's nodes stay when unconfigured: it has a server's pid then)
    if [ "$BACKEND" = nbd ]; then [ -e "/sys/block/${1#/dev/}/pid" ]; else [ -e "$1" ]; fi
}
gone() {  # the device, its link and its record are gone
    local t0=$SECONDS
    for _ in $(seq 600); do
        ! present "$DEV" && [ ! -L "$LINK" ] && [ ! -e "$RUN/e0.0.json" ] && break
        sleep 0.1
    done
    echo "gone after $((SECONDS - t0)) s"
    ! present "$DEV" || fail "$DEV still exists"
    [ ! -L "$LINK" ] || fail "$LINK still exists"
    [ ! -e "$RUN/e0.0.json" ] || fail "the record $RUN/e0.0.json is still there"
}
same_as_image() {  # same_as_image OFFSET_MIB LENGTH_MIB: the device's bytes equal vblade's file
    sync
    cmp <(dd if="$DEV" bs=1M skip="$1" count="$2" iflag=direct status=none) \
        <(dd if="$IMG" bs=1M skip="$1" count="$2" status=none) || fail "device and image differ at $1 MiB"
}
FIO=(fio --direct=1 --ioengine=libaio --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0
     --output-format=terse)

cleanup() {
    umount "$WORK/mnt" 2>/dev/null || true
    for f in "$RUN"/*.json; do
        [ -e "$f" ] && kill "$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$f")" 2>/dev/null || true
    done
    for p in ${OTHER_PIDS:-}; do kill "$p" 2>/dev/null || true; done
    sleep 2
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "$NS"
ip link add "$INI" type veth peer name "$TGT" netns "$NS"
ip link set "$INI" mtu "$MTU" up
ip -n "$NS" link set "$TGT" mtu "$MTU" up
