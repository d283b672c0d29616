"""Serial links on a real pty pair: pyserial on one end, the raw fd on the other, COBS framing.

The issue's test: garbage injected between frames and inside a frame; every
frame sent after the garbage arrives intact (the frame the garbage cut may
be lost, and nothing else is).
"""
import os
import random
import select
import time

import pytest

from firmware.formats import frame as F
from hal.backends.framing import CobsFramer
from hal.backends.link_serial import FdTransport, SerialLinkEndpoint, SerialTransport, VirtioPortEndpoint

TIMEOUT_S = 10


def frame(seq: int, payload: bytes = b"") -> bytes:
    return b"".join(F.encode_frame(4, 0, 1, 1, seq, 0, seq, payload))


@pytest.fixture
def pty_link():
    """(pyserial transport on the pty's slave, fd transport on its master)."""
    master, slave = os.openpty()
    endpoint = SerialLinkEndpoint(os.ttyname(slave), 115200)
    serial_side = endpoint.connect()
    os.close(slave)              # pyserial holds its own descriptor of the slave
    assert serial_side is not None, endpoint.last_error
    fd_side = FdTransport(master, "pty-master")
    yield serial_side, fd_side
    serial_side.close()
    fd_side.close()


def write_all(transport, data: bytes, reader=None, sink=None):
    """Write everything, draining `reader` into `sink` meanwhile so a pty never fills up."""
    view = memoryview(data)
    deadline = time.monotonic() + TIMEOUT_S
    while view:
        assert time.monotonic() < deadline, "write made no progress"
        n = transport.send([view])
        view = view[n:]
        if reader is not None:
            drain(reader, sink, 0)
        if view:
            select.select([], [transport.fileno()], [], 0.05)


def drain(transport, sink: bytearray, wait_s: float) -> None:
    buf = bytearray(4096)
    while select.select([transport.fileno()], [], [], wait_s)[0]:
        try:
            n = transport.recv_into(buf)
        except BlockingIOError:
            return
        assert n > 0
        sink += buf[:n]
        wait_s = 0


def receive_frames(transport, framer, count: int) -> list:
    frames, buf = [], bytearray(4096)
    deadline = time.monotonic() + TIMEOUT_S
    while len(frames) < count:
        assert time.monotonic() < deadline, f"received {len(frames)} of {count} frames"
        select.select([transport.fileno()], [], [], 0.1)
        try:
            n = transport.recv_into(buf)
        except BlockingIOError:
            continue
        frames += framer.feed(buf[:n])
    return frames


def test_frames_both_ways_over_pty(pty_link):
    serial_side, fd_side = pty_link
    tx, rx_fd, rx_serial = CobsFramer(), CobsFramer(), CobsFramer()
    to_fd = [frame(i, bytes(range(256)) * (i % 3)) for i in range(20)]    # payloads full of 0x00
    to_serial = [frame(100 + i, b"\x00" * i) for i in range(20)]
    for f in to_fd:
        write_all(serial_side, b"".join(tx.encode([f])))
    assert receive_frames(fd_side, rx_fd, 20) == to_fd
    for f in to_serial:
        write_all(fd_side, b"".join(tx.encode([f])))
    assert receive_frames(serial_side, rx_serial, 20) == to_serial
    assert rx_fd.dropped_bytes == rx_serial.dropped_bytes == 0


def test_garbage_between_and_inside_frames_loses_only_the_cut_frame(pty_link):
    serial_side, fd_side = pty_link
    rng = random.Random(20240607)
    tx, rx = CobsFramer(), CobsFramer()
    frames = [frame(i, rng.randbytes(rng.randrange(0, 200))) for i in range(40)]
    cut = {7, 19, 33}                     # these frames get garbage injected into their middle
    stream, expected = bytearray(), []
    for i, f in enumerate(frames):
        encoded = b"".join(tx.encode([f]))
        if i % 4 == 0:
            stream += rng.randbytes(rng.randrange(1, 40))           # garbage between frames
        if i in cut:
            middle = rng.randrange(2, len(encoded) - 2)
            stream += encoded[:middle] + rng.randbytes(rng.randrange(1, 20)) + encoded[middle:]
        else:
            stream += encoded
            expected.append(f)
    # The garbage goes in through the raw fd end, as line noise would.
    received = bytearray()
    for start in range(0, len(stream), 97):       # odd-sized writes: frames split anywhere
        write_all(fd_side, bytes(stream[start:start + 97]), serial_side, received)
    drain(serial_side, received, 0.5)
    out = rx.feed(bytes(received))
    # Garbage can, with tiny probability, decode and pass CRC32C: never here with this seed.
    assert [f for f in out if f not in frames] == []
    assert [f for f in expected if f not in out] == []      # everything not cut arrived intact
    assert out == [f for f in frames if f in out]           # in order
    assert rx.dropped_bytes > 0


def test_garbage_byte_by_byte_resync(pty_link):
    serial_side, fd_side = pty_link
    tx, rx = CobsFramer(), CobsFramer()
    noise = bytes([0x41, 0x00, 0x13, 0x00, 0x00, 0xFF]) + os.urandom(30)
    frames = [frame(i, b"payload %d" % i) for i in range(5)]
    data = noise + b"".join(b"".join(tx.encode([f])) for f in frames)
    received = bytearray()
    for byte in data:
        write_all(serial_side, bytes([byte]), fd_side, received)
    drain(fd_side, received, 0.5)
    out = [f for b in received for f in rx.feed(bytes([b]))]
    assert out == frames


def test_peer_close_reads_as_zero(pty_link):
    serial_side, fd_side = pty_link
    fd_side.close()
    select.select([serial_side.fileno()], [], [], TIMEOUT_S)
    assert serial_side.recv_into(bytearray(16)) == 0


def test_nothing_to_read_is_blocking_io_error(pty_link):
    serial_side, fd_side = pty_link
    for side in (serial_side, fd_side):
        with pytest.raises(BlockingIOError):
            side.recv_into(bytearray(16))


def test_pyserial_url_loopback():
    transport = SerialLinkEndpoint("loop://", 115200).connect()
    assert isinstance(transport, SerialTransport)
    framer = CobsFramer()
    f = frame(1, b"\x00looped\x00")
    assert transport.send(framer.encode([f])) == len(framer.encode([f])[0])
    buf = bytearray(200)
    n = transport.recv_into(buf)
    assert framer.feed(buf[:n]) == [f]
    with pytest.raises(BlockingIOError):
        transport.recv_into(buf)
    transport.close()


def test_missing_serial_device_is_retryable(tmp_path):
    endpoint = SerialLinkEndpoint(str(tmp_path / "ttyUSB9"), 115200)
    assert endpoint.connect() is None
    assert "ttyUSB9" in endpoint.last_error


def test_virtio_port_missing_is_not_connected(tmp_path):
    endpoint = VirtioPortEndpoint(tmp_path / "virtio-ports" / "twincache.link")
    assert endpoint.connect() is None
    assert "cannot open" in endpoint.last_error


def test_virtio_port_fd_io_on_a_fifo(tmp_path):
    """A FIFO opened read-write is a non-tty character stream like a virtio port: fd I/O loops back."""
    path = tmp_path / "port"
    os.mkfifo(path)
    transport = VirtioPortEndpoint(path).connect()
    assert isinstance(transport, FdTransport)
    framer = CobsFramer()
    f = frame(5, b"virtio")
    assert transport.send(framer.encode([f])) > 0
    buf = bytearray(100)
    n = transport.recv_into(buf)
    assert framer.feed(buf[:n]) == [f]
    with pytest.raises(BlockingIOError):
        transport.recv_into(buf)
    transport.close()
