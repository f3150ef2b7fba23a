#!/bin/bash
# Inside the VM (vm/run): two versions of aoe.py side by side in one boot, same vblade, same image,
# attached in turn (A, B, A, B, ...) through one backend, each running the same fio jobs; prints
# each run's figures and B's median over A's per job.  For checking that a change is faster.
# Usage: vm/run 'bench/vm-ab.sh PYTHON A.py B.py [BACKEND [MTU [SECONDS [ROUNDS]]]]'
#   (e.g. A.py from 'git show main:aoe.py > /tmp/a/aoe.py'; A and B take the same arguments)
set -euo pipefail
PY=${1:?python interpreter}; A=${2:?aoe.py A}; B=${3:?aoe.py B}; BACKEND=${4:-nbd}; MTU=${5:-9000}
SECS=${6:-3}; ROUNDS=${7:-2}
AOE_PY=$B
. "$(dirname "$0")/../vm/lib.sh"
JOBS=("seq-read-1M-qd16 read 1M 16" "seq-write-1M-qd16 write 1M 16" "rand-read-4k-qd1 randread 4k 1"
      "rand-read-4k-qd32 randread 4k 32" "rand-write-4k-qd32 randwrite 4k 32")
# AB_JOBS="NAME RW BS QD;..." runs those jobs instead (e.g. one row that a change is about)
[ -z "${AB_JOBS:-}" ] || IFS=';' read -r -a JOBS <<< "$AB_JOBS"
dd if=/dev/zero of="$IMG" bs=1M count=512 status=none   # allocated: no round reads holes
start_vblade
: > "$WORK/results"
for round in $(seq "$ROUNDS"); do
    for who in A B; do
        AOE_PY=${!who}
        attach e0.0
        for job in "${JOBS[@]}"; do
            set -- $job
            fio --name="$1" --filename="$DEV" --direct=1 --ioengine=libaio --rw="$2" --bs="$3" \
                --iodepth="$4" --size=448M --time_based --runtime="$SECS" --ramp_time=1 \
                --output-format=json 2>/dev/null | "$PY" -c '
import json, sys
job = json.load(sys.stdin)["jobs"][0]
side = job["write"] if "write" in sys.argv[2] else job["read"]
print(json.dumps({"who": sys.argv[1], "job": sys.argv[3], "mbs": side["bw_bytes"] / 1e6,
                  "iops": side["iops"]}))' "$who" "$2" "$1" >> "$WORK/results"
        done
        aoe detach e0.0 > /dev/null || fail "detach ($who)"
    done
done
"$PY" - "$WORK/results" "$BACKEND" "$MTU" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("backend %s, MTU %s: B / A per job (median of the rounds; every round's figure)"
      % (sys.argv[2], sys.argv[3]))
for job in dict.fromkeys(r["job"] for r in rows):
    unit = "iops" if "4k" in job else "mbs"
    got = {who: [r[unit] for r in rows if r["job"] == job and r["who"] == who] for who in "AB"}
    print("%-20s A %-24s B %-24s B/A %.2f" % (
        job, " ".join("%.0f" % v for v in got["A"]), " ".join("%.0f" % v for v in got["B"]),
        statistics.median(got["B"]) / statistics.median(got["A"])))
PYEOF
