"""Host workloads for the simulator: clients issuing I/O through both controllers.

Each client issues one request at a time (reads, writes of 512 B .. 256 KiB
aligned and unaligned to 4 KiB, FUA writes, flushes, trims, write-zeroes)
on a random LUN through a random live controller, so both paths (owner and
forwarding partner) are used concurrently. The workload only makes requests
and hands results to the checker (`Model`); it judges nothing itself.
"""
from hal.sim.check import SimFailure, make_data

SECTOR_BYTES = 512
BLOCK_BYTES = 4096
MAX_IO_BYTES = 256 * 1024
EIO = 5


class Req:
    __slots__ = ("id", "client", "kind", "lun", "offset", "length", "fua", "node", "start_us", "rec",
                 "data", "served")

    def __init__(self, id, client, kind, lun, offset, length, fua, node, start_us):
        self.id = id
        self.client = client
        self.kind = kind
        self.lun = lun
        self.offset = offset
        self.length = length
        self.fua = fua
        self.node = node
        self.start_us = start_us
        self.rec = None
        self.data = None
        self.served = None        # fencing: (controller, how) that took it on (hal/sim/ha.py)

    def __repr__(self):
        return (f"Req({self.id} {self.kind} lun{self.lun} {self.offset}+{self.length}"
                f"{' fua' if self.fua else ''} via {'ab'[self.node]})")


class Workload:
    MIX = (("write", 45), ("read", 38), ("flush", 5), ("trim", 3), ("zeroes", 3), ("fua", 6))

    def __init__(self, rng, lun_sizes, model, clients=6, ops_max=1000):
        self.rng = rng
        self.lun_sizes = lun_sizes
        self.model = model
        self.clients = clients
        self.ops_max = ops_max
        self.issued = 0
        self.next_wid = 1
        self.outstanding = {}          # req id -> Req
        self.stats = {k: 0 for k in ("write", "read", "flush", "trim", "zeroes", "fua",
                                     "ok", "eio", "lost", "read_bytes", "write_bytes")}
        self._kinds = [k for k, w in self.MIX for _ in range(w)]

    def _extent(self):
        rng = self.rng
        lun = rng.randrange(len(self.lun_sizes))
        size = self.lun_sizes[lun]
        length = SECTOR_BYTES << rng.choice((0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9))
        if rng.random() < 0.5:          # unaligned: any sector count, any sector offset
            length = rng.randint(1, length // SECTOR_BYTES) * SECTOR_BYTES
            offset = rng.randrange(0, size - length + 1, SECTOR_BYTES)
        else:
            length = max(length, BLOCK_BYTES)
            offset = rng.randrange(0, size - length + 1, BLOCK_BYTES)
        return lun, offset, min(length, MAX_IO_BYTES)

    def issue(self, client, now_us, nodes):
        """A new request for `client` through one of `nodes` (live controllers), or None."""
        if self.issued >= self.ops_max or not nodes:
            return None
        rng = self.rng
        kind = rng.choice(self._kinds)
        lun, offset, length = self._extent()
        req = Req(self.issued, client, kind, lun, offset, length, kind == "fua", rng.choice(nodes), now_us)
        self.issued += 1
        self.stats[kind] += 1
        if kind in ("write", "fua", "zeroes"):
            wid = 0 if kind == "zeroes" else self._wid()
            req.data = None if kind == "zeroes" else make_data(wid, lun, offset, length)
            req.rec = self.model.write_started(wid, lun, offset, length, now_us)
            self.stats["write_bytes"] += length
        self.outstanding[req.id] = req
        return req

    def _wid(self):
        wid = self.next_wid
        self.next_wid += 1
        return wid

    def replied(self, req, error, data, now_us):
        """The host got its answer: tell the model, check a read."""
        if self.outstanding.pop(req.id, None) is None:
            raise SimFailure(f"{req} answered twice or after it was given up")
        if error:
            self.stats["eio"] += 1
            if req.client < 0:
                raise SimFailure(f"{req} failed with errno {error} in the final phase (no faults left)")
            if error != EIO:
                raise SimFailure(f"{req} failed with errno {error}, expected 0 or EIO")
            return
        self.stats["ok"] += 1
        if req.rec is not None:
            self.model.acked(req.rec, now_us)
        elif req.kind == "read":
            if data is None or len(data) != req.length:
                raise SimFailure(f"{req} returned {None if data is None else len(data)} bytes")
            self.stats["read_bytes"] += req.length
            self.model.check(f"read {req}", req.lun, req.offset, data, req.start_us, now_us)

    def node_down(self, node):
        """Controller `node` died: its requests are lost (writes may or may not have happened)."""
        lost = [r for r in self.outstanding.values() if r.node == node]
        for req in lost:
            del self.outstanding[req.id]
            self.stats["lost"] += 1
        return lost

    def readback_request(self, node, lun, offset, length, now_us):
        """A read the final phase makes (no client: nothing follows it)."""
        req = Req(self.issued, -1, "read", lun, offset, length, False, node, now_us)
        self.issued += 1
        self.outstanding[req.id] = req
        return req
