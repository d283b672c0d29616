"""Flashing-protocol frames over a serial line: COBS, a 0x00 delimiter, pyserial.

Both the board agent and the host flasher use this. A damaged frame (COBS
or CRC error, or a run of bytes longer than any frame) is reported as a
FormatError so the caller can NAK it; the reader then resynchronises at the
next 0x00. Any pyserial URL works (a tty, a pty, socket://, rfc2217://).
"""
from __future__ import annotations

import time

import serial
from cobs import cobs

from firmware.formats import FormatError
from firmware.formats import flashproto as proto

# COBS adds one byte in 254, plus the delimiter: a bound on an encoded frame.
ENCODED_MAX_BYTES = proto.FRAME_MAX_BYTES + proto.FRAME_MAX_BYTES // 254 + 2


def open_port(url: str, baud: int, timeout_s: float = 0.05) -> serial.SerialBase:
    try:
        return serial.serial_for_url(url, baudrate=baud, timeout=timeout_s, write_timeout=10)
    except (serial.SerialException, ValueError) as exc:
        raise OSError(f"{url}: cannot open serial port ({exc})") from None


class FrameLink:
    """Send and receive whole protocol messages on one serial port."""

    def __init__(self, port, name: str = "serial"):
        self.port = port
        self.name = name
        self._buf = bytearray()
        self.bytes_out = 0
        self.bytes_in = 0

    def send(self, msg_type, seq: int, **fields):
        data = cobs.encode(proto.build_frame(msg_type, seq, **fields)) + b"\x00"
        self.port.write(data)
        self.bytes_out += len(data)

    def discard_input(self):
        self.port.reset_input_buffer()
        self._buf.clear()

    def receive(self, timeout_s: float):
        """Return (MsgType, seq, body), or None when nothing whole arrived in time.

        Raises FormatError for a damaged frame; the next call reads on after it.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            frame = self._take_frame()
            if frame is not None:
                return self._decode(frame)
            if time.monotonic() >= deadline:
                return None
            chunk = self.port.read(max(1, min(self.port.in_waiting, 65536)))
            self.bytes_in += len(chunk)
            self._buf += chunk

    def _take_frame(self) -> bytes | None:
        end = self._buf.find(0)
        if end < 0:
            if len(self._buf) > ENCODED_MAX_BYTES:
                # A lost delimiter: drop the run and report it, so the sender resends.
                self._buf.clear()
                raise FormatError("no frame delimiter within the longest frame", self.name)
            return None
        frame = bytes(self._buf[:end])
        del self._buf[:end + 1]
        return frame

    def _decode(self, encoded: bytes):
        if not encoded:
            raise FormatError("empty frame", self.name)
        try:
            raw = cobs.decode(encoded)
        except cobs.DecodeError:
            raise FormatError("COBS decode error", self.name) from None
        return proto.parse_frame_untrusted(raw, self.name)
