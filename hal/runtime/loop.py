"""The runtime: runs one controller's firmware on real hardware backends.

Owns the event loop (selectors/epoll, one thread): NBD clients on unix and
TCP sockets (the host port, hal/host/port.py and hal/host/tls_port.py, mixed
in), the link ports (hal/runtime/linkport.py: connect or accept, reconnect
with backoff), the admin control socket, and a tick timer. It turns what happens
into calls on the firmware Controller and carries out the actions it
returns, in order: persist NVRAM ranges, write frames to the link, answer
hosts, read and write disks. Disk completions are fed back only after the
whole action list is carried out, so the firmware sees the order it asked
for. Output is batched: every connection is written once per loop turn with
sendmsg. NBD connections that start TLS (NBD_OPT_STARTTLS) are read and
written through hal/host/tls_port.py from then on.

With [metrics] listen set, the loop also records host requests, mirror round
trips, disk writes and resync progress into plain counters (hal/runtime/metrics.py);
prometheus-client's HTTP thread reads them through a snapshot the loop takes.
"""
from __future__ import annotations

import errno
import json
import os
import selectors
import signal
import sys
import time

from firmware import actions as A
from firmware.ha.controller import HaController
from firmware.params import Params, format_nvram, nvram_is_blank

import hal.host.nbd as NBD
from hal.backends.buffers import consume as _consume
from hal.backends.clock import MonotonicClock
from hal.runtime.control import ControlServer
from hal.backends.disk_array import DiskArray
from hal.backends.disk_flush import FlushWorker
from hal.backends.framing import CobsFramer, StreamFramer
from hal.interpret import Effects, interpreter
from hal.runtime.linkport import LinkPort
from hal.backends.keyfile import load_pair_key
from hal.host.port import REFUSAL_NOTE_INTERVAL_MS, NbdHostPort
from hal.host.tls_port import NbdTlsPort

TICK_MS = 10
LINK_RECV_BYTES = 1 << 20


def open_nvram(cfg):
    n = cfg.nvram
    if n.backend == "dax":
        from hal.backends.nvram_dax import DaxNvram
        return DaxNvram(n.path, n.size_bytes)
    from hal.backends.nvram_file import FileNvram
    return FileNvram(n.path, n.size_bytes, durability=n.durability, create=True)


def open_link_endpoint(cfg):
    lk = cfg.link
    if lk.transport == "unix":
        from hal.backends.link_socket import UnixLinkEndpoint
        return UnixLinkEndpoint(lk.path, listen=lk.listen), StreamFramer, True
    if lk.transport == "tcp":
        from hal.backends.link_socket import TcpLinkEndpoint
        host, _, port = lk.address.rpartition(":")
        return TcpLinkEndpoint(host, int(port), listen=lk.listen), StreamFramer, True
    from hal.backends.link_serial import SerialLinkEndpoint, VirtioPortEndpoint
    if lk.transport == "virtio":
        return VirtioPortEndpoint(lk.device), CobsFramer, False
    return SerialLinkEndpoint(lk.device, lk.baud), CobsFramer, False


def replica_settings(cfg):
    """Replica mode: the firmware's settings, with fresh uuids from the OS (firmware draws no randomness)."""
    if cfg.mode != "replica" or cfg.replica.variant != "bitmap":
        return None                       # the log variant's firmware takes LogParams (hal/runtime/logship.py)
    from firmware.replica.controller import ReplicaSettings
    r = cfg.replica
    return ReplicaSettings(lambda: int.from_bytes(os.urandom(8), "big") | 1, variant=r.variant, ack=r.ack,
                           range_bytes=r.range_size_bytes, resync_rate_bytes_s=r.resync_rate_bytes_s,
                           resync_inflight_max=r.resync_inflight_max,
                           auto_promote_after_ms=r.auto_promote_after_ms,
                           initial_primary="ab".index(r.primary))


def make_controller(params, nv, key, now_ms):
    if params.mode == "replica":
        # The bitmap variant here; the log variant runs its own runtimes (hal/runtime/logship.py).
        assert params.replica.variant == "bitmap", "the log variant is not a Controller"
        from firmware.replica.controller import ReplicaController
        return ReplicaController(params, nv, key, now_ms)
    return HaController(params, nv, key, now_ms)


def firmware_params(cfg, disks, reliable):
    c = cfg.cache
    return Params(cfg.controller_id, cfg.pair_id, [d.data_size for d in disks], mode=cfg.mode,
                  block_size_bytes=cfg.nvram.block_size_bytes, high_watermark=c.high_watermark,
                  low_watermark=c.low_watermark, idle_flush_ms=c.idle_flush_ms,
                  destage_inflight_max=c.destage_inflight_max,
                  heartbeat_interval_ms=c.heartbeat_interval_ms,
                  heartbeat_timeout_ms=c.heartbeat_timeout_ms, reliable_transport=reliable,
                  degraded_after_ms=c.degraded_after_ms, disk_retry_max_ms=c.disk_retry_max_ms,
                  replica=replica_settings(cfg), batch_link_output=True)


class Runtime(NbdHostPort, NbdTlsPort, Effects):
    def __init__(self, cfg, clock=None, log=None):
        self.cfg = cfg
        self._execute = interpreter(self)
        self.clock = clock or MonotonicClock()
        self.log_file = log or sys.stderr
        self.stopping = False
        os.makedirs(cfg.state_dir, exist_ok=True)
        self.events = open(os.path.join(cfg.state_dir, "events.jsonl"), "a", buffering=1)
        self.nvram = open_nvram(cfg)
        self.persist_needed = self.nvram.durability != "controller"
        self.disks = DiskArray.open(cfg.disks, cfg.pair_id).disks
        self.ports, reliable = self.open_ports(cfg)
        key = load_pair_key(cfg.key_file)
        params = firmware_params(cfg, self.disks, reliable)
        nv = self.nvram.buffer
        if nvram_is_blank(nv):
            self._do_persists(format_nvram(nv, params))
            self.note("nvram_formatted", path=cfg.nvram.path, size_bytes=len(nv))
        self.ctrl = self.make_firmware(params, nv, key)
        self.sel = selectors.DefaultSelector()
        self.flusher = FlushWorker()
        self.sel.register(self.flusher.fileno(), selectors.EVENT_READ, ("flush", None))
        self.clients = {}
        self.clients_per_peer = {}     # peer -> connections open
        self.handshaking = {}          # NbdClient -> handshake deadline (ms), until it reaches transmission
        self.refused = {"nbd": 0, "link": 0, "nbd_tls": 0}    # connections refused, by kind
        self.refused_noted = {k: (0, -REFUSAL_NOTE_INTERVAL_MS) for k in self.refused}
        self.tls_setup(cfg.nbd)
        self.nbd_handshake_timeouts = 0
        self.completions = []          # disk write and flush completions, fed back once a turn
        self.disk_writes = []          # DiskWrite actions, carried out at the end of the turn
        self.read_completions = []
        self.dirty_clients = set()
        self.link_buf = bytearray(LINK_RECV_BYTES)
        self.exports = self.make_exports(cfg)
        self.listeners = []
        self.control = ControlServer(self, os.path.join(cfg.state_dir, "control.sock"))
        self.metrics = None            # hal/runtime/metrics.py, started last: see below
        self.rec = None                # its recorder, when on
        self.mirror_unsent = []        # metrics: host reqs whose mirror frames wait for this turn's send
        self.mirror_sent = {}          # metrics: host req -> when its mirror frames were sent (ns)
        self.frames_ns = 0             # metrics: when the link frames being handled arrived; 0 outside
        # base:allocation from the firmware (its cache and the disk's extents), or all data
        self.answers_block_status = hasattr(self.ctrl, "host_block_status")
        # Recovery may have taken long (a full NVRAM scan under TCG took about a second): the
        # firmware's clock is the one it was built with until told otherwise (see execute).
        self.ctrl.set_time(self.clock.monotonic_ms())
        self.execute(self.ctrl.start())
        if cfg.metrics.listen:
            # Last: the port is the one resource another program may hold, and its error is clear.
            from hal.runtime.metrics import MetricsServer
            self.metrics = MetricsServer(self, cfg.metrics.listen, len(self.disks))
            self.rec = self.metrics.rec
            self.time_mirror = isinstance(getattr(self.ctrl, "pending", None), dict)

    def open_ports(self, cfg):
        """The link ports and whether every transport is reliable: one, for a pair or a source."""
        endpoint, framer_cls, reliable = open_link_endpoint(cfg)
        return [LinkPort(0, endpoint, framer_cls)], reliable

    def make_exports(self, cfg):
        return [NBD.Export(name=f"lun{d.lun}", size_bytes=d.data_size, index=d.lun,
                           description=f"twincache {cfg.name} LUN {d.lun}") for d in self.disks]

    def make_firmware(self, params, nv, key):
        """The firmware this runtime drives: ha, or replica's bitmap variant (the log variant's
        runtimes in hal/runtime/logship.py override this)."""
        return make_controller(params, nv, key, self.clock.monotonic_ms())

    # -- logging --------------------------------------------------------------

    def note(self, kind, **fields):
        record = {"ts": round(time.time(), 3), "controller": self.cfg.name, "kind": kind, **fields}
        line = json.dumps(record, default=str)
        self.events.write(line + "\n")
        print(line, file=self.log_file, flush=True)

    # -- set-up ---------------------------------------------------------------

    def listen(self):
        self.listen_nbd()
        for port in self.ports:
            fd = port.endpoint.listen_fileno()
            if fd is not None:
                self.sel.register(fd, selectors.EVENT_READ, ("link-listen", port))
        self.control.start(self.sel)

    # -- the loop -------------------------------------------------------------

    def run(self):
        self.listen()
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        self.note("serving", pid=os.getpid(), exports=self.exports_uris())
        next_tick = self.clock.monotonic_ms()
        while not self.stopping:
            now = self.clock.monotonic_ms()
            timeout = max(0.0, (next_tick - now) / 1000)
            events = self.sel.select(timeout if not self.completions else 0)
            self.ctrl.set_time(self.clock.monotonic_ms())     # leases are judged at this instant
            for key, mask in events:
                self._ready(key.data, mask)
            now = self.clock.monotonic_ms()
            if now >= next_tick:
                next_tick = now + TICK_MS
                for port in self.ports:
                    self._port_connect(port, now)
                if self.handshaking:
                    self._expire_handshakes(now)
                self.execute(self.ctrl.tick(now))
                if self.metrics is not None:
                    self.metrics.tick(now)
            self._flush()
        self.close()

    def stop(self):
        self.stopping = True

    def _ready(self, data, mask):
        kind, obj = data
        if kind == "nbd":
            if mask & selectors.EVENT_READ:
                self._nbd_read(obj)
            if mask & selectors.EVENT_WRITE:
                self.dirty_clients.add(obj)
        elif kind == "link":
            if mask & selectors.EVENT_READ:
                self._link_read(obj)
            if mask & selectors.EVENT_WRITE and obj.transport is not None:
                obj.writing = False
                self.sel.modify(obj.transport.fileno(), selectors.EVENT_READ, ("link", obj))
        elif kind == "nbd-listen":
            self._accept(obj)
        elif kind == "link-listen":
            self._link_listen_ready(obj)
        elif kind == "flush":
            self.completions.extend(self.flusher.done())
        else:
            self.control.ready(obj, mask)

    # -- link ports (hal/runtime/linkport.py) ---------------------------------

    def _link_listen_ready(self, port):
        """A connection waits on a link listener. It becomes the port's link only while the port
        has none and the backoff since the last attempt has run out; otherwise it is accepted
        and closed at once, and counted. Left pending, it kept the listener readable and the
        loop spinning until the link next dropped; and taken at once every time, forged hellos
        got as many tries as they liked."""
        now = self.clock.monotonic_ms()
        if port.transport is None and now >= port.next_connect_ms:
            self._port_connect(port, now, accept=True)
            return
        transport = port.endpoint.accept()
        if transport is not None:
            transport.close()
            busy = "link up" if port.transport is not None else "backing off"
            self._count_refusal("link", busy if port.name == "link" else f"{port.name}: {busy}")

    def _link_session_up(self, port=None):
        return self.ctrl.link_is_up((port or self.ports[0]).index)

    def _port_connect(self, port, now, accept=False):
        if port.transport is not None:
            # The backoff starts over only once a session authenticated: a peer that connects
            # and fails the hello waits longer each time.
            if self._link_session_up(port):
                port.backoff.reset()
            return
        if now < port.next_connect_ms and not accept:
            return
        try:
            transport = port.endpoint.connect()
        except OSError as exc:
            transport = None
            self.note("link_connect_error", error=str(exc), **self._port_fields(port))
        if transport is None:
            if port.endpoint.listen_fileno() is None:   # nothing pending is no failure for a listener
                port.next_connect_ms = now + port.backoff.next_delay_ms()
            return
        port.open(transport)
        self.sel.register(transport.fileno(), selectors.EVENT_READ, ("link", port))
        self.execute(self.ctrl.link_connected(os.urandom(32), now, link=port.index))

    def _port_fields(self, port):
        return {} if port.name == "link" else {"source": port.name}

    def _link_read(self, port):
        if self.disk_writes:
            self._start_disk_writes()
        try:
            n = port.transport.recv_into(self.link_buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._link_close(port, "peer closed the link")
            self.execute(self.ctrl.link_disconnected("peer closed the link", link=port.index))
            return
        frames = port.framer.feed(memoryview(self.link_buf)[:n])     # garbage is skipped, not raised
        if frames:
            if self.mirror_sent:
                self.frames_ns = time.perf_counter_ns()
            self.execute(self.ctrl.link_frames(frames, self.clock.monotonic_ms(), link=port.index))
            self.frames_ns = 0

    def _link_close(self, port, reason):
        if port.transport is None:
            return
        self.sel.unregister(port.transport.fileno())
        port.shut(self.clock.monotonic_ms())
        self.mirror_unsent.clear()       # their writes finish unmirrored: no round trip to time
        self.mirror_sent.clear()

    def _flush_link(self, port):
        out = port.out
        if self.mirror_unsent:
            sent_ns = time.perf_counter_ns()
            for req in self.mirror_unsent:
                self.mirror_sent[req] = sent_ns
            self.mirror_unsent.clear()
        while out:
            try:
                sent = port.transport.send(out)
            except OSError as exc:
                self._link_close(port, str(exc))
                self.execute(self.ctrl.link_disconnected(f"link send failed: {exc}", link=port.index))
                return
            _consume(out, sent)
            if out and not sent:
                break
        if out and not port.writing:
            port.writing = True
            self.sel.modify(port.transport.fileno(), selectors.EVENT_READ | selectors.EVENT_WRITE, ("link", port))

    def _flush_ports(self):
        for port in self.ports:
            if port.transport is not None and port.out and not port.writing:
                self._flush_link(port)

    # -- actions --------------------------------------------------------------

    def execute(self, actions):
        """Carry out actions in order; disk completions go back after the whole list.

        Read completions are fed back at once (a host waits on them); destage
        write completions wait for the end of the loop turn, so a long run of
        destaging is spread over turns instead of holding up host requests.

        The firmware is told the time before each completion: a read may have blocked
        for long, and the firmware stamps what it learns with its clock. A reservation
        record read at start-up, judged by the clock of before recovery, made a restarted
        controller see its live partner's record as silent for a second and claim every
        LUN over it (VM pair, after a power cut).
        """
        self._execute(actions)
        reads = self.read_completions
        if reads:
            set_time, clock = self.ctrl.set_time, self.clock.monotonic_ms
            while reads:
                op, err, data = reads.pop()
                set_time(clock())
                self._execute(self.ctrl.disk_done(op, err, data))

    def _complete_writes(self):
        done, self.completions = self.completions, []
        if done:
            self.ctrl.set_time(self.clock.monotonic_ms())
        for op, err, data in done:
            self.execute(self.ctrl.disk_done(op, err, data))

    # The Effects of hal/interpret.py: what each action does here.

    def persist(self, act):
        if self.persist_needed:
            self.nvram.persist(act.offset, act.length)

    def transmit(self, act):
        port = self.ports[act.link]
        if port.transport is not None:
            port.queue(act.buffers)

    def disk_write(self, act):
        self.disk_writes.append(act)     # after this turn's host replies: see _flush

    def disk_read(self, act):
        self._disk_io(act, write=False)

    def record_read(self, act):
        self._record_io(act)

    record_write = record_read

    def link_reset(self, act):
        self._link_close(self.ports[act.link], act.reason)

    def host_reply(self, act):
        client, request, t0 = act.req
        if self.mirror_sent:
            sent_ns = self.mirror_sent.pop(act.req, 0)
            if sent_ns and self.frames_ns:     # acknowledged by the frames just received
                self.rec.mirror_done(request.export.index, self.frames_ns - sent_ns)
        if client.conn.closed:
            return
        client.conn.reply(request, act.error, act.data)
        if t0:
            client.done.append((request.export.index, request.op, request.length, t0, act.error))
        self.dirty_clients.add(client)

    def _disk_io(self, act, write):
        disk = self.disks[act.lun]
        try:
            if write:
                disk.write(act.offset, act.data)
                self.completions.append((act.op, 0, None))
            else:
                buf = bytearray(act.length)
                disk.read_into(act.offset, buf)
                self.read_completions.append((act.op, 0, buf))
        except OSError as exc:
            (self.completions if write else self.read_completions).append(
                (act.op, exc.errno or errno.EIO, None))

    def disk_extents(self, act):
        """Where the LUN's disk may hold data (SEEK_DATA/SEEK_HOLE on an image file)."""
        try:
            ranges = self.disks[act.lun].data_ranges(act.offset, act.length)
        except OSError as exc:
            self.read_completions.append((act.op, exc.errno or errno.EIO, None))
            return
        self.read_completions.append((act.op, 0, ranges))

    def _record_io(self, act):
        """The reservation record lives on the raw disk, before the LUN's data area."""
        raw = self.disks[act.lun].raw
        offset, _size = DiskArray.reservation_area(act.lun)
        try:
            if act.__class__ is A.RecordWrite:
                raw.write(offset, act.data)
                raw.flush()
                self.read_completions.append((act.op, 0, None))
            else:
                buf = bytearray(512)
                raw.read_into(offset, buf)
                self.read_completions.append((act.op, 0, buf))
        except OSError as exc:
            self.read_completions.append((act.op, exc.errno or errno.EIO, None))

    def disk_flush(self, act):
        """In the flush thread (hal/backends/disk_flush.py): the loop goes on meanwhile."""
        self.flusher.submit(act.op, self.disks[act.lun])

    def notify(self, act):
        if act.kind == "pong":
            if self.metrics is None or not self.metrics.pong(act.fields):
                self.control.pong(act.fields)
            return
        if self.rec is not None and act.kind.startswith("resync_"):
            self.rec.resync_event(act.kind, act.fields, self.cfg.nvram.block_size_bytes)
        self.note(act.kind, **act.fields)

    def _flush(self):
        """The end of a loop turn: disk completions, then the turn's link frames, then hosts.

        The firmware batches its link output (batch_link_output): flush_link() hands
        over the frames of the whole turn at once, so they share one sendmsg.
        """
        if self.completions:
            self._complete_writes()
        self.execute(self.ctrl.flush_link())
        self._flush_ports()
        while self.dirty_clients:
            dirty, self.dirty_clients = self.dirty_clients, set()
            for client in dirty:
                # Every client not yet dropped: one that sent NBD_CMD_DISC has no watch and
                # is closed by its last reply, which is still to be sent.
                if client.sock.fileno() != -1:
                    self._flush_client(client)
            # Requests a client had buffered behind its in-flight bound ran just now.
            self.execute(self.ctrl.flush_link())
            self._flush_ports()
        self._start_disk_writes()

    def _start_disk_writes(self):
        """Disk writes (destage, write-through, replay) wait until the turn's replies are out.

        No host waits on a destage write, so a pwrite costs the acknowledged host
        nothing. The data stays where the firmware pointed: a destaged line is pinned
        until its completion, and _link_read starts these writes before the partner's
        frames can store into a mirror block a replay is writing out.
        """
        writes, self.disk_writes = self.disk_writes, []
        rec = self.rec
        for act in writes:
            self._disk_io(act, write=True)
            if rec is not None:
                rec.disk_writes[act.lun] += 1
                rec.disk_write_bytes[act.lun] += len(act.data)

    def status(self):
        st = self.ctrl.status()
        st.update(name=self.cfg.name, pid=os.getpid(), exports=self.exports_uris(),
                  nbd_clients=len(self.clients), nbd_refused=self.refused["nbd"],
                  nbd_handshake_timeouts=self.nbd_handshake_timeouts, link_refused=self.refused["link"],
                  nbd_tls=self.cfg.nbd.tls, nbd_tls_refused=self.refused["nbd_tls"],
                  durability=self.nvram.durability,
                  link_transport=self.cfg.link.transport,
                  metrics_url=self.metrics.url if self.metrics is not None else None)
        return st

    def _do_persists(self, ranges):
        for offset, length in ranges:
            self.nvram.persist(offset, length)

    def close(self):
        for client in list(self.clients.values()):
            self._drop_client(client)
        for sock in self.listeners:
            sock.close()
        if self.cfg.nbd.unix and os.path.exists(self.cfg.nbd.unix):
            os.unlink(self.cfg.nbd.unix)
        for port in self.ports:
            self._link_close(port, "shutting down")
            port.endpoint.close()
        self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        self.flusher.close()
        for disk in self.disks:
            disk.close()
        self.note("stopped")
        self.events.close()

