"""Checkers for the simulator, kept apart from the workloads that feed them.

`Model` is the host's view of every 512 B sector: the writes that touched
it, each with its start time and, once the host has its acknowledgement,
its end time. Write data is self-describing (`sector_bytes`): each sector
names the write that made it, its LUN and sector, and every 8-byte word of
it depends on the write, so a torn or corrupt sector is recognised as such.

Every simulator (ha, replica's bitmap and log variants) stamps its writes so
and keeps one `Model`; a sector's key names its LUN and sector, and in the
log variant its source (`sector_key`). Two rules read it:

- real-time order (ha mode, `check`): a read may return the value of any
  write that began before the read ended, unless that write is overwritten:
  some other write began after it was acknowledged and was itself
  acknowledged before the read began. A write that failed or was lost in a
  crash has no end: it may appear at any later time (it may have been
  applied), but never hides an older value.
- acknowledged floors (replica mode, `check_floor`): write ids grow in the
  order writes begin, and a side must hold, per sector, a write the hosts
  made that is no older than a floor: the newest write acknowledged to the
  hosts (`newest_acked`), or acknowledged through the secondary or the
  destination (`newest_shipped`, what a promotion or a disaster must keep),
  as of a moment the check names.

Checkers raise `SimFailure`. White-box checks (what a failover would find
in the partner's persisted NVRAM, what a restart recovered, mirror == dirty
primary, split brain, queue bounds) look at the Controller objects and the
simulated NVRAM and disks without changing them.
"""
import struct
import traceback

from firmware.cache import LUN_SHIFT, SECTOR_BYTES
from firmware.formats import nvram as N
from firmware.segment import Segment

class SimResult:
    """One run of any of the simulators: its verdict, trace hash, stats and the command that
    replays it (`replay`, which names the mode, the variant and every flag the run used)."""

    def __init__(self, seed, steps, failure, trace_hash, stats, replay_flags):
        self.seed, self.steps = seed, steps
        self.ok = failure is None
        self.failure = failure
        self.trace_hash = trace_hash
        self.stats = stats
        self.replay = f"inv sim --seed {seed} --steps {steps} {replay_flags}".rstrip()

    def __repr__(self):
        return f"SimResult(seed={self.seed}, ok={self.ok}, hash={self.trace_hash[:16]})"


HEAD = struct.Struct("<QII")            # write id, LUN, sector
SOURCE_SHIFT = 56                       # sector_key: above the LUN (firmware/cache.py's LUN_SHIFT)
ZERO_SECTOR = bytes(SECTOR_BYTES)
GARBAGE = -1


class SimFailure(AssertionError):
    """A promise of the firmware was broken (or the simulator could not go on)."""


def verdict(body):
    """Run a simulation's `body`: None if it finished, else what failed (a checker's SimFailure,
    or the firmware or the simulator raising anything else, with its traceback)."""
    try:
        body()
    except SimFailure as exc:
        return str(exc)
    except Exception:                   # the firmware itself blew up: a bug too
        return "firmware or simulator raised:\n" + traceback.format_exc()
    return None


def sector_bytes(wid, lun, sector):
    return HEAD.pack(wid, lun, sector) + wid.to_bytes(8, "little") * 62


def make_data(wid, lun, offset, length):
    first = offset // SECTOR_BYTES
    filler = wid.to_bytes(8, "little") * 62
    pack = HEAD.pack
    return b"".join(pack(wid, lun, s) + filler for s in range(first, first + length // SECTOR_BYTES))


def sector_key(lun, sector, source=0):
    """The model's key for a sector: LUN and sector, and the log variant's source."""
    return (source << SOURCE_SHIFT) | (lun << LUN_SHIFT) | sector


def decode_run(data, lun, first_sector, what, source=0):
    """The write id of each sector of `data` (0: never written); a sector no write made fails."""
    out = []
    for i in range(len(data) // SECTOR_BYTES):
        wid = decode_sector(data[i * SECTOR_BYTES:(i + 1) * SECTOR_BYTES], lun, first_sector + i)
        if wid == GARBAGE:
            raise SimFailure(f"{what}: {_where(source, lun)} sector {first_sector + i} holds bytes no "
                             f"write put there (torn or corrupt)")
        out.append(wid)
    return out


def _where(source, lun):
    return f"lun{lun}" if not source else f"source {source} lun{lun}"


def decode_sector(sec, lun, sector):
    """The write id a sector holds: 0 for zeros, GARBAGE if it is not a whole sector of one write."""
    if sec == ZERO_SECTOR:
        return 0
    wid, slun, ssector = HEAD.unpack_from(sec)
    if slun != lun or ssector != sector or sec[16:] != wid.to_bytes(8, "little") * 62:
        return GARBAGE
    return wid


class WriteRec:
    __slots__ = ("wid", "start_us", "end_us")

    def __init__(self, wid, start_us, end_us=None):
        self.wid = wid
        self.start_us = start_us
        self.end_us = end_us


INITIAL = WriteRec(0, -2, -1)


class Model:
    def __init__(self):
        self.hist = {}                   # sector_key -> [WriteRec], in the order they began
        self.newest_acked = {}           # sector_key -> newest write id acknowledged (replica floors)
        self.newest_shipped = {}         # sector_key -> newest acknowledged through the secondary

    def write_started(self, wid, lun, offset, length, now_us=0, source=0):
        rec = WriteRec(wid, now_us)
        hist = self.hist
        base = sector_key(lun, offset // SECTOR_BYTES, source)
        for key in range(base, base + length // SECTOR_BYTES):
            h = hist.get(key)
            if h is None:
                hist[key] = [INITIAL, rec]
            else:
                h.append(rec)
        return rec

    @staticmethod
    def acked(rec, now_us):
        rec.end_us = now_us

    def allowed(self, key, rs_us, re_us):
        """The write ids a read of one sector, running [rs, re], may return."""
        h = self.hist.get(key)
        if h is None:
            return {0}
        cutoff = max((r.start_us for r in h if r.end_us is not None and r.end_us < rs_us), default=-3)
        return {r.wid for r in h if r.start_us < re_us and (r.end_us is None or r.end_us >= cutoff)}

    def check(self, what, lun, offset, data, rs_us, re_us):
        """Check every sector of `data` (read from `offset` of `lun`); raise SimFailure."""
        base = (lun << LUN_SHIFT) + offset // SECTOR_BYTES
        first = offset // SECTOR_BYTES
        for i in range(len(data) // SECTOR_BYTES):
            value = decode_sector(data[i * SECTOR_BYTES:(i + 1) * SECTOR_BYTES], lun, first + i)
            self.check_value(what, lun, first + i, base + i, value, rs_us, re_us)

    def check_value(self, what, lun, sector, key, value, rs_us, re_us):
        allowed = self.allowed(key, rs_us, re_us)
        if value not in allowed:
            shown = "garbage (torn or corrupt)" if value == GARBAGE else f"write {value}"
            raise SimFailure(f"{what}: lun{lun} sector {sector} holds {shown}; allowed writes "
                             f"{sorted(allowed)} (read {rs_us}..{re_us} us)")

    # -- acknowledged floors (replica mode) ------------------------------------------

    def acked_for_floors(self, lun, first, count, wid, shipped, source=0):
        """A write of `count` sectors from `first` was acknowledged; `shipped`: through the
        secondary or the destination."""
        acked, through = self.newest_acked, self.newest_shipped
        base = sector_key(lun, first, source)
        for key in range(base, base + count):
            if wid > acked.get(key, 0):
                acked[key] = wid
            if shipped and wid > through.get(key, 0):
                through[key] = wid

    def check_floor(self, what, data, lun, first, floor, source=0):
        """Every sector of `data` (from sector `first`) holds a write the hosts made, no older
        than `floor` (sector_key -> write id)."""
        base = sector_key(lun, first, source)
        hist = self.hist
        for i, wid in enumerate(decode_run(data, lun, first, what, source)):
            key = base + i
            need = floor.get(key, 0)
            if wid < need or (wid and all(r.wid != wid for r in hist.get(key, ()))):
                raise SimFailure(f"{what}: {_where(source, lun)} sector {first + i} holds write {wid}, "
                                 f"needs {need} or newer")


# -- what the controllers and NVRAM hold (white box) ---------------------------

def mirror_image(nvram_persisted):
    """What a failover would replay from a persisted NVRAM: key -> (bitmap, data offset)."""
    sb, _slot = N.read_superblock_untrusted(nvram_persisted, "sim")
    seg = Segment(nvram_persisted, N.Geometry(sb), mirror=True)
    scan = seg.scan()
    image = {}
    for rb in sorted(scan.blocks, key=lambda b: b.seq):
        key = (rb.lun << LUN_SHIFT) | (rb.lba * SECTOR_BYTES // seg.block_size)
        image[key] = (rb.bitmap, seg.data_offset(rb.index), seg.block_size)
    return image


def lun_image(disk, lun, lines, nv):
    """A LUN as a failover or restart would serve it: disk overlaid with cache lines.

    `lines` maps line key -> (bitmap, NVRAM data offset, block size); only sectors
    whose bitmap bit is set come from NVRAM.
    """
    buf = bytearray(disk)
    for key, (bitmap, data_offset, block_size) in lines.items():
        if key >> LUN_SHIFT != lun:
            continue
        start = (key & ((1 << LUN_SHIFT) - 1)) * block_size
        for s in range(block_size // SECTOR_BYTES):
            if bitmap >> s & 1:
                a = s * SECTOR_BYTES
                buf[start + a:start + a + SECTOR_BYTES] = nv[data_offset + a:data_offset + a + SECTOR_BYTES]
    return buf


def primary_lines(ctrl):
    seg = ctrl.primary
    return {key: (line.bitmap, seg.data_offset(line.block), seg.block_size)
            for key, line in ctrl.cache.lines.items()}


def check_mirror_equal(owner, partner, owner_nv, partner_nv):
    """After a resync, at quiescence: the partner's mirror holds exactly the owner's dirty lines."""
    view, blocks, seg = partner.mirror.view, partner.mirror.blocks, partner.mirror.segment
    lines = owner.cache.lines
    if set(view) != set(lines):
        extra, missing = set(view) - set(lines), set(lines) - set(view)
        raise SimFailure(f"mirror of {'ab'[owner.id]} in {'ab'[partner.id]}: {len(missing)} dirty lines "
                         f"missing, {len(extra)} stale lines kept (e.g. {sorted(missing or extra)[:3]})")
    for key, line in lines.items():
        mb = blocks[view[key]]
        if view[key] != line.block or mb.seq != line.seq or mb.bitmap != line.bitmap:
            raise SimFailure(f"mirror block {view[key]} (seq {mb.seq}) != owner line in block "
                             f"{line.block} (seq {line.seq}) for key {key:#x}")
        a, b = owner.primary.data_offset(line.block), seg.data_offset(line.block)
        if owner_nv[a:a + seg.block_size] != partner_nv[b:b + seg.block_size]:
            raise SimFailure(f"mirror block {line.block} data differs from the owner's primary")


def check_bounds(ctrl, disk_ios):
    p, link = ctrl.params, ctrl.link
    bounds = [
        ("pending mirror writes", len(ctrl.pending), ctrl.cache.capacity),
        ("waiting writes", len(ctrl.write_path.waiting), p.waiting_max),
        ("destage in flight", ctrl.destage_inflight, p.destage_inflight_max),
        ("disk ops", disk_ios, p.destage_inflight_max * (ctrl.block_size // SECTOR_BYTES) + 4096),
        ("link unacked frames", len(link.unacked), link.unacked_max),
        ("link data in flight bytes", link.data_inflight_bytes, p.data_window_bytes + (5 << 20)),
        ("free blocks", len(ctrl.cache.free), ctrl.cache.capacity),
    ]
    for name, value, bound in bounds:
        if value > bound:
            raise SimFailure(f"controller {'ab'[ctrl.id]}: {name} {value} over its bound {bound}")


# -- no split brain, with ownership that moves (fencing on) ----------------------

class SplitBrain:
    """Promise 4 with dynamic ownership, judged on virtual time.

    Every *serving act* is recorded with the controller, the LUN, the
    generation the controller held for that LUN at that instant (its fencing
    token) and the virtual time: a host write or read the controller accepted
    to carry out itself (into its cache, write-through, or a read; forwarded
    requests count for the owner that serves them, never for the forwarder),
    and every data write of the LUN landing on the shared disk (destage,
    write-through, takeover replay), the instant a controller starts
    serving a LUN (its state becomes OWNER or SOLO under a valid lease: from
    then on it accepts host I/O, whether or not a host comes), and every tick
    it still does so. Two rules, both checkable and
    failable:
    1. one generation, one controller: a generation of a LUN is served by at
       most one controller (a claim, a handover and a solo bump each make a
       new one);
    2. no stale act: once any act under generation g happened, no act under
       an older generation happens later (a stale owner neither accepts host
       I/O nor lands a disk write after the new owner started).
    Together: at no instant do both controllers serve one LUN, and nothing a
    deposed owner still had in flight clobbers the new owner's data. A record
    claim that was written but abandoned (the owner renewed over it) makes no
    act, so it fences nobody: only what the new owner did counts.
    """

    def __init__(self, luns):
        self.by_gen = [{} for _ in range(luns)]        # generation -> controller
        self.top = [None] * luns                       # (generation, controller, t_us, what)
        self.acts = 0

    def act(self, ctrl, lun, generation, t_us, what):
        self.acts += 1
        name = "ab"[ctrl]
        first = self.by_gen[lun].setdefault(generation, ctrl)
        if first != ctrl:
            raise SimFailure(f"split brain: lun{lun} generation {generation} served by both a and b "
                             f"({name}: {what} at {t_us} us)")
        top = self.top[lun]
        if top is not None and generation < top[0]:
            raise SimFailure(f"split brain: controller {name} did {what} for lun{lun} at {t_us} us under "
                             f"generation {generation}, after {'ab'[top[1]]} did {top[3]} under generation "
                             f"{top[0]} at {top[2]} us")
        if top is None or generation > top[0]:
            self.top[lun] = (generation, ctrl, t_us, what)
