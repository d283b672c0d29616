"""Runtimes for replica mode's NVRAM-log variant (firmware/logship.py).

The source is an ordinary runtime whose firmware is a LogSource: one link (it
connects to the destination), its own disks, NBD exports lun0, lun1, ...

The destination serves several sources (fan-in): one link endpoint per source
(it listens on each), one link session each in the firmware, and NBD exports
of the image volumes, read-only, named after the source: a-lun0, a-lun1, ...
Transmit and LinkReset actions name the link they belong to.
"""
from __future__ import annotations

import os
import selectors

from firmware.logship import FeedParams, LogDestination, LogParams, LogSource

import hal.host.nbd as NBD
from hal.runtime.backoff import Backoff
from hal.runtime.config import LinkConfig
from hal.backends.framing import StreamFramer
from hal.backends.keyfile import load_pair_key
from hal.runtime.loop import LINK_RECV_BYTES, Runtime, _consume, open_link_endpoint


def log_params(cfg, disks, reliable, pair_id=None):
    c = cfg.cache
    return LogParams(pair_id or cfg.pair_id, [d.data_size for d in disks], source_id=cfg.replica.source_id,
                     cp_interval_ms=cfg.replica.cp_interval_ms, heartbeat_interval_ms=c.heartbeat_interval_ms,
                     heartbeat_timeout_ms=c.heartbeat_timeout_ms, reliable_transport=reliable)


class LogSourceRuntime(Runtime):
    def make_firmware(self, params, nv, key):
        return LogSource(log_params(self.cfg, self.disks, params.reliable_transport), nv, key,
                         self.clock.monotonic_ms())


class _Port:
    """One source's link at the destination."""

    def __init__(self, index, entry):
        self.index = index
        self.entry = entry
        cfg = LinkConfig(transport="unix" if entry.link_path else "tcp", listen=True, path=entry.link_path,
                         address=entry.link_address)
        self.endpoint, self.framer_cls, self.reliable = open_link_endpoint(_LinkOnly(cfg))
        self.transport = None
        self.framer = None
        self.out = []
        self.writing = False
        self.backoff = Backoff(initial_ms=20, max_ms=500)
        self.next_connect_ms = 0


class _LinkOnly:
    def __init__(self, link):
        self.link = link


class LogDestinationRuntime(Runtime):
    def open_link(self, cfg):
        self.ports = [_Port(k, e) for k, e in enumerate(cfg.replica.sources)]
        return _NoEndpoint(), StreamFramer, all(p.reliable for p in self.ports)

    def make_firmware(self, params, nv, key):
        feeds = []
        for k, e in enumerate(self.cfg.replica.sources):
            feeds.append(FeedParams(e.source_id, e.pair_id, load_pair_key(e.key_file),
                                    [self.disks[i].data_size for i in e.images], e.images, e.journal,
                                    self.disks[e.journal].data_size, partition=k, name=e.name))
        return LogDestination(log_params(self.cfg, self.disks, params.reliable_transport), feeds, nv,
                              self.clock.monotonic_ms())

    def make_exports(self, cfg):
        return [NBD.Export(name=f"{e.name}-lun{k}", size_bytes=self.disks[d].data_size, index=d, read_only=True,
                           description=f"twincache {cfg.name}: image of {e.name} LUN {k}")
                for e in cfg.replica.sources for k, d in enumerate(e.images)]

    # -- links: one port per source ---------------------------------------------

    def listen(self):
        super().listen()
        for port in self.ports:
            fd = port.endpoint.listen_fileno()
            if fd is not None:
                self.sel.register(fd, selectors.EVENT_READ, ("log-listen", port))

    def _ready(self, data, mask):
        kind, obj = data
        if kind == "log-listen":
            self._accept_port(obj)
        elif kind == "log-link":
            if mask & selectors.EVENT_READ:
                self._port_read(obj)
            if mask & selectors.EVENT_WRITE and obj.transport is not None:
                obj.writing = False
                self.sel.modify(obj.transport.fileno(), selectors.EVENT_READ, ("log-link", obj))
        else:
            super()._ready(data, mask)

    def _maybe_connect(self, now, accept=False):
        for port in self.ports:
            if port.transport is None and now >= port.next_connect_ms:
                self._accept_port(port)

    def _accept_port(self, port):
        if port.transport is not None:
            # A second connection while one serves: refused, so a stranger cannot push the source
            # off its link; a source that really restarted is back once its dead connection ends
            # (EOF at once on unix sockets, the heartbeat timeout on TCP).
            extra = port.endpoint.connect()
            if extra is not None:
                extra.close()
                self.note("link_refused", source=port.entry.name, reason="a connection is already serving")
            return
        try:
            transport = port.endpoint.connect()
        except OSError as exc:
            transport = None
            self.note("link_connect_error", source=port.entry.name, error=str(exc))
        if transport is None:
            port.next_connect_ms = self.clock.monotonic_ms() + port.backoff.next_delay_ms()
            return
        port.backoff.reset()
        port.transport = transport
        port.framer = port.framer_cls(transport.name)
        port.out = []
        self.sel.register(transport.fileno(), selectors.EVENT_READ, ("log-link", port))
        self.execute(self.ctrl.link_connected(os.urandom(32), self.clock.monotonic_ms(), link=port.index))

    def _port_read(self, port):
        try:
            n = port.transport.recv_into(self.link_buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._port_close(port, "peer closed the link")
            self.execute(self.ctrl.link_disconnected("peer closed the link", link=port.index))
            return
        frames = port.framer.feed(memoryview(self.link_buf)[:n])     # garbage is skipped, not raised
        if frames:
            self.execute(self.ctrl.link_frames(frames, self.clock.monotonic_ms(), link=port.index))

    def _port_close(self, port, reason):
        if port.transport is None:
            return
        self.sel.unregister(port.transport.fileno())
        port.transport.close()
        port.transport = None
        port.out = []
        port.writing = False
        port.next_connect_ms = self.clock.monotonic_ms() + port.backoff.next_delay_ms()

    def _flush_port(self, port):
        out = port.out
        while out:
            try:
                sent = port.transport.send(out)
            except OSError as exc:
                self._port_close(port, str(exc))
                self.execute(self.ctrl.link_disconnected(f"link send failed: {exc}", link=port.index))
                return
            _consume(out, sent)
            if out and not sent:
                break
        if out and not port.writing:
            port.writing = True
            self.sel.modify(port.transport.fileno(), selectors.EVENT_READ | selectors.EVENT_WRITE, ("log-link", port))

    def transmit(self, act):
        port = self.ports[act.link]
        if port.transport is not None:
            port.out.extend(act.buffers)

    def link_reset(self, act):
        self._port_close(self.ports[act.link], act.reason)

    def _flush(self):
        super()._flush()
        for port in self.ports:
            if port.transport is not None and port.out and not port.writing:
                self._flush_port(port)

    def close(self):
        for port in self.ports:
            self._port_close(port, "shutting down")
            port.endpoint.close()
        super().close()


class _NoEndpoint:
    """The destination's base link slot: unused (its links are the ports)."""

    def listen_fileno(self):
        return None

    def connect(self):
        return None

    def close(self):
        pass


def make_runtime(cfg):
    """The runtime for a configuration: ha, or one end of the log variant."""
    if cfg.mode == "replica" and cfg.replica.variant == "log":
        return (LogDestinationRuntime if cfg.replica.role == "destination" else LogSourceRuntime)(cfg)
    return Runtime(cfg)


__all__ = ["LogSourceRuntime", "LogDestinationRuntime", "make_runtime", "LINK_RECV_BYTES"]
