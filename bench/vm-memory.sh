#!/bin/bash
# Inside the VM (vm/run): what N idle attached devices cost in memory (PSS: shared pages divided
# among their sharers), attached by one `attach --all` (the daemons are forks of one process).
# Usage: vm/run 'bench/vm-memory.sh PYTHON [N]'
set -euo pipefail
PY=${1:?python interpreter}; N=${2:-16}; MTU=9000; BACKEND=ublk
AOE_PY=${AOE_PY:-aoe.py}
. vm/lib.sh
for i in $(seq "$N"); do
    truncate -s 64M "$WORK/t$i.img"
    nsenter --net="/run/netns/$NS" vblade 5 "$i" "$TGT" "$WORK/t$i.img" >> "$WORK/vblade.log" 2>&1 &
    OTHER_PIDS="${OTHER_PIDS:-} $!"
done
sleep 1
free -m | sed -n 2p
t0=$SECONDS
timeout 1200 "$PY" "$AOE_PY" attach --all > "$WORK/all.txt" || fail "attach --all"
echo "attach --all: $(grep -c ' is e5\.' "$WORK/all.txt") devices in $((SECONDS - t0)) s"
sleep 3
pss() {  # pss PID...: total PSS in kB
    local total=0 p
    for p in "$@"; do total=$((total + $(awk '/^Pss:/{print $2}' "/proc/$p/smaps_rollup"))); done
    echo "$total"
}
PIDS=$(for f in "$RUN"/*.json; do "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$f"; done)
n=$(echo $PIDS | wc -w)
total=$(pss $PIDS)
rss=0; for p in $PIDS; do rss=$((rss + $(awk '/^VmRSS:/{print $2}' /proc/$p/status))); done
echo "MEMORY $n idle devices: PSS $((total / 1024)) MB in all, $((total / n)) kB each (RSS $((rss / n)) kB each)"
free -m | sed -n 2p
echo "one daemon's largest private mappings (kB):"
awk '/^[0-9a-f]+-[0-9a-f]+ /{name=$6; if(name=="")name="[anon]"} /^Private_(Clean|Dirty):/{priv[name]+=$2} END{for(n in priv) print priv[n], n}' \
    "/proc/$(echo $PIDS | cut -d' ' -f1)/smaps" | sort -rn | head -8
for f in "$RUN"/*.json; do d=$(basename "$f" .json); aoe detach "$d" > /dev/null || true; done
