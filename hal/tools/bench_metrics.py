"""What the metrics cost the data path: fio (nbd engine) with [metrics] on and off.

Two local pairs, one with metrics and one without, measured in alternating
rounds (off, on, off, on ...) so drift on a busy machine hits both alike; the
pair with metrics is scraped once a second during its runs (a busy Prometheus).
Pinned like hal/tools/bench.py: fio on CPU 0, the controllers on CPU 1. Prints
min-median-max IOPS per workload and the median ratio on/off, and the CPU time
both controllers spent per request (from /proc, all threads): on a machine
busy with other work IOPS swing by tens of percent between runs, CPU time
per request much less, so that is the figure to judge the cost by.

    PYTHONPATH=. python -m hal.tools.bench_metrics [rounds] [seconds]
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request

from hal.tools.fio import FIO_CPU, pin
from hal.tools.pair import LocalPair

VOLUME_BYTES = 64 << 20
WORKLOADS = {
    "4k randwrite QD1": dict(rw="randwrite", iodepth=1),
    "4k randwrite QD16": dict(rw="randwrite", iodepth=16),
    "4k randread QD1": dict(rw="randread", iodepth=1),
    "4k randread QD16": dict(rw="randread", iodepth=16),
}


def cpu_s(pids):
    """User + system CPU seconds of the processes, all their threads."""
    total = 0
    for pid in pids:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def fio(uri, workload, seconds):
    args = ["taskset", "-c", FIO_CPU, "fio", "--name=m", "--ioengine=nbd", f"--uri={uri}", "--bs=4k",
            f"--size={VOLUME_BYTES}", f"--runtime={seconds}", "--time_based", "--ramp_time=1",
            "--output-format=json", "--randrepeat=0", "--norandommap"]
    args += [f"--{k}={v}" for k, v in workload.items()]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=True)
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    return job["read"]["iops"] + job["write"]["iops"], job["read"]["total_ios"] + job["write"]["total_ios"]


def _scrape_loop(url, stop):
    while not stop.wait(1.0):
        with urllib.request.urlopen(url, timeout=5) as reply:
            reply.read()


def main(rounds=3, seconds=5):
    work = pathlib.Path(tempfile.mkdtemp(prefix="tc-bench-metrics-"))
    pairs = {}
    try:
        for name, on in (("off", False), ("on", True)):
            pair = LocalPair(work / name)
            pair.up(luns=1, lun_size_bytes=VOLUME_BYTES, nvram_size_bytes=64 << 20, metrics=on)
            for n in ("a", "b"):
                pin(pair.pid(n))
            pairs[name] = pair
        # Fill the LUN once so reads are of written data, through each pair.
        for pair in pairs.values():
            fio(f"nbd+unix:///lun0?socket={pair.dir / 'a' / 'nbd.sock'}", dict(rw="write", iodepth=16, bs="1M"), 2)
        results = {w: {"off": [], "on": []} for w in WORKLOADS}
        cpu = {w: {"off": [], "on": []} for w in WORKLOADS}
        url = pairs["on"].status("a")["metrics_url"]
        for _ in range(rounds):
            for wname, workload in WORKLOADS.items():
                for name, pair in pairs.items():
                    stop = threading.Event()
                    scraper = threading.Thread(target=_scrape_loop, args=(url, stop), daemon=True)
                    if name == "on":
                        scraper.start()
                    pids = [pair.pid("a"), pair.pid("b")]
                    cpu0 = cpu_s(pids)
                    iops, ios = fio(f"nbd+unix:///lun0?socket={pair.dir / 'a' / 'nbd.sock'}", workload, seconds)
                    cpu_us = (cpu_s(pids) - cpu0) * 1e6
                    stop.set()
                    if name == "on":
                        scraper.join()
                    results[wname][name].append(iops)
                    cpu[wname][name].append(cpu_us / ios)
        for wname, r in results.items():
            off, on = statistics.median(r["off"]), statistics.median(r["on"])
            print(f"{wname:20s} off {min(r['off']):8.0f} {off:8.0f} {max(r['off']):8.0f}   "
                  f"on {min(r['on']):8.0f} {on:8.0f} {max(r['on']):8.0f}   on/off {on / off:.3f}")
        print("CPU us per request (both controllers, scrapes included; min median max):")
        for wname, r in cpu.items():
            off, on = statistics.median(r["off"]), statistics.median(r["on"])
            print(f"{wname:20s} off {min(r['off']):6.1f} {off:6.1f} {max(r['off']):6.1f}   "
                  f"on {min(r['on']):6.1f} {on:6.1f} {max(r['on']):6.1f}   on/off {on / off:.3f}")
    finally:
        for pair in pairs.values():
            pair.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
