#!/usr/bin/env python3
"""Side-by-side throughput of aoe.py's data paths and targets, in one run.

Two private network namespaces joined by a veth pair (aoe.NetLab); one target
at a time serves the same sparse file on tmpfs; the client is `aoe.py read`
(into /dev/null, and into a file on tmpfs as imaging does) and `aoe.py write`
in the other namespace, and, as the yardstick, bench/minread.c, the smallest
reader there can be (one send and one recv per frame, a window of the target's
buffer count, data thrown away).  For the rows that read into a file, the sink
alone is measured too: a new file of the image's size written on the same
tmpfs, no network.  One target is `serve` with its fault injection: 5% of
answers dropped, 1% duplicated, all delayed 1 ms +- 1 ms, 10% held back (it
runs serve's pure-Python path, so compare it with that row).
Rows: target x client; columns: MTU.  Figures are the median MB/s (10^6
bytes/s) of N runs with the slowest and fastest, and the median CPU time per
GB moved (threads and the kernel work done in system calls included) of the
target and of the client: on two cores, whichever is near 1 s per second of
the run is the limit.  Needs root, and a C compiler for the yardstick.

    sudo python3 bench/run.py [--size 1G] [--mtu 1500,9000] [--runs 5] [--targets vblade]
                              [--clients read]
"""

import argparse
import os
import platform
import re
import resource
import shutil
import statistics
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
    ("aoe.py serve, lossy and jittery",
     [sys.executable, aoe.__file__, "serve", "--fault-drop", "0.05", "--fault-duplicate", "0.01",
      "--fault-delay", "1", "--fault-jitter", "1", "--fault-reorder", "0.1"], {}),
]
CLIENTS = [  # name, verb, extra environment
    ("read, minimal C reader", "minread", {}),
    ("read, helper", "read", {}),
    ("read into a file, helper", "readfile", {}),
    ("read, pure Python", "read", {"AOE_NO_HELPER": "1"}),
    ("read into a file, pure Python", "readfile", {"AOE_NO_HELPER": "1"}),
    ("write, helper", "write", {}),
]
BUFCNT = {"vblade": 16}                 # what each target advertises, for the yardstick's window


def rate(output):
    """The "(N MB/s" a client prints (aoe.py on stderr, minread on stdout)."""
    m = re.search(r"\(([\d.]+) MB/s", output)
    if not m:
        raise RuntimeError("no rate in: " + output.strip()[-300:])
    return float(m.group(1))


def spread(rates):
    """median (slowest-fastest)"""
    return "%.0f (%.0f-%.0f)" % (statistics.median(rates), min(rates), max(rates))


def cpu_seconds(pid):
    """User + system time of a process and all its threads so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def client_argv(lab, verb, slot, size, source, image_copy, minread, window):
    device = "e0.%d" % slot
    if verb == "minread":
        mac = lab.mac(lab.tgt_ns, lab.tgt_if)
        return lab.argv(lab.ini_ns,
                        [minread, lab.ini_if, mac, "0", str(slot), str(size // aoe.SECTOR_SIZE),
                         str(aoe.frame_sectors(lab.mtu)), str(window)])
    args = {"read": ["read", device, "/dev/null"], "readfile": ["read", device, image_copy],
            "write": ["write", "--yes", source, device]}[verb]
    return lab.aoe_argv(lab.ini_ns, args)


def measure(lab, client_env, argv, size, runs, target_pid, image_copy):
    """MB/s of each run, and the target's and the client's CPU time per GB moved in each."""
    rates, target_cpu, client_cpu = [], [], []
    for _ in range(runs):
        env = lab.env()
        env.update(client_env)
        before, before_client = cpu_seconds(target_pid), children_cpu_seconds()
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        if os.path.exists(image_copy):
            os.unlink(image_copy)
        if r.returncode:
            raise RuntimeError("%s: %s" % (" ".join(argv[4:]), r.stderr.strip()))
        rates.append(rate(r.stdout + r.stderr))
        target_cpu.append((cpu_seconds(target_pid) - before) / (size / 1e9))
        client_cpu.append((children_cpu_seconds() - before_client) / (size / 1e9))
    return rates, statistics.median(target_cpu), statistics.median(client_cpu)


def new_file_rate(shm, size, runs):
    """What the sink alone costs: MB/s and CPU seconds per GB of writing a new file of the
    image's size on the same tmpfs in 1 MiB writes (as `read` into a file does), with no
    network; median (slowest-fastest) of `runs`."""
    path = os.path.join(shm, "aoe-bench-sink-%d" % os.getpid())
    block = memoryview(os.urandom(1 << 20))
    rates, cpu = [], []
    try:
        for _ in range(runs):
            before, t = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for _ in range(size >> 20):
                    os.write(fd, block)
            finally:
                os.close(fd)
            seconds, after = time.monotonic() - t, resource.getrusage(resource.RUSAGE_SELF)
            os.unlink(path)
            rates.append(size / seconds / 1e6)
            cpu.append((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                       / (size / 1e9))
            time.sleep(1)                 # as long as a client run's start, between files
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return rates, statistics.median(cpu)


def run_mtu(mtu, size, runs, shm, minread):
    results = {}
    lab = aoe.NetLab(mtu, prefix="aoebench")
    image = os.path.join(shm, "aoe-bench-%s.img" % lab.tag)
    source = os.path.join(shm, "aoe-bench-%s.src" % lab.tag)
    image_copy = os.path.join(shm, "aoe-bench-%s.copy" % lab.tag)
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
            proc = subprocess.Popen(lab.argv(lab.tgt_ns,
                                             argv + ["0", str(slot), lab.tgt_if, image]),
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.5)
                for cname, verb, cenv in CLIENTS:
                    if verb == "minread" and (not minread or "--fault-drop" in argv):
                        continue            # the yardstick never resends: no lossy target
                    window = (int(argv[argv.index("-b") + 1]) if "-b" in argv
                              else BUFCNT.get(tname, aoe.SERVE_BUFCNT))
                    command = client_argv(lab, verb, slot, size, source, image_copy, minread,
                                          window)
                    figures = measure(lab, cenv, command, size, runs, proc.pid, image_copy)
                    results[(tname, cname)] = figures
                    print("  MTU %d  %-32s %-30s %s MB/s, CPU s/GB: target %.2f, client %.2f"
                          % ((mtu, tname, cname, spread(figures[0])) + figures[1:]),
                          file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait(10)
    finally:
        lab.close()
        for path in (image, source, image_copy):
            if os.path.exists(path):
                os.unlink(path)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1G", help="image size (default %(default)s)")
    p.add_argument("--mtu", default="1500,9000")
    p.add_argument("--runs", type=int, default=5, help="runs of each client (default %(default)s)")
    p.add_argument("--shm", default="/dev/shm", help="tmpfs directory for the image")
    p.add_argument("--targets",
                   help="only targets whose name contains one of these, comma-separated")
    p.add_argument("--clients",
                   help="only clients whose name contains one of these, comma-separated")
    args = p.parse_args()
    chosen = lambda rows, words: [r for r in rows
                                  if not words or any(w in r[0] for w in words.split(","))]
    TARGETS[:] = chosen(TARGETS, args.targets)
    CLIENTS[:] = chosen(CLIENTS, args.clients)
    size = aoe.parse_size(args.size)
    mtus = [int(m) for m in args.mtu.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        minread = os.path.join(tmp, "minread")
        cc = shutil.which("cc") or shutil.which("gcc")
        if not cc or subprocess.run([cc, "-O2", "-o", minread,
                                     os.path.join(HERE, "minread.c")]).returncode:
            print("  (no C compiler: the minimal C reader is left out)", file=sys.stderr)
            minread = None
        table = {mtu: run_mtu(mtu, size, args.runs, args.shm, minread) for mtu in mtus}
    sink = new_file_rate(args.shm, size, args.runs)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "?")
    print("%s, %s, %d cores (%s), Linux %s, Python %s, image %s on tmpfs, "
          "median (slowest-fastest) of %d runs"
          % (time.strftime("%Y-%m-%d"), platform.machine(), os.cpu_count(), cpu, platform.release(),
             platform.python_version(), args.size, args.runs))
    print()
    print("| target | client | " + " | ".join("MTU %d MB/s" % m for m in mtus) + " | "
          + " | ".join("CPU s/GB target, client at %d" % m for m in mtus) + " |")
    print("|---|---|" + "---:|" * (2 * len(mtus)))
    for tname, _, _ in TARGETS:
        for cname, _, _ in CLIENTS:
            if all((tname, cname) in table[m] for m in mtus):
                cells = [spread(table[m][(tname, cname)][0]) for m in mtus]
                cells += ["%.2f, %.2f" % table[m][(tname, cname)][1:] for m in mtus]
                print("| %s | %s | %s |" % (tname, cname, " | ".join(cells)))
    print()
    print("The sink alone: a new %s file written on the same tmpfs in 1 MiB writes, no network: "
          "%s MB/s, %.2f CPU s/GB" % (args.size, spread(sink[0]), sink[1]))


if __name__ == "__main__":
    sys.exit(main())
