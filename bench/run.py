#!/usr/bin/env python3
"""Side-by-side throughput of aoe.py's data paths and targets, in one run.

Two private network namespaces joined by a veth pair (aoe.NetLab); one target
at a time serves the same sparse file on tmpfs; the client is `aoe.py read`
and `aoe.py write` in the other namespace.  Rows: target x client data path;
columns: MTU.  Figures are best-of-N MB/s (10^6 bytes/s).  Needs root.

    sudo python3 bench/run.py [--size 1G] [--mtu 1500,9000] [--runs 3]
"""

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import aoe  # noqa: E402

TARGETS = [  # name, argv before "SHELF SLOT IFACE FILE", extra environment
    ("vblade", ["vblade"], {}),
    ("aoe.py serve (helper)", [sys.executable, aoe.__file__, "serve"], {}),
    ("aoe.py serve (pure Python)", [sys.executable, aoe.__file__, "serve"], {"AOE_NO_HELPER": "1"}),
]
CLIENTS = [  # name, verb, extra environment
    ("read, helper", "read", {}),
    ("read, pure Python", "read", {"AOE_NO_HELPER": "1"}),
    ("write, helper", "write", {}),
]


def rate(stderr):
    m = re.search(r"\(([\d.]+) MB/s", stderr)
    if not m:
        raise RuntimeError("no rate in: " + stderr.strip()[-300:])
    return float(m.group(1))


def measure(lab, client_env, verb, device, image, source, runs):
    best = 0.0
    for _ in range(runs):
        env = lab.env()
        env.update(client_env)
        args = ["read", device, "/dev/null"] if verb == "read" else ["write", "--yes", source, device]
        r = subprocess.run(lab.aoe_argv(lab.ini_ns, args), env=env, capture_output=True, text=True, timeout=900)
        if r.returncode:
            raise RuntimeError("aoe.py %s: %s" % (" ".join(args), r.stderr.strip()))
        best = max(best, rate(r.stderr))
    return best


def run_mtu(mtu, size, runs, shm):
    results = {}
    lab = aoe.NetLab(mtu, prefix="aoebench")
    image = os.path.join(shm, "aoe-bench-%s.img" % lab.tag)
    source = os.path.join(shm, "aoe-bench-%s.src" % lab.tag)
    try:
        with open(image, "wb") as f:
            f.truncate(size)
        with open(source, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
        for slot, (tname, argv, tenv) in enumerate(TARGETS, 1):
            if not shutil.which(argv[0]):
                print("  (%s not installed: skipped)" % tname, file=sys.stderr)
                continue
            env = dict(lab.env(), **tenv)
            proc = subprocess.Popen(lab.argv(lab.tgt_ns, argv + ["0", str(slot), lab.tgt_if, image]), env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.5)
                for cname, verb, cenv in CLIENTS:
                    figure = measure(lab, cenv, verb, "e0.%d" % slot, image, source, runs)
                    results[(tname, cname)] = figure
                    print("  MTU %d  %-28s %-18s %8.1f MB/s" % (mtu, tname, cname, figure), file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait(10)
    finally:
        lab.close()
        for path in (image, source):
            if os.path.exists(path):
                os.unlink(path)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1G", help="image size (default %(default)s)")
    p.add_argument("--mtu", default="1500,9000")
    p.add_argument("--runs", type=int, default=3, help="best of this many (default %(default)s)")
    p.add_argument("--shm", default="/dev/shm", help="tmpfs directory for the image")
    args = p.parse_args()
    size = aoe.parse_size(args.size)
    mtus = [int(m) for m in args.mtu.split(",")]
    table = {mtu: run_mtu(mtu, size, args.runs, args.shm) for mtu in mtus}
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print("%s, %s, %d cores (%s), Linux %s, Python %s, image %s on tmpfs, best of %d"
          % (time.strftime("%Y-%m-%d"), platform.machine(), os.cpu_count(), cpu, platform.release(),
             platform.python_version(), args.size, args.runs))
    print()
    print("| target | client | " + " | ".join("MTU %d MB/s" % m for m in mtus) + " |")
    print("|---|---|" + "---:|" * len(mtus))
    for tname, _, _ in TARGETS:
        for cname, _, _ in CLIENTS:
            if all((tname, cname) in table[m] for m in mtus):
                print("| %s | %s | %s |" % (tname, cname, " | ".join("%.0f" % table[m][(tname, cname)]
                                                                      for m in mtus)))


if __name__ == "__main__":
    sys.exit(main())
