"""`inv bench`, replica mode: the quick resync rate against a raw disk copy on this machine.

A replica pair (64 MiB LUNs); the secondary is killed, the primary takes
`dirty_mib` of writes alone (recorded in its bitmap), the secondary restarts
and the primary's resync_done event gives bytes and seconds. The raw figure
copies the same number of bytes from one disk image file to another in 1 MiB
reads and writes (page cache, no fsync: the controllers do not fsync either).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import tempfile
import time

from hal.tools.pair import LocalPair


def _events(path, kind):
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["kind"] == kind]


def resync_once(work, dirty_mib=32):
    pair = LocalPair(work / "pair")
    pair.up(luns=1, lun_size_bytes=64 << 20, nvram_size_bytes=32 << 20, mode="replica")
    try:
        pair.kill("b", signal.SIGKILL)
        time.sleep(0.3)
        uri = f"nbd+unix:///lun0?socket={work / 'pair' / 'a' / 'nbd.sock'}"
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {dirty_mib}M", uri], check=True,
                       capture_output=True)
        started = time.time()
        pair.up()
        events = work / "pair" / "a" / "events.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = [e for e in _events(events, "resync_done") if e["ts"] >= started and e.get("side") == "source"]
            if done:
                return done[-1]
            time.sleep(0.05)
        raise RuntimeError("no resync_done within 120 s")
    finally:
        pair.down()


def raw_copy_mb_s(work, mib=32):
    src, dst = work / "src.img", work / "dst.img"
    with open(src, "wb") as f:
        f.write(os.urandom(1 << 20) * mib)
    start = time.perf_counter()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(1 << 20):
            fo.write(chunk)
    return mib * (1 << 20) / (time.perf_counter() - start) / 1e6


def resync_rates(runs=3, dirty_mib=32):
    """[(resync MB/s, bytes, ranges)], [raw copy MB/s]."""
    resync, raw = [], []
    for _ in range(runs):
        work = pathlib.Path(tempfile.mkdtemp(prefix="tc-resync-"))
        try:
            done = resync_once(work, dirty_mib)
            resync.append((done["rate_bytes_s"] / 1e6, done["bytes"], done["ranges"]))
            raw.append(raw_copy_mb_s(work, dirty_mib))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return resync, raw


def report(runs=3, dirty_mib=32):
    resync, raw = resync_rates(runs, dirty_mib)
    rates = [r for r, _, _ in resync]
    return (f"\nReplica quick resync ({dirty_mib} MiB recorded while the secondary was down, {runs} runs): "
            f"min/median/max {min(rates):.1f}/{statistics.median(rates):.1f}/{max(rates):.1f} MB/s, "
            f"{resync[0][1]} B in {resync[0][2]} ranges each; raw file copy of the same bytes "
            f"{statistics.median(raw):.0f} MB/s (median).\n")


if __name__ == "__main__":
    print(report())
