"""Fuzz target `link`: bytes into the framers, and frames from the partner into a real Controller.

Two modes, by the first byte:
- framer: the rest, cut into reads, into StreamFramer and CobsFramer; every
  frame either returns must be a whole frame that parse_frame_untrusted takes.
- pair: two unchanged Controllers (fixtures.mempair.MemPair: the real firmware,
  disks in memory) connect and authenticate; every frame from b to a goes as
  bytes through a's framer into a.link_frames. The input is a list of
  operations: host writes on either side (real mirror and forwarded traffic),
  ticks, messages b's link session sends with fuzzed type, flags, resource,
  tag and body (sealed by the real session: right sequence, ack and CRC, as a
  buggy or hostile partner holding the key would send), MIRROR_WRITEs with
  fuzzed fields and a correct data CRC, garbage bytes, flipped bytes in a
  frame (with its CRC fixed up, or not), dropped frames and reconnects.
  The link entry points handle every protocol fault themselves (a session
  reset): no exception may leave them.
"""
import collections

from firmware.formats import frame as F
from firmware.formats import messages as M
from firmware.formats import nvram as N
from fixtures.mempair import MemPair
from hal.backends.framing import CobsFramer, StreamFramer

from .reader import Reader

T = M.MsgType
READS = (1, 5, 28, 33, 200, 4096, 1 << 20)
BLOCK = 4096


def _framers(r: Reader) -> None:
    cuts = r.u8()
    stream = r.rest()
    for framer in (StreamFramer(), CobsFramer()):
        pos, k = 0, cuts
        while pos < len(stream):
            n = READS[k % len(READS)]
            k = k * 7 + 3
            for frame in framer.feed(stream[pos:pos + n]):
                F.parse_frame_untrusted(frame)      # a framer returns whole, valid frames only
            pos += n
        assert framer.buffered_bytes <= len(stream), "framer holds more than it was fed"


class FuzzPair(MemPair):
    """A MemPair whose frames to controller a travel as bytes through a's framer, with faults."""

    def __init__(self, cobs: bool, fencing: bool):
        self.framer = CobsFramer() if cobs else StreamFramer()
        self.to_a = collections.deque()     # byte chunks on their way to a's framer
        self.read_bytes = 200
        super().__init__(luns=2, lun_size=256 << 10, nvram_size=512 << 10, fencing=fencing,
                         reliable_transport=not cobs)

    def send_to_a(self, frame: bytes) -> None:
        self.to_a.extend(self.framer.encode([frame]))

    def deliver(self, limit=2000):
        while (self.wire[0] or self.wire[1] or self.to_a) and limit > 0:
            limit -= 1
            if self.wire[1] and self.ctrl[1] is not None:
                self.run(1, self.ctrl[1].link_frame(self.wire[1].popleft(), self.now_ms))
            while self.wire[0]:
                self.send_to_a(self.wire[0].popleft())
            if self.to_a:
                self._feed_a(self.to_a.popleft())

    def _feed_a(self, chunk: bytes) -> None:
        ctrl = self.ctrl[0]
        for pos in range(0, len(chunk), self.read_bytes):
            frames = self.framer.feed(chunk[pos:pos + self.read_bytes])
            if frames and ctrl.link.state != "down":
                self.run(0, ctrl.link_frames(frames, self.now_ms))

    def connect(self):
        self.framer = type(self.framer)()
        self.to_a.clear()
        super().connect()

    def disconnect(self):
        super().disconnect()
        self.to_a.clear()


def _peer_send(pair, r):
    link = pair.ctrl[1].link
    if not link.up:
        return
    flags, msg_type, resource, lane, tag = r.u8() & F.FLAG_RESPONSE, r.u8() % 32, r.u8() % 8, r.u8() & 1, r.u32()
    link.send(msg_type, resource, r.blob(BLOCK + 512), lane=lane, tag=tag, flags=flags)
    pair.wire[0].extend(F.split_frames(b"".join(bytes(b) for b in link.take_output())))


def _peer_mirror_write(pair, r):
    """A MIRROR_WRITE with fuzzed fields whose block data passes its CRC."""
    link = pair.ctrl[1].link
    if not link.up:
        return
    count = r.u8() % 3
    head = M.MIRROR_WRITE_HEAD.pack(r.u16() % 4, r.u16(), r.u64() % 64, r.u32() % 4, r.u16() % 4,
                                    r.u16() % 4, count, 0, BLOCK)
    blocks, datas = [], []
    for i in range(count):
        data = bytes([r.u8()]) * BLOCK
        blocks.append(M.MIRROR_BLOCK.pack(r.u32() % 64, r.u64() % 1024 * 8, N.crc32c(data), r.take(16).ljust(16)))
        datas.append(data)
    link.send(T.MIRROR_WRITE, M.Resource.MIRROR, b"".join([head, *blocks, *datas]))
    pair.wire[0].extend(F.split_frames(b"".join(bytes(b) for b in link.take_output())))


def _corrupt_next(pair, r):
    """Flip a byte of the next frame to a; fix its CRC up or not."""
    if not pair.wire[0]:
        return
    frame = bytearray(pair.wire[0].popleft())
    at = r.u16() % len(frame)
    frame[at] ^= r.u8() or 1
    if r.u8() & 1:
        frame[-4:] = N.crc32c(bytes(frame[:-4])).to_bytes(4, "big")
    pair.send_to_a(bytes(frame))


def _host_write(pair, r, side):
    lun, offset = r.u8() % 2, (r.u16() % 60) * 512
    data = bytes([r.u8()]) * (512 * (1 + r.u8() % 16))
    pair.write(side, object(), lun, offset, data, fua=bool(r.u8() & 1))


def _op(pair, r):
    op = r.u8() % 12
    if op == 0:
        _peer_send(pair, r)
    elif op == 1:
        pair.to_a.append(r.blob(256))
    elif op in (2, 3):
        _host_write(pair, r, op - 2)
    elif op == 4:
        pair.tick(r.u16() % 1500)
    elif op == 5:
        _corrupt_next(pair, r)
    elif op == 6 and pair.wire[0]:
        pair.wire[0].popleft()               # lost on the way
    elif op == 7:
        pair.disconnect()
        pair.connect()
    elif op == 8:
        _peer_mirror_write(pair, r)
    elif op == 9:
        pair.read(r.u8() & 1, object(), r.u8() % 2, (r.u16() % 60) * 512, 512 * (1 + r.u8() % 8))
    elif op == 10:
        pair.read_bytes = READS[r.u8() % len(READS)]
    pair.deliver()


def one_input(data: bytes) -> None:
    r = Reader(data)
    mode = r.u8()
    if mode & 1 == 0:
        _framers(r)
        return
    pair = FuzzPair(cobs=bool(mode & 2), fencing=bool(mode & 4))
    pair.connect()
    pair.tick(1)
    steps = 0
    while len(r) and steps < 64:
        _op(pair, r)
        steps += 1

