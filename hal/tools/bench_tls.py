"""The cost of NBD over TLS: fio through one pair, with TLS and without, in the same run.

One local pair with `[nbd] tls = "allow"` (throwaway certificates from
hal/host/tls_certs.py, no client certificate check) serves both kinds of client,
so the only difference between the two figures is TLS. Every workload runs
plain then TLS then plain ... (the order flips every round, so drift hits
both alike), pinned like hal/tools/bench.py (fio on CPU 0, the controllers on CPU 1).

fio's nbd engine refuses `tls-certificates=` in a URI (libnbd denies URIs
that name local files unless the program allows it, and fio does not), so
fio finds the client files where libnbd looks by default: $HOME/.pki/libnbd.
libnbd looks there only for a user other than root, so as root fio runs in
a user namespace of its own (`unshare -U`), where it is not uid 0.

Besides IOPS it reports the owner's CPU time per request (user + system from
/proc, over the fio run including its 1 s ramp, divided by IOPS x (seconds + 1)):
on a busy machine that moves less than IOPS do.

Run alone: `python -m hal.tools.bench_tls [--rounds N] [--seconds S]`.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import tempfile

from hal.tools.fio import cpu_seconds
from hal.tools.pair import LocalPair

WORKLOADS = {
    "4k QD1": dict(rw="randwrite", bs="4k", iodepth=1),
    "4k QD16": dict(rw="randwrite", bs="4k", iodepth=16),
    "1M seq QD8": dict(rw="write", bs="1M", iodepth=8),
}
MODES = ("plain", "tls")
def _fio_home(work: pathlib.Path, client_dir: str) -> str:
    home = work / "fio-home"
    (home / ".pki").mkdir(parents=True, exist_ok=True)
    shutil.copytree(client_dir, home / ".pki" / "libnbd", dirs_exist_ok=True)
    return str(home)


def tls_vs_plain(rounds=3, seconds=5, progress=None):
    """{workload: {"plain": [fio result...], "tls": [...]}}."""
    from hal.tools.fio import VOLUME_BYTES, pin, fio
    work = pathlib.Path(tempfile.mkdtemp(prefix="tc-tls-"))
    pair = LocalPair(work / "pair")
    results = {w: {m: [] for m in MODES} for w in WORKLOADS}
    try:
        pair.up(luns=1, lun_size_bytes=VOLUME_BYTES, nvram_size_bytes=64 << 20, tls="allow")
        for name in ("a", "b"):
            pin(pair.pid(name))
        owner = pair.pid("a")                    # lun0's owner
        sock = work / "pair" / "a" / "nbd.sock"
        home = _fio_home(work, pair.tls_client_dir())
        wrap = (["unshare", "-U"] if os.geteuid() == 0 else []) + ["env", f"HOME={home}"]
        uris = {"plain": f"nbd+unix:///lun0?socket={sock}", "tls": f"nbds+unix:///lun0?socket={sock}"}
        for r in range(rounds):
            for wname, wl in WORKLOADS.items():
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    cpu0 = cpu_seconds(owner)
                    res = fio(uris[mode], wl, seconds, wrap=wrap if mode == "tls" else None)
                    res["owner_cpu_us"] = (cpu_seconds(owner) - cpu0) * 1e6 / max(1.0, res["iops"] * (seconds + 1))
                    results[wname][mode].append(res)
                    if progress:
                        progress(f"tls round {r + 1}/{rounds} {mode:5} {wname:11} {res['iops']:9.0f} IOPS  "
                                 f"p50 {res['p50_us']:7.1f} us  p99 {res['p99_us']:7.1f} us  "
                                 f"owner CPU {res['owner_cpu_us']:7.0f} us/request")
    finally:
        pair.down()
        shutil.rmtree(work, ignore_errors=True)
    return results


def render(results, rounds, seconds) -> str:
    lines = [f"\nNBD over TLS vs plain, the same pair (`tls = \"allow\"`), lun0 on its owner, {rounds} rounds x "
             f"{seconds} s, alternating. Min/median/max IOPS (clat p50 / p99 in us, medians):", "",
             "| workload | plain | TLS | TLS/plain (median IOPS) | owner CPU us/request plain -> TLS |",
             "| --- | --- | --- | --- | --- |"]
    for w in WORKLOADS:
        cells, med = [], {}
        for m in MODES:
            runs = results[w][m]
            iops = sorted(x["iops"] for x in runs)
            med[m] = statistics.median(iops)
            p50 = statistics.median(x["p50_us"] for x in runs)
            p99 = statistics.median(x["p99_us"] for x in runs)
            cells.append(f"{iops[0]:.0f}/{med[m]:.0f}/{iops[-1]:.0f} ({p50:.0f} / {p99:.0f})")
        cpu = {m: statistics.median(x["owner_cpu_us"] for x in results[w][m]) for m in MODES}
        lines.append(f"| {w} | {cells[0]} | {cells[1]} | {med['tls'] / med['plain']:.2f} | "
                     f"{cpu['plain']:.0f} -> {cpu['tls']:.0f} |")
    return "\n".join(lines) + "\n"


def report(rounds=3, seconds=5, progress=None) -> str:
    return render(tls_vs_plain(rounds, seconds, progress), rounds, seconds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    print(report(args.rounds, args.seconds, progress=lambda line: print(line, flush=True)))
