"""The cost of per-frame link authentication (firmware/link_auth.py): with MACs and without, one run.

Two figures:

- The link path in one process: controller a's LinkSession sealing 4 KiB
  MIRROR_WRITE frames (and 64-byte control frames), a StreamFramer cutting
  them out of the byte stream, b's LinkSession checking and taking them,
  and b's acks going back. "without" is the same two sessions with their
  keys dropped after the handshake (FrameAuth.reset()), so the only
  difference is the MAC; rounds alternate. Frames/s and MB/s of payload.
- A pair (`--pair`, and in `inv bench`): fio 4 KiB QD1/QD16 and 1 MiB QD8
  writes through lun0's owner, on this tree and on the tree of the commit
  before frame MACs (git archive of it into a temporary directory; the
  controllers run from there with LocalPair.code_root), alternating, pinned
  like hal/tools/bench.py. Prints median IOPS, the ratio and the owner's CPU per
  request, which moves less than IOPS on a busy machine.

    PYTHONPATH=. python -m hal.tools.bench_linkauth [--frames N] [--pair] [--rounds R] [--seconds S]
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import subprocess
import tempfile
import time

from firmware.formats import frame as F
from firmware.formats import messages as M
from firmware.link import LinkSession

from hal.backends.framing import StreamFramer

MODES = ("without", "with")
BATCH_FRAMES = 64          # frames a sends before b's acks come back (one link read's worth)
PAIR_ID = bytes(16)
KEY = bytes(range(32))


def _sessions():
    a, b = LinkSession(0, PAIR_ID, KEY), LinkSession(1, PAIR_ID, KEY)
    a.connected(b"\x01" * 32, 0)
    b.connected(b"\x02" * 32, 0)
    for _ in range(4):
        for src, dst in ((a, b), (b, a)):
            for frame in F.split_frames(b"".join(src.take_output())):
                dst.receive(frame, 0)
    assert a.up and b.up
    return a, b


def _set_mode(a, b, mode):
    for s in (a, b):
        s.auth.reset()                      # no keys: frames go, and are taken, without a MAC
        if mode == "with":
            s.auth.start(s.hello_body, s.peer_hello_body)


def _run(a, b, payload, frames, lane) -> float:
    """Seconds to carry `frames` messages a -> b through the framer, acks back."""
    framer_b, framer_a = StreamFramer("b"), StreamFramer("a")
    msg_type = M.MsgType.MIRROR_WRITE if lane == F.LANE_DATA else M.MsgType.PING
    start = time.perf_counter()
    sent = 0
    while sent < frames:
        for _ in range(BATCH_FRAMES):
            a.send(msg_type, M.Resource.MIRROR, payload, lane=lane)
        sent += BATCH_FRAMES
        got = 0
        for frame in framer_b.feed(b"".join(a.take_output())):
            got += b.receive(frame, 0) is not None
        assert got == BATCH_FRAMES, got
        b.tick(0)                           # an idle receiver acknowledges now (the runtime's tick)
        for frame in framer_a.feed(b"".join(b.take_output())):
            a.receive(frame, 0)
    return time.perf_counter() - start


def link_path(frames=20_000, rounds=3):
    """{case: {mode: [frames/s per round]}} for 4 KiB data frames and 64 B control frames."""
    cases = {"4 KiB MIRROR_WRITE": (bytes(4096), F.LANE_DATA), "64 B control": (bytes(64), F.LANE_CONTROL)}
    out = {case: {m: [] for m in MODES} for case in cases}
    a, b = _sessions()
    for r in range(rounds):
        for case, (payload, lane) in cases.items():
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                _set_mode(a, b, mode)
                out[case][mode].append(frames / _run(a, b, payload, frames, lane))
    return out


def render_link_path(results, frames) -> str:
    lines = [f"\nLink path in one process (seal, StreamFramer, check and take, acks back), {frames} frames "
             f"a round, rounds alternating; median frames/s (MB/s of payload) and us per frame:", "",
             "| frames | without MAC | with MAC | with/without | cost per frame |", "| --- | --- | --- | --- | --- |"]
    for case, by_mode in results.items():
        size = 4096 if case.startswith("4 KiB") else 64
        med = {m: statistics.median(v) for m, v in by_mode.items()}
        cells = [f"{med[m]:,.0f}/s ({med[m] * size / 1e6:.0f} MB/s)" for m in MODES]
        extra_us = (1 / med["with"] - 1 / med["without"]) * 1e6
        lines.append(f"| {case} | {cells[0]} | {cells[1]} | {med['with'] / med['without']:.2f} | "
                     f"+{extra_us:.1f} us |")
    return "\n".join(lines) + "\n"


# -- the pair: this tree against the commit before frame MACs ------------------------

WORKLOADS = {
    "4k QD1": dict(rw="randwrite", bs="4k", iodepth=1),
    "4k QD16": dict(rw="randwrite", bs="4k", iodepth=16),
    "1M seq QD8": dict(rw="write", bs="1M", iodepth=8),
}


def base_commit(root) -> str:
    """The parent of the commit that brought FLAG_AUTH into firmware/formats/frame.py."""
    out = subprocess.run(["git", "-C", str(root), "log", "--format=%H", "--reverse", "-S", "FLAG_AUTH = 0x04",
                          "--", "firmware/formats/frame.py"], capture_output=True, text=True, check=True)
    first = out.stdout.split()[0]
    parent = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", first + "^"],
                            capture_output=True, text=True, check=True)
    return parent.stdout.strip()


def _base_tree(root, ref, dest) -> pathlib.Path:
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(root), "archive", ref], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def pair_compare(rounds=3, seconds=5, base=None, progress=None):
    """{workload: {mode: [fio result with owner_cpu_us]}}, and the base commit measured against."""
    from hal.tools.fio import cpu_seconds, pin, fio
    from hal.tools.pair import LocalPair
    root = LocalPair.code_root
    base = base or base_commit(root)
    work = pathlib.Path(tempfile.mkdtemp(prefix="tc-linkauth-"))
    pairs = {"with": LocalPair(work / "with"), "without": LocalPair(work / "without")}
    pairs["without"].code_root = _base_tree(root, base, work / "base-tree")
    results = {w: {m: [] for m in MODES} for w in WORKLOADS}
    try:
        for pair in pairs.values():
            pair.up(luns=1, lun_size_bytes=256 << 20, nvram_size_bytes=64 << 20)
            for name in ("a", "b"):
                pin(pair.pid(name))
        for r in range(rounds):
            for wname, wl in WORKLOADS.items():
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    pair = pairs[mode]
                    owner = pair.pid("a")
                    cpu0 = cpu_seconds(owner)
                    res = fio(f"nbd+unix:///lun0?socket={pair.dir / 'a' / 'nbd.sock'}", wl, seconds)
                    res["owner_cpu_us"] = (cpu_seconds(owner) - cpu0) * 1e6 / max(1.0, res["iops"] * (seconds + 1))
                    results[wname][mode].append(res)
                    if progress:
                        progress(f"linkauth round {r + 1}/{rounds} {mode:7} {wname:11} {res['iops']:9.0f} IOPS  "
                                 f"p50 {res['p50_us']:7.1f} us  owner CPU {res['owner_cpu_us']:6.0f} us/request")
    finally:
        for pair in pairs.values():
            pair.down()
        shutil.rmtree(work, ignore_errors=True)
    return results, base


def render_pair(results, base, rounds, seconds) -> str:
    lines = [f"\nLink frame MACs on a pair: this tree against {base} (the code before them), lun0 on its owner, "
             f"{rounds} rounds x {seconds} s, alternating. Min/median/max IOPS:", "",
             "| workload | without MAC | with MAC | with/without (median IOPS) | owner CPU us/request without -> with |",
             "| --- | --- | --- | --- | --- |"]
    for w in WORKLOADS:
        cells, med, cpu = [], {}, {}
        for m in MODES:
            iops = sorted(x["iops"] for x in results[w][m])
            med[m] = statistics.median(iops)
            cpu[m] = statistics.median(x["owner_cpu_us"] for x in results[w][m])
            cells.append(f"{iops[0]:.0f}/{med[m]:.0f}/{iops[-1]:.0f}")
        lines.append(f"| {w} | {cells[0]} | {cells[1]} | {med['with'] / med['without']:.2f} | "
                     f"{cpu['without']:.0f} -> {cpu['with']:.0f} |")
    return "\n".join(lines) + "\n"


def report(rounds=3, seconds=5, frames=20_000, pair=True, progress=None) -> str:
    text = render_link_path(link_path(frames, rounds), frames)
    if pair:
        try:
            results, base = pair_compare(rounds, seconds, progress=progress)
            text += render_pair(results, base, rounds, seconds)
        except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
            text += f"\nLink frame MACs on a pair: not measured ({exc}).\n"
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--pair", action="store_true", help="also fio on a pair, against the code before MACs")
    args = parser.parse_args()
    print(report(args.rounds, args.seconds, args.frames, args.pair,
                 progress=lambda line: print(line, flush=True)), flush=True)
