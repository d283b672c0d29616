"""Destage throughput of a local pair: how fast the owner empties its cache to disk.

A pair whose cache does not destage while the host writes (high watermark
0.95, idle_flush_ms 2000) takes `mib` MiB of random 4 KiB writes from fio
spread over a 1 GiB LUN (so few lines are adjacent: about one disk write each); then it goes idle and destages everything. Measured from the
first destaged line to an empty cache, by polling `status`: MB/s of lines
destaged, disk writes and disk flushes (every NVRAM copy is freed only after a
flush of its LUN, batched over a destage round). The disks are files on this
machine's own filesystem (not tmpfs), so fdatasync costs what it costs here.

Its peer, measured in the same run, rotating with it: the same pair on disks
that ignore flushes (`[disks] write_cache = "ignore-flush"`, hal/disk_faulty.py),
which is destage as it was before it waited for flushes; the report prints the
ratio of the medians.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile
import time

from .pair import LocalPair


def destage_throughput(mib=48, base_dir=None, write_cache="os"):
    work = pathlib.Path(tempfile.mkdtemp(prefix="tc-destage-", dir=base_dir))
    pair = LocalPair(work / "pair")
    faults_env = os.environ.get("TWINCACHE_TEST_FAULTS")
    if write_cache == "ignore-flush":
        os.environ["TWINCACHE_TEST_FAULTS"] = "1"       # the peer's disks: a benchmark only
    try:
        pair.up(luns=2, lun_size_bytes=1 << 30, nvram_size_bytes=(2 * mib + 32) << 20,
                cache={"high_watermark": 0.95, "low_watermark": 0.9, "idle_flush_ms": 2000},
                disks={"write_cache": write_cache})
        uri = f"nbd+unix:///lun0?socket={work / 'pair' / 'a' / 'nbd.sock'}"
        subprocess.run(["fio", "--name=d", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
                        "--iodepth=32", "--size=1G", f"--io_size={mib}M", "--norandommap", "--randrepeat=0",
                        "--output-format=terse"],
                       check=True, capture_output=True, timeout=600)
        st = pair.status("a")
        dirty0, stats0 = st["dirty_blocks"], dict(st["stats"])
        t0 = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            st = pair.status("a")
            now = time.monotonic()
            if t0 is None and st["dirty_blocks"] < dirty0:
                t0 = now
            if st["dirty_blocks"] == 0:
                break
            time.sleep(0.01)
        seconds = time.monotonic() - t0
        stats = st["stats"]
        delta = {k: stats.get(k, 0) - stats0.get(k, 0) for k in ("destaged", "destage_writes", "disk_flushes")}
        return {"lines": dirty0, "seconds": seconds, "mbps": dirty0 * 4096 / seconds / 1e6, **delta}
    finally:
        pair.down()
        shutil.rmtree(work, ignore_errors=True)
        if faults_env is None:
            os.environ.pop("TWINCACHE_TEST_FAULTS", None)
        else:
            os.environ["TWINCACHE_TEST_FAULTS"] = faults_env


def compare(runs=3, mib=48, progress=None):
    """Durable destage and its no-flush peer, rotating: {"durable": [...], "no_flush": [...]}."""
    results = {"durable": [], "no_flush": []}
    for k in range(runs):
        for name, cache in (("durable", "os"), ("no_flush", "ignore-flush")):
            r = destage_throughput(mib, write_cache=cache)
            results[name].append(r)
            if progress:
                progress(f"destage run {k + 1}/{runs} {name}: {r['mbps']:.1f} MB/s")
    return results


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def report(runs=3, mib=48, progress=None):
    results = compare(runs, mib, progress)
    mbps = {name: sorted(r["mbps"] for r in rs) for name, rs in results.items()}
    r = results["durable"][0]
    ratio = _median(mbps["durable"]) / _median(mbps["no_flush"])
    lines = [f"\nDestage of {mib} MiB of random 4 KiB lines to file disks ({runs} runs each, rotating):"]
    for name, label in (("durable", "flushed before NVRAM is freed"), ("no_flush", "peer: disks ignore flushes")):
        m = mbps[name]
        lines.append(f"- {label}: min/median/max {m[0]:.1f}/{_median(m):.1f}/{m[-1]:.1f} MB/s")
    lines.append(f"- ratio of medians durable/peer: {ratio:.2f} ({r['destage_writes']} disk writes and "
                 f"{r['disk_flushes']} flushes for {r['destaged']} lines, one durable run)\n")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(progress=lambda line: print(line, flush=True)))
