"""The admin control socket of a running controller: JSON lines over a unix socket.

Requests, one JSON object a line: {"cmd": "status"}, {"cmd": "ping"} (a
control-lane round trip to the partner, answered with its time in
microseconds), {"cmd": "stop"}; in replica mode {"cmd": "promote", "force":
false}, {"cmd": "demote"} (refused while hosts are connected to this controller's
exports) and {"cmd": "resolve", "policy": "discard-a"}. Each gets one JSON object back. Used by
`twincache status`, `pair down` and the tests; never on the data path.
"""
import json
import os
import selectors
import socket
import time

from firmware.ha.controller import HaController

REQUEST_MAX_BYTES = 4096


class ControlServer:
    def __init__(self, runtime, path):
        self.runtime = runtime
        self.path = path
        self.sock = None
        self.conns = {}
        self.pings = {}          # tag -> connection waiting for the pong
        self.next_tag = 1

    def start(self, sel):
        self.sel = sel
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.sock.setblocking(False)
        sel.register(self.sock, selectors.EVENT_READ, ("control", self.sock))

    def ready(self, sock, mask):
        if sock is self.sock:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self.conns[conn] = bytearray()
            self.sel.register(conn, selectors.EVENT_READ, ("control", conn))
            return
        try:
            data = sock.recv(REQUEST_MAX_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf = self.conns.get(sock)
        if not data or buf is None or len(buf) + len(data) > REQUEST_MAX_BYTES:
            self._drop(sock)
            return
        buf += data
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            self._handle(sock, line)

    def _handle(self, sock, line):
        try:
            request = json.loads(line)
            cmd = request["cmd"]
        except (ValueError, KeyError, TypeError):
            self._send(sock, {"error": "bad request: send a JSON object with a cmd"})
            return
        if cmd == "status":
            self._send(sock, self.runtime.status())
        elif cmd == "ping":
            self._ping(sock)
        elif cmd == "move":
            self._move(sock, request)
        elif cmd == "recover":
            self._recover(sock, request)
        elif cmd in ("promote", "demote", "resolve"):
            self._replica_admin(sock, cmd, request)
        elif cmd == "stop":
            self._send(sock, {"ok": True})
            self.runtime.stop()
        else:
            self._send(sock, {"error": f"unknown cmd {cmd!r}"})

    def _move(self, sock, request):
        """Bring a LUN to this controller (ownership request to its owner)."""
        ctrl = self.runtime.ctrl
        lun = request.get("lun")
        if not isinstance(lun, int) or not 0 <= lun < len(ctrl.params.lun_sizes) or not isinstance(ctrl, HaController):
            self._send(sock, {"error": f"no such LUN {lun!r} (or ownership is static here)"})
            return
        if ctrl.owns(lun):
            self._send(sock, {"ok": True, "already": True})
            return
        if not ctrl.link.up:
            self._send(sock, {"error": "the link is down: ownership moves need the partner"})
            return
        self.runtime.execute(ctrl.move_lun(lun))
        self._send(sock, {"ok": True})

    def _recover(self, sock, request):
        """Log variant, destination: apply every filed request to the image volume(s)."""
        ctrl = self.runtime.ctrl
        if not hasattr(ctrl, "recover"):
            self._send(sock, {"error": "recover is for a log-shipping destination"})
            return
        name = request.get("source")
        names = [f.p.name for f in ctrl.feeds]
        if name is not None and name not in names:
            self._send(sock, {"error": f"no source {name!r} here (sources: {', '.join(names)})"})
            return
        self.runtime.execute(ctrl.recover(name))
        self._send(sock, {"ok": True, "targets": {f.p.name: f.filed_seq for f in ctrl.feeds
                                                  if name is None or f.p.name == name}})
    def _replica_admin(self, sock, cmd, request):
        """Replica mode: promote or demote this controller, or resolve a split brain by policy."""
        ctrl = self.runtime.ctrl
        if not hasattr(ctrl, cmd):
            self._send(sock, {"error": f"{cmd} is for replica mode's bitmap variant; this controller runs "
                                       f"{getattr(ctrl.params, 'mode', 'the log variant')}"})
            return
        hosts = len(self.runtime.clients)
        if cmd == "demote" and hosts and ctrl.owns(0):
            # Like DRBD's "held open": a host's next write would fail (EPERM) on a secondary.
            self._send(sock, {"error": f"{hosts} host connection(s) open on this controller's exports: "
                                       f"disconnect them first"})
            return
        if cmd == "promote":
            actions = ctrl.promote(force=bool(request.get("force")))
        elif cmd == "demote":
            actions = ctrl.demote()
        else:
            actions = ctrl.resolve(str(request.get("policy", "")))
        answer = {"ok": True}
        for act in actions:
            kind = getattr(act, "kind", "")
            if kind.endswith("_refused"):
                answer = {"error": act.fields["reason"]}
            elif kind in ("promoted", "demoted", "resolved"):
                answer = {"ok": True, **act.fields}
        self.runtime.execute(actions)
        self._send(sock, answer)

    def _ping(self, sock):
        if not hasattr(self.runtime.ctrl, "ping"):      # the log variant's source and destination
            self._send(sock, {"error": "this controller has no link ping (log variant)"})
            return
        if not self.runtime.ctrl.link.up:
            self._send(sock, {"error": "link is down"})
            return
        tag = self.next_tag
        self.next_tag += 1
        self.pings[tag] = sock
        self.runtime.execute(self.runtime.ctrl.ping(tag, time.monotonic_ns()))

    def pong(self, fields):
        sock = self.pings.pop(fields["tag"], None)
        if sock is not None and sock in self.conns:
            self._send(sock, {"rtt_us": round((time.monotonic_ns() - fields["sent_ns"]) / 1000, 1)})

    def _send(self, sock, obj):
        try:
            sock.setblocking(True)
            sock.sendall(json.dumps(obj, default=str).encode() + b"\n")
            sock.setblocking(False)
        except OSError:
            self._drop(sock)

    def _drop(self, sock):
        if self.conns.pop(sock, None) is not None:
            self.sel.unregister(sock)
            sock.close()

    def close(self):
        for sock in list(self.conns):
            self._drop(sock)
        if self.sock is not None:
            self.sock.close()
            if os.path.exists(self.path):
                os.unlink(self.path)


def request(path, obj, timeout_s=5.0):
    """Send one request to a controller's control socket; return the decoded answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.sendall(json.dumps(obj).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{path}: controller closed the control connection")
            buf += chunk
    return json.loads(buf)
