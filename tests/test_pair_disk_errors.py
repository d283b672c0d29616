"""A LUN's disk failing writes under load, on real processes.

A local pair whose disks fail on command (hal/backends/disk_faulty.py: while
`disk0.img.fail-writes` exists every write and flush of lun0's disk raises
EIO). A host pipelines self-describing 4 KiB writes to lun0 through its
owner while the disk fails; the test measures what the controllers do and
what the host sees: a handful of coalesced events, the LUN degraded within
the bound, EIO (never a hang) for its writes from then on, reads served, and
full recovery with every acknowledged write on disk once the disk heals.
"""
import json
import os
import pathlib
import random
import subprocess
import sys
import threading
import time

import pytest

from firmware.formats.disklabel import DATA_OFFSET_BYTES
from fixtures.pair import LoggedWriter, block_pattern, make_pair, qemu_io, read_block_via

pytestmark = pytest.mark.needs("qemu-io")

DEGRADED_AFTER_MS = 2000
RETRY_MAX_MS = 1000
# The 60 s, scaled; the event bound is scaled with it (TWINCACHE_DISK_FAILING_S=60 runs it whole).
FAILING_S = float(os.environ.get("TWINCACHE_DISK_FAILING_S", "15"))
EVENTS_PER_60_S_MAX = 1000
NVRAM_BYTES = 8 << 20          # a small cache, so that it fills with lines that cannot go to disk
BLOCKS = 8192                   # 32 MiB of lun0: much more than the cache holds


class TimedWriter(LoggedWriter):
    """A LoggedWriter that times every reply and never swallows a timeout (a hang fails the test)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.sent_at = {}
        self.replies = []          # (sent, replied, error) in wall-clock seconds

    def _send(self, block):
        self.sent_at[self.next_version] = time.time()
        super()._send(block)

    def _reap(self):
        error, cookie, _ = self.client.read_reply()
        block, version = self.inflight.pop(cookie)
        self.replies.append((self.sent_at.pop(cookie), time.time(), error))
        if error:
            self.errors += 1
        elif version > self.acked.get(block, 0):
            self.acked[block] = version
        return error

    def run_until(self, deadline, rng):
        while time.time() < deadline:
            while len(self.inflight) >= self.depth:
                if self._reap():
                    time.sleep(0.005)           # refused writes come back at once: pace the host
            self._send(rng.randrange(self.blocks))
        while self.inflight:
            self._reap()


def events_between(pair, start, end):
    return [e for name in ("a", "b") for e in pair.events(name) if start <= e["ts"] < end]


def busiest_second(events):
    times = sorted(e["ts"] for e in events)
    return max((sum(1 for u in times if t <= u < t + 1.0) for t in times), default=0)


def in_thread(fn, *args):
    box = {}

    def body():
        try:
            fn(*args)
        except BaseException as exc:        # a hang shows up here as a socket timeout
            box["error"] = exc
    t = threading.Thread(target=body)
    t.start()
    return t, box


def wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def test_lun_disk_failing_writes_degrades_within_the_bound_and_recovers_with_every_acked_write(
        tmp_path, monkeypatch):
    monkeypatch.setenv("TWINCACHE_TEST_FAULTS", "1")
    pair = make_pair(tmp_path, nvram_size_bytes=NVRAM_BYTES, cache={"degraded_after_ms": DEGRADED_AFTER_MS, "disk_retry_max_ms": RETRY_MAX_MS},
                     disks={"fault_files": True})
    try:
        pair.wait_settled()
        rng = random.Random(13)
        writer = TimedWriter(pair.socket_path("a"), 0, blocks=BLOCKS, depth=8)
        writer.run_until(time.time() + 1.0, rng)           # healthy: all acknowledged
        assert writer.errors == 0 and len(writer.acked) > 100
        control = pathlib.Path(pair.disk_path(0) + ".fail-writes")

        # -- the disk fails writes, under load -------------------------------
        failed_at = time.time()
        control.touch()
        thread, box = in_thread(writer.run_until, failed_at + FAILING_S, rng)
        degraded = pair.wait_event("a", "lun_degraded", since=failed_at, lun=0, timeout_s=FAILING_S)
        first_error = pair.wait_event("a", "disk_error", since=failed_at, lun=0)
        time.sleep(1.0)
        assert pair.status("a")["disks"]["lun0"]["state"] == "degraded"
        assert pair.status("a")["disks"]["lun1"]["state"] == "ok"
        shown = subprocess.run([sys.executable, "-m", "hal.cli", "status", "--dir", str(pair.dir)],
                               capture_output=True, text=True, timeout=30)
        assert "lun0: disk DEGRADED" in shown.stdout, shown.stdout + shown.stderr
        refused = qemu_io(pair.uri("b", 0), "write -P 0x5a 60M 4k", check=False)   # a real client, via b
        assert refused.returncode != 0 and "Input/output error" in refused.stdout + refused.stderr
        for name in ("a", "b"):                            # reads are served meanwhile
            assert writer.check(read_block_via(pair, name, 0)) == []
        assert qemu_io(pair.uri("a", 1), "write -P 0x61 0 64k", "read -P 0x61 0 64k").returncode == 0
        thread.join(timeout=FAILING_S + 30)
        assert not thread.is_alive() and "error" not in box, box.get("error")

        # -- heal -------------------------------------------------------------
        healed_at = time.time()
        control.unlink()
        recovered = pair.wait_event("a", "lun_recovered", since=healed_at, lun=0, timeout_s=10)
        window = events_between(pair, failed_at, healed_at)
        kinds = {}
        for e in window:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        first_eio = min(sent for sent, _replied, error in writer.replies if error and sent >= failed_at)
        eio_after = [(replied - sent) for sent, replied, error in writer.replies
                     if sent >= degraded["ts"] + 0.1 and sent < healed_at]
        figures = dict(events=len(window), event_kinds=kinds, busiest_second=busiest_second(window),
                       first_disk_error_s=round(first_error["ts"] - failed_at, 3),
                       degraded_s=round(degraded["ts"] - failed_at, 3),
                       first_eio_sent_s=round(first_eio - failed_at, 3),
                       recovered_s=round(recovered["ts"] - healed_at, 3),
                       writes_acked=len(writer.acked), writes_refused=writer.errors,
                       waited_max_s=round(max(replied - sent for sent, replied, _e in writer.replies
                                              if failed_at <= sent < degraded["ts"]), 3),
                       refused_reply_max_s=round(max(eio_after), 3))
        print("disk failure figures:", json.dumps(figures))
        assert len(window) < EVENTS_PER_60_S_MAX * FAILING_S / 60, figures
        assert figures["busiest_second"] <= 6, figures
        assert kinds.get("lun_degraded") == 1 and not kinds.get("takeover") and not kinds.get("fenced"), kinds
        assert degraded["ts"] - first_error["ts"] <= DEGRADED_AFTER_MS / 1000 + 0.5, figures
        assert first_eio - first_error["ts"] <= DEGRADED_AFTER_MS / 1000 + 1.0, figures
        assert eio_after and max(eio_after) < 0.5, figures        # refused at once, never a wait
        # The cache filled up before: writes waited for blocks, and got EIO when the LUN degraded.
        assert DEGRADED_AFTER_MS / 1000 / 4 < figures["waited_max_s"] < DEGRADED_AFTER_MS / 1000 + 1.0, figures
        assert all(error == 5 for sent, _r, error in writer.replies if sent >= degraded["ts"] + 0.1
                   and sent < healed_at), "every write to the degraded LUN gets EIO"
        assert recovered["ts"] - healed_at <= RETRY_MAX_MS / 1000 + 1.0, figures
        assert sum(os.path.getsize(pair.dir / n / "events.jsonl") for n in ("a", "b")) < 1 << 20

        # -- recovered: writes work, everything acknowledged reaches the disk --
        assert pair.status("a")["disks"]["lun0"] == {"state": "ok"}
        errors_before = writer.errors
        writer.run_until(time.time() + 1.0, rng)
        assert writer.errors == errors_before
        wait_for(lambda: pair.status("a")["dirty_blocks"] == 0, 20, "a destaged every line")
        for name in ("a", "b"):
            assert writer.check(read_block_via(pair, name, 0)) == []
        with open(pair.disk_path(0), "rb") as disk:
            def from_disk(block):
                disk.seek(DATA_OFFSET_BYTES + block * 4096)
                return disk.read(4096)
            assert writer.check(from_disk) == []
        assert len(writer.acked) > 1000
        assert block_pattern(0, 0, 1) != bytes(4096)
    finally:
        pair.stop_all()


def test_a_takeover_claim_whose_record_write_fails_says_so_backs_off_and_completes_once_healed(
        tmp_path, monkeypatch):
    """The owner of lun0 dies while lun0's disk fails writes: the survivor's claim cannot be
    written. It must say that (not "the owner renewed over our claim"), try again less and less
    often, and take the LUN over with every acknowledged write once the disk heals."""
    monkeypatch.setenv("TWINCACHE_TEST_FAULTS", "1")
    pair = make_pair(tmp_path, cache={"disk_retry_max_ms": 4000}, disks={"fault_files": True})
    try:
        pair.wait_settled()
        rng = random.Random(17)
        writer = TimedWriter(pair.socket_path("b"), 0, blocks=1024, depth=8)   # via b, owned by a
        writer.run_until(time.time() + 1.0, rng)
        assert writer.errors == 0 and writer.acked
        control = pathlib.Path(pair.disk_path(0) + ".fail-writes")
        control.touch()
        killed_at = time.time()
        pair.kill("a")
        time.sleep(14.0)
        events = [e for e in pair.events("b") if e["ts"] >= killed_at]
        claims = [e["ts"] for e in events if e["kind"] == "takeover_claim" and e["lun"] == 0]
        abandoned = [e for e in events if e["kind"] == "takeover_abandoned" and e["lun"] == 0]
        failed = [e for e in events if e["kind"] == "reservation_write_failed" and e["lun"] == 0]
        gaps = [round(b - a, 2) for a, b in zip(claims, claims[1:])]
        print("claims after the kill:", [round(t - killed_at, 2) for t in claims], "gaps", gaps)
        assert abandoned and all("record write failed (errno 5)" in e["reason"] for e in abandoned)
        assert failed and "CLAIMED" in failed[0]["record"]
        assert len(claims) <= 6, gaps                     # 10 in 14 s, looping every 1.4 s
        assert gaps[-1] > 3.0, gaps                       # backing off
        healed_at = time.time()
        control.unlink()
        took = pair.wait_event("b", "takeover", since=healed_at, lun=0, timeout_s=15)
        print("takeover after the heal:", round(took["ts"] - healed_at, 2), "s")
        assert writer.check(read_block_via(pair, "b", 0)) == []
    finally:
        pair.stop_all()


def test_fault_files_need_the_test_environment_and_the_knobs_reach_the_firmware(monkeypatch):
    from hal.runtime import config as C
    from hal.runtime.loop import firmware_params
    doc = {"controller": {"name": "a", "pair_id": "00" * 16},
           "disks": {"paths": ["/nonexistent/disk0.img"], "fault_files": True},
           "nbd": {"unix": "/nonexistent/nbd.sock"},
           "cache": {"degraded_after_ms": 1234, "disk_retry_max_ms": 800}}
    monkeypatch.delenv("TWINCACHE_TEST_FAULTS", raising=False)
    with pytest.raises(C.ConfigError, match="fault_files is for tests"):
        C.from_dict(doc)
    monkeypatch.setenv("TWINCACHE_TEST_FAULTS", "1")
    cfg = C.from_dict(doc)
    params = firmware_params(cfg, [type("D", (), {"data_size": 1 << 20})()], True)
    assert (params.degraded_after_ms, params.disk_retry_max_ms) == (1234, 800)
    with pytest.raises(C.ConfigError, match="degraded_after_ms"):
        C.from_dict(dict(doc, cache={"degraded_after_ms": 0}))


def test_disks_that_ignore_flushes_are_for_benchmarks_only(monkeypatch, tmp_path):
    from hal.runtime import config as C
    from hal.backends.disk_array import DiskArray
    from hal.backends.disk_faulty import IgnoreFlushFileDisk
    doc = {"controller": {"name": "a", "pair_id": "00" * 16},
           "disks": {"paths": [str(tmp_path / "disk0.img")], "lun_size": "1M", "write_cache": "ignore-flush"},
           "nbd": {"unix": str(tmp_path / "nbd.sock")}}
    monkeypatch.delenv("TWINCACHE_TEST_FAULTS", raising=False)
    with pytest.raises(C.ConfigError, match="loses data at a power cut"):
        C.from_dict(doc)
    monkeypatch.setenv("TWINCACHE_TEST_FAULTS", "1")
    cfg = C.from_dict(doc)
    array = DiskArray.open(cfg.disks, cfg.pair_id, create=True)
    try:
        assert [type(d.raw) for d in array.disks] == [IgnoreFlushFileDisk]
    finally:
        array.close()
