#!/usr/bin/env python3
"""How long `aoe.py rescue` takes to a complete map when bad sectors answer slowly.

Two private network namespaces joined by a veth pair (aoe.NetLab); `aoe.py serve`
exports the same file of random data with the same unreadable sectors (`--fault-bad`:
scattered single sectors, some side by side, and a few 64 KiB areas), answering reads
of them at once, and, side by side, only after --delay ms (`--fault-bad-delay`, as a
disk retrying a sector answers).  Each run images it afresh with `aoe.py rescue`
(defaults) into a file on tmpfs; every run's map must hold exactly the unreadable
sectors and its image the file's bytes everywhere else.  Prints the median time of N
runs with the fastest and slowest, per row.  Needs root.

    sudo python3 bench/rescue.py [--size 256M] [--scattered 1000] [--areas 4]
                                 [--delay 1000] [--runs 3] [--mtu 9000]
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import aoe  # noqa: E402


def unreadable_sectors(sectors, scattered, areas, seed=1):
    rng = random.Random(seed)
    bad = set()
    for _ in range(areas):
        start = rng.randrange(sectors - 256)
        bad.update(range(start, start + 128))
    while len(bad) < areas * 128 + scattered:
        s = rng.randrange(sectors - 1)
        bad.update([s, s + 1] if rng.random() < 0.1 else [s])
    return bad


def bad_in_map(path):
    with open(path) as f:
        rmap = aoe.RescueMap.parse(f.read(), path, 1 << 50)
    return {s for pos, length, _ in rmap.areas(aoe.MAP_BAD)
            for s in range(pos // 512, (pos + length) // 512)}


def rescue_once(lab, slot, workdir, data, bad):
    image, mapfile = os.path.join(workdir, "rescued.img"), os.path.join(workdir, "rescued.map")
    for path in (image, mapfile):
        if os.path.exists(path):
            os.unlink(path)
    t0 = time.monotonic()
    r = subprocess.run(lab.aoe_argv(lab.ini_ns, ["rescue", "e0.%d" % slot, image, mapfile,
                                                 "--json"]),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       env=lab.env())
    seconds = time.monotonic() - t0
    if r.returncode != aoe.EXIT_FAIL:
        sys.exit("rescue ended with %d: %s" % (r.returncode, r.stderr.strip()))
    report = json.loads(r.stdout)
    found = bad_in_map(mapfile)
    if found != bad:
        sys.exit("the map's bad sectors differ from the unreadable ones: %d found, %d injected"
                 % (len(found), len(bad)))
    with open(image, "rb") as f:
        got = f.read()
    wrong = [s for s in range(len(data) // 512)
             if s not in bad and got[s * 512:(s + 1) * 512] != data[s * 512:(s + 1) * 512]]
    if wrong:
        sys.exit("%d sectors of the image differ from the export, the first %d" % (len(wrong),
                                                                                 wrong[0]))
    return seconds, report


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="256M", help="the export's size (default %(default)s)")
    p.add_argument("--scattered", type=int, default=1000, help="single unreadable sectors")
    p.add_argument("--areas", type=int, default=4, help="unreadable 64 KiB areas")
    p.add_argument("--delay", type=int, default=1000, help="ms the slow target takes to fail one")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--mtu", type=int, default=9000)
    args = p.parse_args()
    size = aoe.parse_size(args.size)
    bad = unreadable_sectors(size // 512, args.scattered, args.areas)
    data = os.urandom(size)
    lab = aoe.NetLab(args.mtu, prefix="aoebench")
    workdir = tempfile.mkdtemp(dir="/dev/shm")
    export, listed = os.path.join(workdir, "export.img"), os.path.join(workdir, "bad.txt")
    with open(export, "wb") as f:
        f.write(data)
    with open(listed, "w") as f:
        f.write("\n".join(map(str, sorted(bad))) + "\n")
    print("%s export, %d unreadable sectors, MTU %d, %d runs each; median (fastest-slowest)"
          % (args.size, len(bad), args.mtu, args.runs))
    rows = [("answered at once", []), ("answered after %d ms" % args.delay,
                                       ["--fault-bad-delay", str(args.delay)])]
    targets = []
    try:
        for slot, (_, extra) in enumerate(rows, 1):
            targets.append(subprocess.Popen(
                lab.aoe_argv(lab.tgt_ns, ["serve", "--fault-bad", "@" + listed] + extra
                             + ["0", str(slot), lab.tgt_if, export]),
                env=lab.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)
        times = {name: [] for name, _ in rows}
        for _ in range(args.runs):                        # the rows in turn, not one after another
            for slot, (name, _) in enumerate(rows, 1):
                seconds, report = rescue_once(lab, slot, workdir, data, bad)
                times[name].append(seconds)
        for name, _ in rows:
            t = times[name]
            print("  bad sectors %-22s %6.1f s (%.1f-%.1f); every readable byte, the exact set"
                  % (name, statistics.median(t), min(t), max(t)))
    finally:
        for proc in targets:
            proc.terminate()
            proc.wait(10)
        lab.close()
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)


if __name__ == "__main__":
    main()
