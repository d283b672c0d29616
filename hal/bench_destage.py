"""Destage throughput of a local pair: how fast the owner empties its cache to disk.

A pair whose cache does not destage while the host writes (high watermark
0.95, idle_flush_ms 2000) takes `mib` MiB of random 4 KiB writes from fio
spread over a 1 GiB LUN (so few lines are adjacent: about one disk write each); then it goes idle and destages everything. Measured from the
first destaged line to an empty cache, by polling `status`: MB/s of lines
destaged, disk writes and disk flushes (every NVRAM copy is freed only after a
flush of its LUN, batched over a destage round). The disks are files on this
machine's own filesystem (not tmpfs), so fdatasync costs what it costs here.
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import tempfile
import time

from .pair import LocalPair


def destage_throughput(mib=48, base_dir=None):
    work = pathlib.Path(tempfile.mkdtemp(prefix="tc-destage-", dir=base_dir))
    pair = LocalPair(work / "pair")
    try:
        pair.up(luns=2, lun_size_bytes=1 << 30, nvram_size_bytes=(2 * mib + 32) << 20,
                cache={"high_watermark": 0.95, "low_watermark": 0.9, "idle_flush_ms": 2000})
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


def report(runs=3, mib=48):
    results = [destage_throughput(mib) for _ in range(runs)]
    mbps = sorted(r["mbps"] for r in results)
    r = results[0]
    return (f"\nDestage of {mib} MiB of random 4 KiB lines to file disks ({runs} runs): min/median/max "
            f"{mbps[0]:.1f}/{mbps[len(mbps) // 2]:.1f}/{mbps[-1]:.1f} MB/s; {r['destage_writes']} disk "
            f"writes and {r['disk_flushes']} flushes for {r['destaged']} lines (one run).\n")


if __name__ == "__main__":
    for _ in range(3):
        print(destage_throughput(), flush=True)
