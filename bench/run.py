#!/usr/bin/env python3
"""Side-by-side throughput of aoe.py's data paths and targets, in one run.

Two private network namespaces joined by a veth pair (aoe.NetLab); one target
at a time serves the same sparse file on tmpfs; the client is `aoe.py read`
and `aoe.py write` in the other namespace, and, as the yardstick, bench/minread.c,
the smallest reader there can be (one send and one recv per frame, a window of
the target's buffer count).  Rows: target x client; columns: MTU.  Figures are
best-of-N MB/s (10^6 bytes/s), and the CPU time per GB moved (least of the N
runs; threads and the kernel work done in system calls included) of the target
and of the client: on two cores, whichever is near 1 s per second of the run is
the limit.  Needs root, and a C compiler for the yardstick.

    sudo python3 bench/run.py [--size 1G] [--mtu 1500,9000] [--runs 3]
"""

import argparse
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import aoe  # noqa: E402

TARGETS = [  # name, argv before "SHELF SLOT IFACE FILE", extra environment
    ("vblade", ["vblade"], {}),
    ("vblade -b 64", ["vblade", "-b", "64"], {}),
    ("aoe.py serve (helper)", [sys.executable, aoe.__file__, "serve"], {}),
    ("aoe.py serve (pure Python)", [sys.executable, aoe.__file__, "serve"], {"AOE_NO_HELPER": "1"}),
]
CLIENTS = [  # name, verb, extra environment
    ("read, minimal C reader", "minread", {}),
    ("read, helper", "read", {}),
    ("read, pure Python", "read", {"AOE_NO_HELPER": "1"}),
    ("write, helper", "write", {}),
]
BUFCNT = {"vblade": 16}                 # what each target advertises, for the yardstick's window


def rate(output):
    """The "(N MB/s" a client prints (aoe.py on stderr, minread on stdout)."""
    m = re.search(r"\(([\d.]+) MB/s", output)
    if not m:
        raise RuntimeError("no rate in: " + output.strip()[-300:])
    return float(m.group(1))


def cpu_seconds(pid):
    """User + system time of a process and all its threads so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def client_argv(lab, verb, slot, size, source, minread, window):
    device = "e0.%d" % slot
    if verb == "minread":
        mac = lab.mac(lab.tgt_ns, lab.tgt_if)
        return lab.argv(lab.ini_ns, [minread, lab.ini_if, mac, "0", str(slot), str(size // aoe.SECTOR_SIZE),
                                     str(aoe.frame_sectors(lab.mtu)), str(window)])
    args = ["read", device, "/dev/null"] if verb == "read" else ["write", "--yes", source, device]
    return lab.aoe_argv(lab.ini_ns, args)


def measure(lab, client_env, argv, size, runs, target_pid):
    """Best rate in MB/s, and the least target and client CPU time per GB moved in those runs."""
    best, target_cpu, client_cpu = 0.0, float("inf"), float("inf")
    for _ in range(runs):
        env = lab.env()
        env.update(client_env)
        before, before_client = cpu_seconds(target_pid), children_cpu_seconds()
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode:
            raise RuntimeError("%s: %s" % (" ".join(argv[4:]), r.stderr.strip()))
        best = max(best, rate(r.stdout + r.stderr))
        target_cpu = min(target_cpu, (cpu_seconds(target_pid) - before) / (size / 1e9))
        client_cpu = min(client_cpu, (children_cpu_seconds() - before_client) / (size / 1e9))
    return best, target_cpu, client_cpu


def run_mtu(mtu, size, runs, shm, minread):
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
                    if verb == "minread" and not minread:
                        continue
                    window = int(argv[argv.index("-b") + 1]) if "-b" in argv else BUFCNT.get(tname, aoe.SERVE_BUFCNT)
                    figures = measure(lab, cenv, client_argv(lab, verb, slot, size, source, minread, window),
                                      size, runs, proc.pid)
                    results[(tname, cname)] = figures
                    print("  MTU %d  %-28s %-24s %8.1f MB/s, CPU s/GB: target %.2f, client %.2f"
                          % ((mtu, tname, cname) + figures), file=sys.stderr)
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
    with tempfile.TemporaryDirectory() as tmp:
        minread = os.path.join(tmp, "minread")
        cc = shutil.which("cc") or shutil.which("gcc")
        if not cc or subprocess.run([cc, "-O2", "-o", minread, os.path.join(HERE, "minread.c")]).returncode:
            print("  (no C compiler: the minimal C reader is left out)", file=sys.stderr)
            minread = None
        table = {mtu: run_mtu(mtu, size, args.runs, args.shm, minread) for mtu in mtus}
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print("%s, %s, %d cores (%s), Linux %s, Python %s, image %s on tmpfs, best of %d"
          % (time.strftime("%Y-%m-%d"), platform.machine(), os.cpu_count(), cpu, platform.release(),
             platform.python_version(), args.size, args.runs))
    print()
    print("| target | client | " + " | ".join("MTU %d MB/s" % m for m in mtus) + " | "
          + " | ".join("CPU s/GB target, client at %d" % m for m in mtus) + " |")
    print("|---|---|" + "---:|" * (2 * len(mtus)))
    for tname, _, _ in TARGETS:
        for cname, _, _ in CLIENTS:
            if all((tname, cname) in table[m] for m in mtus):
                cells = ["%.0f" % table[m][(tname, cname)][0] for m in mtus]
                cells += ["%.2f, %.2f" % table[m][(tname, cname)][1:] for m in mtus]
                print("| %s | %s | %s |" % (tname, cname, " | ".join(cells)))


if __name__ == "__main__":
    sys.exit(main())
