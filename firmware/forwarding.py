"""Host requests for LUNs the partner owns: sent to it over the link, answered by its IO_REPLY.

A part with its own state: the requests in flight (by the tag they travel under), those
waiting for room in the window, and the window's bytes. The window bounds forwarded work
like host work: at most `inflight_max` requests and `inflight_bytes_max` bytes of data in
flight (one request always fits an empty window, however large); behind it at most
`waiting_max` wait, in order. Zeroes, trims and flushes travel as ranges and cost nothing.
The controller decides what to forward and what an answer means; this part only carries.
"""
import collections

from .formats import messages as M
from .link import LinkProtocolError

EIO, ENOSPC = 5, 28


class ForwardEntry:
    """One forwarded request. `data` owns its bytes: the host's views the NBD receive buffer,
    which is reused before the frame goes out."""
    __slots__ = ("req", "op", "lun", "offset", "length", "data", "fua")

    def __init__(self, req, op, lun, offset, length, data, fua):
        self.req = req
        self.op = op
        self.lun = lun
        self.offset = offset
        self.length = length
        self.data = data
        self.fua = fua

    @property
    def cost(self) -> int:
        """Link data it puts in flight: its write data or the read data to come."""
        return self.length if self.op == M.IoOp.WRITE or self.op == M.IoOp.READ else 0


class Forwarder:
    def __init__(self, link, stats, inflight_max, inflight_bytes_max, waiting_max):
        self.link = link
        self.stats = stats
        self.inflight_max = inflight_max
        self.inflight_bytes_max = inflight_bytes_max
        self.waiting_max = waiting_max
        self.inflight = {}                        # tag -> ForwardEntry awaiting the owner's reply
        self.waiting = collections.deque()        # held back by the window, in order
        self.bytes = 0                            # data of the requests in flight
        self.next_tag = 1

    def forward(self, entry: ForwardEntry) -> int:
        """Send it, or queue it behind the window; 0, or the errno to answer the host with."""
        if not self.link.up:
            self.stats["forward_refused"] += 1
            return EIO
        if self.waiting or not self._room(entry):
            if len(self.waiting) >= self.waiting_max:
                return ENOSPC
            self.waiting.append(entry)
            self.stats["forwards_waited"] += 1
            return 0
        self._send(entry)
        return 0

    def answered(self, tag) -> ForwardEntry:
        """The owner answered `tag`: its entry leaves the window, and waiting ones go out."""
        entry = self.inflight.pop(tag, None)
        if entry is None:
            raise LinkProtocolError(f"IO reply for unknown tag {tag}")
        self.bytes -= entry.cost
        self._drain()
        return entry

    def fail_all(self):
        """The link is down: every entry in flight or waiting, for the controller to fail."""
        entries = list(self.inflight.values()) + list(self.waiting)
        self.inflight, self.waiting, self.bytes = {}, collections.deque(), 0
        return entries

    def host_of(self, tag):
        """The request forwarded under `tag`, if it is still in flight (the simulator's checks)."""
        entry = self.inflight.get(tag)
        return entry.req if entry is not None else None

    def _room(self, entry) -> bool:
        if len(self.inflight) >= self.inflight_max:
            return False
        return not self.bytes or self.bytes + entry.cost <= self.inflight_bytes_max

    def _send(self, entry):
        tag = self.next_tag
        self.next_tag = tag % 0xFFFFFFFF + 1
        self.inflight[tag] = entry
        self.bytes += entry.cost
        head = M.IO_REQUEST_HEAD.pack(entry.op, int(entry.fua), entry.lun, entry.offset, entry.length)
        self.link.send(M.MsgType.IO_REQUEST, M.Resource.HOST_IO,
                       head + entry.data if entry.data is not None else head, tag=tag)
        self.stats["forwarded"] += 1

    def _drain(self):
        waiting = self.waiting
        while waiting and self.link.up and self._room(waiting[0]):
            self._send(waiting.popleft())


__all__ = ["ForwardEntry", "Forwarder"]
