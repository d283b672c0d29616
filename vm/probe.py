"""Guest-side probe: checks what a controller VM gives the firmware.

Run inside a guest by the init command (`python -m vm.probe --name a ...`).
It reports on the console as `TWINCACHE-PROBE <json>` lines and ends with
`TWINCACHE-PROBE-DONE`, which the host test parses:

- nvram: maps /dev/dax0.0 (2 MiB aligned length) and stores a pattern
  (`--nvram write`, no flush: devdax stores land in the host file) or reads
  it back (`--nvram check`).
- disks: finds the shared disks by serial (vpd_pg80), never by sdX name.
- link: line frames over /dev/virtio-ports/ctl.link with plain fd I/O (it is
  not a tty). Role a writes a block to the first shared disk with O_DIRECT
  and says so over the link; role b reads it back with O_DIRECT and answers
  with what it read.
- serve: a TCP line server on the guest NBD port, to prove the host port
  forward; `--echo` keeps answering PING frames on the link meanwhile.

Rules: no libvirt, no project imports beyond the standard library; every
wait has a deadline.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import pathlib
import select
import socket
import threading
import time

DAX = "/dev/dax0.0"
LINK = "/dev/virtio-ports/ctl.link"
DAX_ALIGN_BYTES = 2 << 20
BLOCK_BYTES = 4096
DISK_PROBE_OFFSET_BYTES = 1 << 20
NBD_PORT = 10809


def report(kind: str, **fields) -> None:
    print("TWINCACHE-PROBE " + json.dumps({"kind": kind, **fields}, sort_keys=True), flush=True)


def nvram_pattern(token: str) -> bytes:
    return (f"TWINCACHE-NVRAM {token} ".encode() * BLOCK_BYTES)[:BLOCK_BYTES]


def probe_nvram(mode: str, token: str) -> None:
    size = int(pathlib.Path("/sys/bus/dax/devices/dax0.0/size").read_text())
    fd = os.open(DAX, os.O_RDWR)
    try:
        with mmap.mmap(fd, DAX_ALIGN_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            if mode == "write":
                m[0:BLOCK_BYTES] = nvram_pattern(token)
            data = bytes(m[0:BLOCK_BYTES])
    finally:
        os.close(fd)
    report("nvram", mode=mode, size_bytes=size, matches=data == nvram_pattern(token),
           sha256=hashlib.sha256(data).hexdigest(), head=data[:40].decode(errors="replace"))


def disks_by_serial() -> dict[str, str]:
    found = {}
    for vpd in pathlib.Path("/sys/block").glob("sd*/device/vpd_pg80"):
        raw = vpd.read_bytes()
        serial = raw[4:4 + raw[3]].decode(errors="replace").strip()
        found[serial] = "/dev/" + vpd.parent.parent.name
    return found


def direct_io(path: str, offset: int, data: bytes | None = None) -> bytes:
    """One aligned block with O_DIRECT: the page caches of the two guests are not coherent."""
    buf = mmap.mmap(-1, BLOCK_BYTES)          # page aligned, as O_DIRECT needs
    fd = os.open(path, (os.O_RDWR if data else os.O_RDONLY) | os.O_DIRECT)
    try:
        if data is not None:
            buf[:] = data
            assert os.pwritev(fd, [buf], offset) == BLOCK_BYTES
        assert os.preadv(fd, [buf], offset) == BLOCK_BYTES
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


class LineLink:
    """Newline-terminated JSON frames over the virtio-serial port, with fd I/O."""

    def __init__(self, path: str = LINK):
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self._buf = b""

    def send(self, **frame) -> None:
        data = (json.dumps(frame) + "\n").encode()
        while data:
            select.select([], [self.fd], [], 1.0)
            try:
                data = data[os.write(self.fd, data):]
            except BlockingIOError:
                pass

    def recv(self, timeout_s: float) -> dict | None:
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.2))
            chunk = b""
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except BlockingIOError:
                    pass
            if not chunk:
                time.sleep(0.05)          # EOF while the peer is disconnected
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)


def link_role_a(link: LineLink, disk: str, token: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (frame := link.recv(0.5)) is None or frame.get("op") != "hello-ack":
        assert time.monotonic() < deadline, "no hello-ack from b over the link"
        link.send(op="hello", src="a")
    report("link", step="hello-ack", frame=frame)
    block = hashlib.sha256(token.encode()).digest() * (BLOCK_BYTES // 32)
    direct_io(disk, DISK_PROBE_OFFSET_BYTES, block)
    link.send(op="wrote", offset=DISK_PROBE_OFFSET_BYTES, sha256=hashlib.sha256(block).hexdigest())
    while (frame := link.recv(1.0)) is None or frame.get("op") != "read":
        assert time.monotonic() < deadline, "no read report from b over the link"
    report("shared-disk", role="a", wrote_sha256=hashlib.sha256(block).hexdigest(), peer=frame)


def link_role_b(link: LineLink, disk: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, "no wrote frame from a over the link"
        frame = link.recv(1.0)
        if frame is None:
            continue
        if frame.get("op") == "hello":
            link.send(op="hello-ack", src="b")
        elif frame.get("op") == "wrote":
            data = direct_io(disk, frame["offset"])
            link.send(op="read", sha256=hashlib.sha256(data).hexdigest())
            report("shared-disk", role="b", read_sha256=hashlib.sha256(data).hexdigest(), peer=frame)
            return


def echo_forever(link: LineLink) -> None:
    while True:
        frame = link.recv(3600)
        if frame and frame.get("op") == "ping":
            link.send(op="pong", src=os.environ.get("TC_NAME", "?"), seq=frame.get("seq"))


def ping(link: LineLink, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    seq = 0
    while (frame := link.recv(0.5)) is None or frame.get("op") != "pong":
        assert time.monotonic() < deadline, "no pong over the link"
        seq += 1
        link.send(op="ping", seq=seq)
    report("link", step="pong", frame=frame)


def serve(name: str, token: str) -> None:
    server = socket.create_server(("0.0.0.0", NBD_PORT), reuse_port=True)
    report("serve", port=NBD_PORT)
    while True:
        conn, _ = server.accept()
        with conn:
            conn.sendall(f"twincache-probe {name} {token}\n".encode())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="vm.probe")
    parser.add_argument("--name", required=True, choices=["a", "b"])
    parser.add_argument("--token", required=True)
    parser.add_argument("--nvram", choices=["write", "check"])
    parser.add_argument("--disk-serial", default="")
    parser.add_argument("--link", choices=["a", "b", "ping"])
    parser.add_argument("--echo", action="store_true", help="answer link pings while serving")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    try:
        run(args)
    except Exception as exc:        # the host must see every failure on the console
        report("error", error=f"{type(exc).__name__}: {exc}")
    print("TWINCACHE-PROBE-DONE", flush=True)
    if args.serve:
        serve(args.name, args.token)


def run(args) -> None:
    disks = disks_by_serial()
    report("disks", by_serial=disks)
    state = pathlib.Path("/var/lib/twincache")
    if state.is_dir():
        (state / f"probe-{args.name}").write_text(args.token + "\n")
        report("state", path=str(state))
    if args.nvram:
        probe_nvram(args.nvram, args.token)
    if args.link:
        link = LineLink()
        disk = disks[args.disk_serial] if args.disk_serial else ""
        if args.link == "a":
            link_role_a(link, disk, args.token, args.timeout)
        elif args.link == "b":
            link_role_b(link, disk, args.timeout)
        else:
            ping(link, args.timeout)
        if args.echo:
            threading.Thread(target=echo_forever, args=(link,), daemon=True).start()


if __name__ == "__main__":
    main()
