#!/bin/bash
# aoe.py attach vs the kernel's own aoe driver, side by side in one VM boot, same vblade, same image.
# Usage (from the checkout): vm/run '[ROUNDS=N] bench/vm-vs-kernel.sh PYTHON [SECONDS] [MTU...]'
# For each MTU: vblade exports a tmpfs image; the kernel driver (insmod aoe.ko) runs every fio job
# on /dev/etherd/e0.0, then the netem jobs with netem on the target's side ($NETEM: loss, duplicates,
# jitter, reordering), is removed, then aoe.py attach runs the same jobs through ublk, through nbd
# with the helper, and through nbd in pure Python (--no-helper).  With ROUNDS=N (default 1) all of
# that N times, every second round aoe.py first, so the machine's drift during a run falls on both.
# Prints one table row per job: MB/s or IOPS (the median of the rounds), mean latency, and
# aoe.py/kernel ratios (the median of the rounds' ratios, then each round's); and for the netem job,
# what each keeps of its own clean rate.
set -euo pipefail
PY=${1:?python interpreter}; SECS=${2:-5}; shift 2 || shift $#
MTUS=("$@"); [ ${#MTUS[@]} -gt 0 ] || MTUS=(1500 9000)
ROUNDS=${ROUNDS:-1}
IMG=/tmp/bench.img
. vm/kernel-aoe.sh
. bench/vm-target.sh
JOBS=("seq-read-1M-qd1 read 1M 1" "seq-read-1M-qd16 read 1M 16" "seq-write-1M-qd1 write 1M 1"
      "seq-write-1M-qd16 write 1M 16" "rand-read-4k-qd1 randread 4k 1" "rand-read-4k-qd32 randread 4k 32"
      "rand-write-4k-qd1 randwrite 4k 1" "rand-write-4k-qd32 randwrite 4k 32" "rand-write-64k-qd16 randwrite 64k 16")
NETEM="loss 5% duplicate 1% delay 1ms 1ms reorder 10%"
NETEM_JOBS=("netem-rand-write-64k-qd16 randwrite 64k 16")

run_jobs() {  # run_jobs JOB... with DEV, LABEL, MTU, ROUND set -> JSON lines in /tmp/results
    for job in "$@"; do
        set -- $job
        fio --name="$1" --filename="$DEV" --direct=1 --ioengine=libaio --rw="$2" --bs="$3" --iodepth="$4" \
            --size=448M --time_based --runtime="$SECS" --ramp_time=1 --output-format=json 2>/dev/null |
            "$PY" -c '
import json, sys
job = json.load(sys.stdin)["jobs"][0]
side = job["write"] if "write" in sys.argv[2] else job["read"]
print(json.dumps({"who": sys.argv[1], "mtu": int(sys.argv[3]), "job": sys.argv[4], "round": int(sys.argv[5]),
                  "mbs": side["bw_bytes"] / 1e6, "iops": side["iops"], "lat_us": side["lat_ns"]["mean"] / 1000}))
' "$LABEL" "$2" "$MTU" "$1" "$ROUND" >> /tmp/results
    done
}

: > /tmp/results
for MTU in "${MTUS[@]}"; do
    start_target "$MTU"

    all_jobs() {  # the clean jobs, then the netem ones under netem
        run_jobs "${JOBS[@]}"
        ip netns exec tgt tc qdisc add dev aoetgt root netem $NETEM
        run_jobs "${NETEM_JOBS[@]}"
        ip netns exec tgt tc qdisc del dev aoetgt root
    }
    kernel_jobs() {
        kernel_aoe_attach aoeini e0.0 || { echo "the kernel driver did not find e0.0"; exit 1; }
        DEV=/dev/etherd/e0.0 LABEL=kernel all_jobs
        rmmod aoe
    }
    aoepy_jobs() {
        for way in "ublk --backend ublk" "nbd --backend nbd" "nbd-python --backend nbd --no-helper"; do
            set -- $way
            LABEL=$1; shift
            DEV=$(AOE_IFLIST=aoeini "$PY" aoe.py attach --json "$@" e0.0 |
                  "$PY" -c 'import json,sys; print(json.load(sys.stdin)["block_device"])')
            all_jobs
            AOE_IFLIST=aoeini "$PY" aoe.py detach e0.0 > /dev/null
        done
    }
    for ROUND in $(seq "$ROUNDS"); do
        if [ $((ROUND % 2)) = 1 ]; then kernel_jobs; aoepy_jobs; else aoepy_jobs; kernel_jobs; fi
    done

    stop_target
done

"$PY" - "$AOE_VM_KVER" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open("/tmp/results")]
rounds = sorted({r["round"] for r in rows})
each = {(r["who"], r["mtu"], r["job"], r["round"]): r for r in rows}
by = {}  # (who, mtu, job) -> the rounds' medians
for who, mtu, job in {(r["who"], r["mtu"], r["job"]) for r in rows}:
    got = [each[(who, mtu, job, n)] for n in rounds]
    by[(who, mtu, job)] = {key: statistics.median(g[key] for g in got) for key in ("mbs", "iops", "lat_us")}

def ratio(who, mtu, job, key):
    """The median of the rounds' ratios, then each round's when there are several."""
    per = [each[(who, mtu, job, n)][key] / max(each[("kernel", mtu, job, n)][key], 1e-9) for n in rounds]
    return "%.2f" % statistics.median(per) + ("; " + ", ".join("%.2f" % p for p in per) if len(per) > 1 else "")
ways = [w for w in ("ublk", "nbd", "nbd-python") if any(r["who"] == w for r in rows)]
print("Linux %s under qemu TCG; vblade on tmpfs; fio direct=1 libaio; aoe.py through ublk, through nbd "
      "with the helper, and through nbd in pure Python; %d round(s)" % (sys.argv[1], len(rounds)))
print("| MTU | job | kernel aoe | " + " | ".join("aoe.py %s (x kernel)" % w for w in ways)
      + " | qd1 latency, kernel / " + " / ".join(ways) + " (us) |")
print("|---:|---|---:|" + "---:|" * len(ways) + "---|")
for mtu in sorted({r["mtu"] for r in rows}):
    for job in dict.fromkeys(r["job"] for r in rows if r["mtu"] == mtu):
        k = by[("kernel", mtu, job)]
        unit, key = ("MB/s", "mbs") if "seq" in job or "64k" in job else ("IOPS", "iops")
        cells = ["%.1f %s (%s)" % (by[(w, mtu, job)][key], unit, ratio(w, mtu, job, key)) for w in ways]
        lat = " / ".join(["%.0f" % k["lat_us"]] + ["%.0f" % by[(w, mtu, job)]["lat_us"] for w in ways]) \
            if job.endswith("qd1") else ""
        print("| %d | %s | %.1f %s | %s | %s |" % (mtu, job, k[key], unit, " | ".join(cells), lat))
for mtu in sorted({r["mtu"] for r in rows}):
    for job in (j for j in dict.fromkeys(r["job"] for r in rows) if j.startswith("netem-")):
        clean = job[len("netem-"):]
        kept = ["%s %.2f" % (who, by[(who, mtu, job)]["mbs"] / max(by[(who, mtu, clean)]["mbs"], 1e-9))
                for who in ["kernel"] + ways]
        print("MTU %d, %s under netem keeps of its clean rate: %s" % (mtu, clean, ", ".join(kept)))
EOF
echo "BENCH DONE"
