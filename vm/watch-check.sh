#!/bin/bash
# Inside the VM (vm/run): every target as a device, as the kernel driver makes them, and the way
# systemd runs aoe.py.
#   attach --all PATTERN attaches the matching targets only; attach --all then the rest, skipping
#   attached ones; attach --all --watch (NOTIFY_SOCKET as systemd sets it) says READY=1 once the
#   targets there are attached (taking back a device whose daemon was killed), attaches a target
#   that starts later, and detaches one that stays
#   down (--flush-down); stopping it as systemd stops a unit (SIGTERM to every process of the
#   service) detaches them all; attach --foreground eX.Y (the aoe@ unit's ExecStart) says READY=1
#   once its device is there, STOPPING=1 on SIGTERM, and detaches.
# Usage: vm/run 'vm/watch-check.sh PYTHON'
set -euo pipefail
PY=${1:?python interpreter}; MTU=1500; BACKEND=ublk
AOE_PY=${AOE_PY:-aoe.py}
. "$(dirname "$0")/lib.sh"
VBS=()
serve_target() {  # serve_target SHELF SLOT: vblade exports a 64 MiB image of its own
    truncate -s 64M "$WORK/e$1.$2.img"
    nsenter --net="/run/netns/$NS" vblade "$1" "$2" "$TGT" "$WORK/e$1.$2.img" >> "$WORK/vblade.log" 2>&1 &
    VBS+=($!); OTHER_PIDS="${VBS[*]}"
}
attached() { aoe stat --json -w 0.3 2> "$WORK/stat.err" | "$PY" -c 'import json,sys; print(" ".join(sorted(d["device"] for d in json.load(sys.stdin) if d.get("attached") and d["state"] == "up")))'; }
wait_attached() {  # wait_attached "eX.Y ..." SECONDS
    for _ in $(seq $(($2 * 2))); do [ "$(attached)" = "$1" ] && return 0; sleep 0.5; done
    [ -e "$WORK/watch.log" ] && { echo "--- attach --all --watch:"; cat "$WORK/watch.log"; }
    echo "--- stat:"; aoe stat -w 0.3 || true; cat "$WORK/stat.err"
    fail "attached: '$(attached)', wanted '$1' within $2 s"
}
NOTIFY=$WORK/notify.sock
"$PY" -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(sys.argv[1])
with open(sys.argv[2], "a") as log:
    while True:
        log.write(s.recv(4096).decode().replace("\n", " | ") + "\n"); log.flush()' "$NOTIFY" "$WORK/notify.log" &
OTHER_PIDS="${OTHER_PIDS:-} $!"
notified() {  # notified WORD SECONDS: the service manager was told WORD (READY=1, STOPPING=1)
    for _ in $(seq $(($2 * 10))); do grep -q "$1" "$WORK/notify.log" 2>/dev/null && return 0; sleep 0.1; done
    fail "no $1 within $2 s"
}
serve_target 1 1; serve_target 1 2; serve_target 2 1
sleep 0.5

step "attach --all 'e1.*', then attach --all"
aoe attach --all 'e1.*' | tee "$WORK/all1.txt"
[ "$(grep -c ' is e1\.' "$WORK/all1.txt")" = 2 ] || fail "attach --all 'e1.*' did not attach e1.1 and e1.2"
wait_attached "e1.1 e1.2" 10
aoe attach --all | tee "$WORK/all2.txt"
[ "$(grep -c ' is e' "$WORK/all2.txt")" = 1 ] && grep -q ' is e2\.1 ' "$WORK/all2.txt" || fail "the second attach --all"
wait_attached "e1.1 e1.2 e2.1" 10
if aoe attach --all 'e9.*' 2> "$WORK/none.err"; then fail "attach --all of nothing succeeded"; fi
grep -q "no AoE target matched e9" "$WORK/none.err" || fail "no clear message"
for d in e1.1 e1.2 e2.1; do aoe detach "$d" > /dev/null || fail "detach $d"; done
wait_attached "" 10

step "e2.1's daemon killed: a device left for the watch to take back"
aoe attach e2.1 > /dev/null || fail "attach e2.1"
E21=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$RUN/e2.1.json")
kill -KILL "$E21"
for _ in $(seq 50); do kill -0 "$E21" 2> /dev/null || break; sleep 0.1; done

step "attach --all --watch, as aoe-all.service runs it"
NOTIFY_SOCKET=$NOTIFY timeout 600 "$PY" "$AOE_PY" attach --all --watch --interval 2 --flush-down 4 --deadsecs 4 \
    > "$WORK/watch.log" 2>&1 &
WATCH=$!; OTHER_PIDS="${OTHER_PIDS:-} $WATCH"
notified READY=1 90                            # after taking e2.1 back: the kernel first quiesces it
wait_attached "e1.1 e1.2 e2.1" 10
echo "READY=1 with $(attached) attached"
grep -q "recovered /dev/" "$RUN/e2.1.log" || fail "the watch did not take e2.1 back"
serve_target 3 1
t0=$SECONDS; wait_attached "e1.1 e1.2 e2.1 e3.1" 15
echo "e3.1 started later: attached after $((SECONDS - t0)) s"
kill "${VBS[1]}"                               # e1.2's target goes away; a read finds out
dd if="$(readlink "$AOE_LINK_DIR/e1.2")" of=/dev/null bs=4k count=1 iflag=direct 2> /dev/null &
t0=$SECONDS; wait_attached "e1.1 e2.1 e3.1" 40
for _ in $(seq 60); do [ ! -e "$RUN/e1.2.json" ] && break; sleep 0.5; done
[ ! -e "$RUN/e1.2.json" ] || fail "e1.2 is still attached though down"
echo "e1.2's target stopped: detached after $((SECONDS - t0)) s"
cat "$WORK/watch.log"
step "stop it as systemd stops a unit: SIGTERM to every process of the service"
pkill -TERM -f "$AOE_PY attach" || true
# (compgen -G, not ls of the glob: a record removed between the glob and ls is no error)
for _ in $(seq 300); do compgen -G "$RUN/*.json" > /dev/null || break; sleep 0.1; done
! compgen -G "$RUN/*.json" || fail "records left after the stop"
for _ in $(seq 100); do kill -0 "$WATCH" 2>/dev/null || break; sleep 0.1; done   # it ends its listening
! kill -0 "$WATCH" 2>/dev/null || fail "the watch did not end"
ls /dev/ublkb* 2>/dev/null && fail "devices left after the stop"

step "attach --foreground e2.1, as aoe@e2.1.service runs it"
: > "$WORK/notify.log"
NOTIFY_SOCKET=$NOTIFY timeout 600 "$PY" "$AOE_PY" attach --foreground e2.1 > "$WORK/fg.log" 2>&1 &
FG=$!; OTHER_PIDS="${OTHER_PIDS:-} $FG"
notified READY=1 30
[ -b "$(readlink "$AOE_LINK_DIR/e2.1")" ] || fail "READY=1 before the device was there"
grep -q "STATUS=/dev/" "$WORK/notify.log" || fail "no STATUS"
kill -TERM "$FG"; wait "$FG" || fail "attach --foreground did not end cleanly"
notified STOPPING=1 5
[ ! -e "$RUN/e2.1.json" ] && [ ! -L "$AOE_LINK_DIR/e2.1" ] || fail "e2.1 left behind"
cat "$WORK/notify.log"
echo "WATCH-CHECK OK"
