"""The link entry points both ends of log shipping share (one session per link)."""
import collections

from .. import actions as A
from ..formats import FormatError
from ..formats import messages as M
from ..formats import nvram as N
from ..link import LinkProtocolError, LinkSession
from .common import LOG_MODE


class Session:
    """Link handling shared by both ends: entry points the runtime calls."""

    def _make_link(self, key, controller_id, params):
        return LinkSession(controller_id, params.pair_id, key, mode=LOG_MODE, generation=1,
                           capabilities=M.CAP_LOG_SHIP, reliable_transport=params.reliable_transport,
                           data_window_bytes=params.data_window_bytes,
                           heartbeat_interval_ms=params.heartbeat_interval_ms,
                           heartbeat_timeout_ms=params.heartbeat_timeout_ms)

    def set_time(self, now_ms):
        self.now_ms = now_ms

    def link_connected(self, nonce, now_ms, link=0):
        self.now_ms = now_ms
        session = self._link(link)
        if session.state != "down":             # the runtime closed the old connection already
            self._link_down(link, "a new connection replaced the old one", reset=False)
        session.connected(nonce, now_ms)
        return self._take()

    def link_disconnected(self, reason, link=0):
        if self._link(link).state != "down":
            self._link_down(link, reason, reset=False)
        return self._take()

    def link_frame(self, frame, now_ms, link=0):
        return self.link_frames((frame,), now_ms, link)

    def link_frames(self, frames, now_ms, link=0):
        self.now_ms = now_ms
        session = self._link(link)
        for frame in frames:
            if session.state == "down":
                break
            was_up = session.up
            try:
                msg = session.receive(frame, now_ms)
                if not was_up and session.up:
                    self._link_up(link)
                if msg is not None:
                    self._dispatch(link, msg)
            except (LinkProtocolError, FormatError) as exc:
                self.stats["link_errors"] += 1
                self._link_down(link, f"protocol error: {exc}")
        return self._take()

    def link_is_up(self, link=0) -> bool:
        """The session on link `link` authenticated and serves."""
        return self._link(link).up

    def flush_link(self):
        """The runtime's once-a-turn call (firmware/controller.py batches; every entry point here
        already returned its frames)."""
        return self._take()

    def _tick_links(self, now_ms):
        for link, session in self._links():
            try:
                session.tick(now_ms)
            except LinkProtocolError as exc:
                self._link_down(link, str(exc))

    def _link_down(self, link, reason, reset=True):
        self.out.append(A.Notify("link_down", reason=reason, **self._link_fields(link)))
        if reset:
            self.out.append(A.LinkReset(reason, link))
        self._link(link).disconnected()
        self._on_link_down(link)

    def _take(self):
        for link, session in self._links():
            if session.state != "down":
                buffers = session.take_output()
                if buffers:
                    self.out.append(A.Transmit(buffers, link))
        out, self.out = self.out, []
        return out

    def _init_common(self, params, nv, now_ms):
        """What both ends start with; returns the NVRAM superblock."""
        self.params = params
        self.nv = nv
        self.now_ms = now_ms
        self.out = []
        self.stats = collections.Counter()
        sb, _slot = N.read_superblock_untrusted(nv, "NVRAM")
        if sb.nvram_size_bytes > len(nv):
            raise FormatError(f"NVRAM of {len(nv)} bytes, its superblock says {sb.nvram_size_bytes}")
        return sb

    def _persist(self, act):
        """Every NVRAM persist of either end goes out here."""
        if not self.params.buggify("log_skip_persist"):        # (a broken variant)
            self.out.append(act)

    def _op(self, what):
        op = self.next_op
        self.next_op += 1
        self.ops[op] = what
        return op
