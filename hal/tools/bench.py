"""`inv bench`: fio's nbd engine against twincache and two C peers, in one run.

Targets, each a 256 MiB volume served over a unix socket:
- twincache: a local pair (unix-socket link, default durability), lun0 on its owner;
- nbdkit: the file plugin on a raw file (one copy, no mirror);
- mirror: qemu-storage-daemon A exporting a file and mirroring it synchronously
  to qemu-storage-daemon B's NBD export (blockdev-mirror, sync full,
  copy-mode write-blocking, started and waited for READY before measuring).

Rounds rotate between targets (A B C A B C ...) so drift hits all alike. Every
process is pinned the same way: fio on CPU 0, every server process on CPU 1
(taskset), because a cross-CPU wakeup costs ~45 us here and QD1 figures swing
with placement. Prints min-median-max per figure and the ratios
twincache/nbdkit and twincache/mirror; writes report.md and report.png. The
cost of NBD over TLS is measured on one pair serving both (hal/tools/bench_tls.py), the
cost of link frame MACs with and without them (hal/tools/bench_linkauth.py).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

from hal.tools.fio import FIO_CPU, SERVER_CPU, VOLUME_BYTES, pin, fio
from hal.tools.pair import LocalPair

WORKLOADS = {
    "4k QD1": dict(rw="randwrite", bs="4k", iodepth=1),
    "4k QD32": dict(rw="randwrite", bs="4k", iodepth=32),
    "4k QD1+flush": dict(rw="randwrite", bs="4k", iodepth=1, fsync=1),
    "1M seq QD8": dict(rw="write", bs="1M", iodepth=8),
}
TARGETS = ("twincache", "nbdkit", "mirror")


def _wait_socket(path, timeout_s=20):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise RuntimeError(f"{path}: server did not come up")


class Twincache:
    name = "twincache"

    def start(self, work):
        self.pair = LocalPair(work / "tc")
        self.pair.up(luns=1, lun_size_bytes=VOLUME_BYTES, nvram_size_bytes=64 << 20)
        for n in ("a", "b"):
            pin(self.pair.pid(n))
        return f"nbd+unix:///lun0?socket={work / 'tc' / 'a' / 'nbd.sock'}"

    def stop(self):
        self.pair.down()


class Nbdkit:
    name = "nbdkit"

    def start(self, work):
        img, sock = work / "nbdkit.img", work / "nbdkit.sock"
        with open(img, "wb") as f:
            f.truncate(VOLUME_BYTES)
        self.proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, "nbdkit", "-f", "-U", str(sock),
                                      "file", str(img)], stderr=subprocess.DEVNULL)
        _wait_socket(str(sock))
        return f"nbd+unix:///?socket={sock}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class QsdMirror:
    name = "mirror"

    def start(self, work):
        a_img, b_img = work / "qa.img", work / "qb.img"
        for img in (a_img, b_img):
            with open(img, "wb") as f:
                f.truncate(VOLUME_BYTES)
        b_sock, a_sock, qmp = work / "qb.sock", work / "qa.sock", work / "qa-qmp.sock"
        self.b = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, "qemu-storage-daemon",
             "--blockdev", f"driver=file,filename={b_img},node-name=b,cache.direct=off",
             "--nbd-server", f"addr.type=unix,addr.path={b_sock}",
             "--export", "type=nbd,id=eb,node-name=b,name=lun0,writable=on"], stderr=subprocess.DEVNULL)
        _wait_socket(str(b_sock))
        self.a = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, "qemu-storage-daemon",
             "--blockdev", f"driver=file,filename={a_img},node-name=a",
             "--blockdev", f"driver=nbd,server.type=unix,server.path={b_sock},export=lun0,node-name=tgt",
             "--nbd-server", f"addr.type=unix,addr.path={a_sock}",
             "--export", "type=nbd,id=ea,node-name=a,name=lun0,writable=on",
             "--chardev", f"socket,path={qmp},server=on,wait=off,id=qmp",
             "--monitor", "chardev=qmp,mode=control"], stderr=subprocess.DEVNULL)
        _wait_socket(str(a_sock))
        self._qmp(str(qmp))
        return f"nbd+unix:///lun0?socket={a_sock}"

    def _qmp(self, path):
        """Start the write-blocking mirror and wait for BLOCK_JOB_READY."""
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        f = s.makefile("rw")
        f.readline()

        def cmd(name, **args):
            f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "return" in msg or "error" in msg:
                    if "error" in msg:
                        raise RuntimeError(f"QMP {name}: {msg['error']}")
                    return msg
        cmd("qmp_capabilities")
        cmd("blockdev-mirror", **{"job-id": "m", "device": "a", "target": "tgt", "sync": "full",
                                  "copy-mode": "write-blocking"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jobs = cmd("query-block-jobs")["return"]
            if jobs and jobs[0].get("ready"):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("mirror job never became ready")
        self.qmp = s

    def stop(self):
        for p in (self.a, self.b):
            p.terminate()
            p.wait()
        self.qmp.close()


def failover_times(runs=3):
    """Seconds from SIGKILL of lun0's owner to the first write the survivor serves."""
    import signal
    from hal.host.client import open_session
    from hal.host import nbd
    times = []
    for _ in range(runs):
        work = pathlib.Path(tempfile.mkdtemp(prefix="tc-failover-"))
        pair = LocalPair(work / "pair")
        try:
            pair.up(luns=2, lun_size_bytes=64 << 20, nvram_size_bytes=32 << 20)
            session = open_session(str(work / "pair" / "b" / "nbd.sock"), "lun0")
            killed = time.monotonic()
            os.kill(pair.pid("a"), signal.SIGKILL)
            cookie = 0
            while time.monotonic() - killed < 30:
                cookie += 1
                session.request(nbd.NBD_CMD_WRITE, cookie, 0, 4096, data=bytes(4096))
                error, _, _ = session.read_reply()
                if error == 0:
                    times.append(time.monotonic() - killed)
                    break
                time.sleep(0.005)
            session.close()
        finally:
            pair.down()
            shutil.rmtree(work, ignore_errors=True)
    return times


def nbd_engine_cost_us():
    """Python cost of the NBD engine alone: parse one 4 KiB write or read and build its reply."""
    from hal.host import nbd
    exports = [nbd.Export("lun0", 64 << 20, 0)]
    out = {}
    for name, op in (("write", nbd.NBD_CMD_WRITE), ("read", nbd.NBD_CMD_READ)):
        conn = nbd.NbdConnection(exports)
        hello = b"\0\0\0\x03" + b"IHAVEOPT" + (1).to_bytes(4, "big") + (4).to_bytes(4, "big") + b"lun0"
        _feed(conn, hello)
        conn.pending_output()
        payload = bytes(4096) if op == nbd.NBD_CMD_WRITE else b""
        req = (0x25609513).to_bytes(4, "big") + (0).to_bytes(2, "big") + op.to_bytes(2, "big") + \
            (7).to_bytes(8, "big") + (8192).to_bytes(8, "big") + (4096).to_bytes(4, "big") + payload
        data = bytes(4096)
        n = 20000
        start = time.perf_counter()
        for _ in range(n):
            for r in _feed(conn, req):
                conn.reply(r, 0, data if op == nbd.NBD_CMD_READ else None)
            conn.pending_output()
        out[name] = (time.perf_counter() - start) / n * 1e6
    return out


def _feed(conn, data):
    buf = conn.recv_buffer()
    buf[:len(data)] = data
    return conn.received(len(data))


def main(rounds=3, seconds=5, out_dir="bench-report"):
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {t: {w: [] for w in WORKLOADS} for t in TARGETS}
    work = pathlib.Path(tempfile.mkdtemp(prefix="tc-bench-"))
    try:
        for r in range(rounds):
            for target_cls in (Twincache, Nbdkit, QsdMirror):
                target = target_cls()
                uri = target.start(_fresh(work, target.name, r))
                try:
                    for wname, wl in WORKLOADS.items():
                        res = fio(uri, wl, seconds)
                        results[target.name][wname].append(res)
                        print(f"round {r + 1}/{rounds} {target.name:9} {wname:13} "
                              f"{res['iops']:9.0f} IOPS  p50 {res['p50_us']:7.1f} us  "
                              f"p99 {res['p99_us']:7.1f} us", flush=True)
                finally:
                    target.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fo = failover_times()
    engine = nbd_engine_cost_us()
    report = render(results, rounds, seconds)
    if fo:
        report += (f"\nFailover (SIGKILL of lun0's owner to the first write served by the survivor, "
                   f"default timeouts, {len(fo)} runs): min/median/max "
                   f"{min(fo):.2f}/{statistics.median(fo):.2f}/{max(fo):.2f} s. Bounded by "
                   f"takeover_wait_ms (900) + lease_ms + renew_interval_ms (claim read-back, 500) "
                   f"+ the mirror replay.\n")
    try:
        from hal.tools.bench_replica import report as replica_report
        report += replica_report()
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        report += f"\nReplica quick resync: not measured ({exc}).\n"
    from hal.tools.bench_destage import report as destage_report
    report += destage_report(progress=lambda line: print(line, flush=True))
    from hal.tools.bench_tls import report as tls_report
    report += tls_report(rounds, seconds, progress=lambda line: print(line, flush=True))
    from hal.tools.bench_linkauth import report as linkauth_report
    report += linkauth_report(rounds, seconds, progress=lambda line: print(line, flush=True))
    report += (f"\nNBD engine alone (Python, per request incl. reply): 4 KiB write "
               f"{engine['write']:.1f} us, 4 KiB read {engine['read']:.1f} us.\n")
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "report.png")
    print("\n" + report)
    print(f"report: {out / 'report.md'}, plot: {out / 'report.png'}")


def _fresh(work, name, r):
    d = work / f"{name}-{r}"
    d.mkdir(parents=True)
    return d


def _mmm(values, fmt="{:.0f}"):
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def render(results, rounds, seconds):
    lines = [f"# twincache bench ({rounds} rounds x {seconds} s per run, rotated; fio pinned to CPU "
             f"{FIO_CPU}, every server process to CPU {SERVER_CPU})", "",
             "Figures are min/median/max IOPS (clat p50 / p99 in us, medians).", "",
             "| workload | twincache | nbdkit | C sync mirror | tc/nbdkit | tc/mirror |",
             "| --- | --- | --- | --- | --- | --- |"]
    for w in WORKLOADS:
        cells, med = [], {}
        for t in TARGETS:
            runs = results[t][w]
            iops = [x["iops"] for x in runs]
            med[t] = statistics.median(iops)
            p50 = statistics.median(x["p50_us"] for x in runs)
            p99 = statistics.median(x["p99_us"] for x in runs)
            cells.append(f"{_mmm(iops)} ({p50:.0f} / {p99:.0f})")
        lines.append(f"| {w} | " + " | ".join(cells) +
                     f" | {med['twincache'] / med['nbdkit']:.2f} | {med['twincache'] / med['mirror']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.27
    for i, t in enumerate(TARGETS):
        meds = [statistics.median(x["iops"] for x in results[t][w]) for w in WORKLOADS]
        ax.bar([j + i * width for j in range(len(WORKLOADS))], meds, width, label=t)
    ax.set_xticks([j + width for j in range(len(WORKLOADS))], list(WORKLOADS))
    ax.set_ylabel("IOPS (median)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("fio nbd engine, 256 MiB volumes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
