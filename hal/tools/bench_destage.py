"""Destage throughput of a local pair: how fast the owner empties its cache to disk.

A pair whose cache does not destage while the host writes (high watermark
0.95, idle_flush_ms 2000) takes `mib` MiB of random 4 KiB writes from fio
spread over a 1 GiB LUN (so few lines are adjacent: about one disk write each); then it goes idle and destages everything. Measured from the
first destaged line to an empty cache, by polling `status`: MB/s of lines
destaged, disk writes and disk flushes (every NVRAM copy is freed only after a
flush of its LUN, batched over a destage round). The disks are files on this
machine's own filesystem (not tmpfs), so fdatasync costs what it costs here.

Its peers, measured in the same run, rotating with it: the same pair on disks
that ignore flushes (`[disks] write_cache = "ignore-flush"`, hal/backends/disk_faulty.py),
which is destage as it was before it waited for flushes, timed twice: to an
empty cache (the data still in the page cache: nothing is durable yet) and to
the data on disk (one fdatasync of every LUN file once the cache is empty,
the fewest flushes a durable destage can make). The report prints the ratio
of the medians to each.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile
import time

from hal.tools.pair import LocalPair


def destage_throughput(mib=48, base_dir=None, write_cache="os", sync_at_end=False):
    """MB/s of lines destaged; with `sync_at_end`, timed until one fdatasync of each LUN file
    after the cache emptied has returned too."""
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
        if sync_at_end:
            for path in sorted((work / "pair" / "disks").glob("disk*.img")):
                fd = os.open(path, os.O_RDWR)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
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
    """Durable destage and its no-flush peers, rotating: {"durable": [...], "no_flush": [...],
    "no_flush_synced": [...]}."""
    results = {name: [] for name, _, _ in PEERS}
    for k in range(runs):
        for name, cache, sync_at_end in PEERS:
            r = destage_throughput(mib, write_cache=cache, sync_at_end=sync_at_end)
            results[name].append(r)
            if progress:
                progress(f"destage run {k + 1}/{runs} {name}: {r['mbps']:.1f} MB/s")
    return results


PEERS = (("durable", "os", False), ("no_flush", "ignore-flush", False),
         ("no_flush_synced", "ignore-flush", True))


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def report(runs=3, mib=48, progress=None):
    results = compare(runs, mib, progress)
    mbps = {name: sorted(r["mbps"] for r in rs) for name, rs in results.items()}
    r = results["durable"][0]
    durable = _median(mbps["durable"])
    lines = [f"\nDestage of {mib} MiB of random 4 KiB lines to file disks ({runs} runs each, rotating):"]
    for name, label in (("durable", "flushed before NVRAM is freed"),
                        ("no_flush", "peer: disks ignore flushes, timed to an empty cache"),
                        ("no_flush_synced", "peer: disks ignore flushes, timed to the data on disk")):
        m = mbps[name]
        lines.append(f"- {label}: min/median/max {m[0]:.1f}/{_median(m):.1f}/{m[-1]:.1f} MB/s")
    lines.append(f"- ratio of medians durable/no-flush: {durable / _median(mbps['no_flush']):.2f}; "
                 f"durable/no-flush synced: {durable / _median(mbps['no_flush_synced']):.2f} "
                 f"({r['destage_writes']} disk writes and {r['disk_flushes']} flushes for "
                 f"{r['destaged']} lines, one durable run)\n")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(progress=lambda line: print(line, flush=True)))
