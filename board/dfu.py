"""USB DFU 1.1 host: `twincache board flash BUNDLE --usb VID:PID[,ALT]` through pyusb.

For boards whose bootloader speaks DFU (U-Boot's `dfu` command, many MCU ROMs).
Steps: find the device; if it is in run-time mode, DFU_DETACH and a USB
reset, then find it again in DFU mode; select the alternate setting by
number or by its iInterface name; bring it to dfuIDLE (CLRSTATUS from
dfuERROR, ABORT from any other state); DNLOAD in wTransferSize blocks,
polling GETSTATUS and waiting bwPollTimeout each time the device says it is
busy; a zero-length DNLOAD to manifest; UPLOAD to read the image back and
compare. A stall or an errSTALLEDPKT status restarts the download from
block 0 after CLRSTATUS (DFU 1.1 has no resume); any other error status,
such as errVERIFY, ends the flash with that status named.

The DFU request codes, states, statuses and the two wire structs
(GETSTATUS reply, functional descriptor) are declared here once; the
emulator (board/dfu_emulator.py) uses the same declarations.
"""
from __future__ import annotations

import enum
import errno
import sys
import time

from construct import Const, Int8ul, Int16ul, Int24ul, Struct
from construct.core import ConstructError

DFU_DETACH, DFU_DNLOAD, DFU_UPLOAD, DFU_GETSTATUS, DFU_CLRSTATUS, DFU_GETSTATE, DFU_ABORT = range(7)
REQ_OUT = 0x21                # class, interface, host to device
REQ_IN = 0xA1
ATTR_CAN_DNLOAD, ATTR_CAN_UPLOAD, ATTR_MANIFESTATION_TOLERANT, ATTR_WILL_DETACH = 1, 2, 4, 8
DFU_CLASS, DFU_SUBCLASS, PROTOCOL_RUNTIME, PROTOCOL_DFU = 0xFE, 0x01, 0x01, 0x02
DESC_DFU_FUNCTIONAL = 0x21
ATTEMPTS_MAX = 3              # whole downloads, after a stall
POLLS_MAX = 10000             # GETSTATUS polls of one block before calling the device stuck
REENUMERATE_TIMEOUT_S = 5.0
CONTROL_TIMEOUT_MS = 5000


class State(enum.IntEnum):
    appIDLE = 0
    appDETACH = 1
    dfuIDLE = 2
    dfuDNLOAD_SYNC = 3
    dfuDNBUSY = 4
    dfuDNLOAD_IDLE = 5
    dfuMANIFEST_SYNC = 6
    dfuMANIFEST = 7
    dfuMANIFEST_WAIT_RESET = 8
    dfuUPLOAD_IDLE = 9
    dfuERROR = 10


class Status(enum.IntEnum):
    OK = 0x00
    errTARGET = 0x01
    errFILE = 0x02
    errWRITE = 0x03
    errERASE = 0x04
    errCHECK_ERASED = 0x05
    errPROG = 0x06
    errVERIFY = 0x07
    errADDRESS = 0x08
    errNOTDONE = 0x09
    errFIRMWARE = 0x0A
    errVENDOR = 0x0B
    errUSBR = 0x0C
    errPOR = 0x0D
    errUNKNOWN = 0x0E
    errSTALLEDPKT = 0x0F


StatusReply = Struct(                         # DFU_GETSTATUS, 6 bytes, little-endian
    "status" / Int8ul,                        # Status
    "poll_timeout_ms" / Int24ul,              # bwPollTimeout: wait this long before the next request
    "state" / Int8ul,                         # State, the one the device enters now
    "string" / Int8ul,                        # iString: a vendor description of the status
)
assert StatusReply.sizeof() == 6

FunctionalDescriptor = Struct(                # DFU functional descriptor, 9 bytes
    "length" / Const(9, Int8ul),              # bLength
    "type" / Const(DESC_DFU_FUNCTIONAL, Int8ul),  # bDescriptorType
    "attributes" / Int8ul,                    # ATTR_*
    "detach_timeout_ms" / Int16ul,            # wDetachTimeOut
    "transfer_size" / Int16ul,                # wTransferSize: bytes per DNLOAD/UPLOAD
    "dfu_version" / Int16ul,                  # bcdDFUVersion, 0x0110
)
assert FunctionalDescriptor.sizeof() == 9


class DfuError(Exception):
    """The device could not be flashed; one line naming the step and the DFU status."""


class _Retry(Exception):
    """A stall or errSTALLEDPKT: recover and download again from block 0."""


def find_dfu_interfaces(dev) -> list:
    """The DFU interfaces (all alternate settings) of the device's first configuration."""
    return [intf for intf in dev[0] if (intf.bInterfaceClass, intf.bInterfaceSubClass) == (DFU_CLASS, DFU_SUBCLASS)]


def functional_descriptor(intf):
    """Parse the DFU functional descriptor among the interface's extra descriptors."""
    extra = bytes(intf.extra_descriptors)
    i = 0
    while i + 2 <= len(extra) and extra[i] >= 2:
        if extra[i + 1] == DESC_DFU_FUNCTIONAL and extra[i] >= 9:
            try:
                return FunctionalDescriptor.parse(extra[i:i + 9])
            except ConstructError:
                break
        i += extra[i]
    raise DfuError(f"interface {intf.bInterfaceNumber} alt {intf.bAlternateSetting}: "
                   "no DFU functional descriptor")


class DfuHost:
    """One DFU interface of one device, in DFU mode; every request of the spec as a method."""

    def __init__(self, dev, intf, sleep=time.sleep, log=lambda text: None):
        self.dev = dev
        self.intf = intf
        self.number = intf.bInterfaceNumber
        self.func = functional_descriptor(intf)
        self.sleep = sleep
        self.log = log

    def _out(self, request, value=0, data=b""):
        return self.dev.ctrl_transfer(REQ_OUT, request, value, self.number, data, CONTROL_TIMEOUT_MS)

    def _in(self, request, value, length):
        return bytes(self.dev.ctrl_transfer(REQ_IN, request, value, self.number, length, CONTROL_TIMEOUT_MS))

    def get_status(self):
        raw = self._in(DFU_GETSTATUS, 0, 6)
        try:
            reply = StatusReply.parse(raw)
        except ConstructError:
            raise DfuError(f"GETSTATUS returned {len(raw)} bytes, not 6") from None
        return _enum(Status, reply.status), _enum(State, reply.state), reply.poll_timeout_ms

    def get_state(self):
        return _enum(State, self._in(DFU_GETSTATE, 0, 1)[0])

    def clear_status(self):
        self._out(DFU_CLRSTATUS)

    def abort(self):
        self._out(DFU_ABORT)

    def to_idle(self):
        """Bring the device to dfuIDLE from whatever an earlier session left (spec 6.1.2)."""
        status, state, _ = self.get_status()
        if state == State.dfuERROR:
            self.log(f"device in dfuERROR ({status.name}): CLRSTATUS")
            self.clear_status()
        elif state != State.dfuIDLE:
            self.log(f"device in {state.name}: ABORT")
            self.abort()
        status, state, _ = self.get_status()
        if state != State.dfuIDLE:
            raise DfuError(f"cannot bring the device to dfuIDLE: it is in {state.name} ({status.name})")

    def wait_while_busy(self, done_states, what: str):
        """Poll GETSTATUS, waiting bwPollTimeout after each busy answer, until a state in done_states."""
        for _ in range(POLLS_MAX):
            try:
                status, state, poll_ms = self.get_status()
            except _usb_errors() as exc:
                raise _Retry(f"{what}: GETSTATUS failed: {exc}") from None
            if status != Status.OK:
                if status == Status.errSTALLEDPKT:
                    raise _Retry(f"{what}: device reports errSTALLEDPKT")
                raise DfuError(f"{what}: device reports {status.name} (state {state.name})")
            if state in done_states:
                return state
            if state not in (State.dfuDNBUSY, State.dfuMANIFEST, State.dfuDNLOAD_SYNC, State.dfuMANIFEST_SYNC):
                raise DfuError(f"{what}: unexpected state {state.name}")
            # The device may not answer at all until bwPollTimeout has passed.
            self.sleep(poll_ms / 1000)
        raise DfuError(f"{what}: still busy after {POLLS_MAX} polls")

    def download(self, blob: bytes, size: int, progress):
        for block, offset in enumerate(range(0, len(blob), size)):
            try:
                self._out(DFU_DNLOAD, block & 0xFFFF, blob[offset:offset + size])
            except _usb_errors() as exc:
                raise _Retry(f"DNLOAD block {block}: {exc}") from None
            self.wait_while_busy((State.dfuDNLOAD_IDLE,), f"block {block}")
            progress(offset + len(blob[offset:offset + size]))

    def manifest(self) -> bool:
        """Zero-length DNLOAD, then wait for manifestation; return whether the device stays in DFU mode."""
        self._out(DFU_DNLOAD, 0, b"")
        if self.func.attributes & ATTR_MANIFESTATION_TOLERANT:
            self.wait_while_busy((State.dfuIDLE,), "manifestation")
            return True
        # Not tolerant: one GETSTATUS starts manifestation; afterwards the device answers
        # nothing until the host resets it (dfuMANIFEST-WAIT-RESET).
        status, state, poll_ms = self.get_status()
        if status != Status.OK:
            raise DfuError(f"manifestation: device reports {status.name} (state {state.name})")
        self.sleep(poll_ms / 1000)
        return False

    def upload(self, length: int, size: int) -> bytes:
        data = bytearray()
        block = 0
        while len(data) < length:
            chunk = self._in(DFU_UPLOAD, block & 0xFFFF, size)
            data += chunk
            block += 1
            if len(chunk) < size:
                return bytes(data)            # a short packet: the device has no more
        if self.get_state() == State.dfuUPLOAD_IDLE:
            self.abort()                      # the partition is larger than the image: stop reading
        return bytes(data)


def _enum(kind, value):
    try:
        return kind(value)
    except ValueError:
        raise DfuError(f"device sent unknown {kind.__name__} {value}") from None


def _usb_errors():
    import usb.core
    return (usb.core.USBError,)


def flash(blob: bytes, vid: int, pid: int, alt=None, backend=None, out=sys.stderr, sleep=time.sleep) -> str:
    """Download `blob` to the DFU device VID:PID (alt by number or name), read it back, compare."""
    try:
        return _flash(blob, vid, pid, alt, backend, out, sleep)
    except _usb_errors() as exc:
        raise DfuError(f"USB error talking to {vid:04x}:{pid:04x}: {exc}") from None


def _flash(blob, vid, pid, alt, backend, out, sleep) -> str:
    def log(text):
        out.write(f"dfu: {text}\n")
        out.flush()
    host = _open(vid, pid, alt, backend, sleep, log)
    size = host.func.transfer_size
    log(f"alt {host.intf.bAlternateSetting} ({_alt_name(host.dev, host.intf)}), wTransferSize {size}, "
        f"{len(blob)} bytes in {-(-len(blob) // size)} blocks")
    stays = _download_with_recovery(host, blob, size, log)
    if not stays:
        log("device is not manifestation tolerant: USB reset, then back into DFU mode to read back")
        _reset(host.dev)
        host = _open(vid, pid, alt, backend, sleep, log)
    host.to_idle()
    back = host.upload(len(blob), size)
    if back[:len(blob)] != blob:
        where = next((i for i, (a, b) in enumerate(zip(back, blob)) if a != b), min(len(back), len(blob)))
        raise DfuError(f"read-back differs from the bundle at byte {where} ({len(back)} bytes read)")
    return f"{len(blob)} bytes to alt {host.intf.bAlternateSetting} ({_alt_name(host.dev, host.intf)}), " \
           f"read back and verified"


def _download_with_recovery(host: DfuHost, blob: bytes, size: int, log) -> bool:
    last = ""
    for attempt in range(1, ATTEMPTS_MAX + 1):
        host.to_idle()
        started = time.monotonic()
        try:
            host.download(blob, size, lambda done: None)
            stays = host.manifest()
        except _Retry as exc:
            last = str(exc)
            log(f"{last}: recovering with CLRSTATUS, download again from block 0 (attempt {attempt})")
            continue
        seconds = time.monotonic() - started
        log(f"downloaded and manifested in {seconds:.2f} s ({len(blob) / max(seconds, 1e-6) / 1024:.1f} KiB/s)")
        return stays
    raise DfuError(f"download failed {ATTEMPTS_MAX} times; last: {last}")


def _open(vid, pid, alt, backend, sleep, log) -> DfuHost:
    dev = _find(vid, pid, backend, lambda d: bool(find_dfu_interfaces(d)))
    if find_dfu_interfaces(dev)[0].bInterfaceProtocol != PROTOCOL_DFU:
        dev = _detach(dev, vid, pid, backend, sleep, log)
    intf = _select_alt(dev, alt)
    host = DfuHost(dev, intf, sleep, log)
    host.to_idle()          # an alternate setting can only be chosen in dfuIDLE
    dev.set_interface_altsetting(interface=intf.bInterfaceNumber, alternate_setting=intf.bAlternateSetting)
    return host


def _find(vid, pid, backend, match):
    import usb.core
    try:
        devices = list(usb.core.find(find_all=True, idVendor=vid, idProduct=pid, backend=backend))
    except usb.core.NoBackendError:
        raise DfuError("no USB backend: install libusb-1.0") from None
    for dev in devices:
        if match(dev):
            return dev
    raise DfuError(f"no USB DFU device {vid:04x}:{pid:04x}")


def _detach(dev, vid, pid, backend, sleep, log):
    """Run-time mode: DFU_DETACH, USB reset (unless the device detaches itself), find it again."""
    import usb.util
    intf = find_dfu_interfaces(dev)[0]
    func = functional_descriptor(intf)
    log(f"run-time mode: DFU_DETACH (wDetachTimeOut {func.detach_timeout_ms} ms)")
    dev.ctrl_transfer(REQ_OUT, DFU_DETACH, func.detach_timeout_ms, intf.bInterfaceNumber, b"", CONTROL_TIMEOUT_MS)
    if not func.attributes & ATTR_WILL_DETACH:
        _reset(dev)
    usb.util.dispose_resources(dev)
    deadline = time.monotonic() + REENUMERATE_TIMEOUT_S
    while True:
        try:
            return _find(vid, pid, backend, lambda d: any(
                i.bInterfaceProtocol == PROTOCOL_DFU for i in find_dfu_interfaces(d)))
        except DfuError:
            if time.monotonic() > deadline:
                raise DfuError(f"{vid:04x}:{pid:04x} did not come back in DFU mode after detach") from None
            sleep(0.05)


def _reset(dev):
    import usb.core
    try:
        dev.reset()
    except usb.core.USBError as exc:
        if exc.errno not in (errno.ENODEV, errno.EIO):   # the device leaving the bus is the point
            raise


def _select_alt(dev, alt):
    intfs = [i for i in find_dfu_interfaces(dev) if i.bInterfaceProtocol == PROTOCOL_DFU]
    if alt is None:
        return intfs[0]
    for intf in intfs:
        if alt == intf.bAlternateSetting or alt == _alt_name(dev, intf):
            return intf
    names = ", ".join(f"{i.bAlternateSetting}={_alt_name(dev, i)}" for i in intfs)
    raise DfuError(f"no DFU alternate setting {alt!r}; the device has {names}")


def _alt_name(dev, intf) -> str:
    import usb.core
    import usb.util
    try:
        return usb.util.get_string(dev, intf.iInterface) or ""
    except (usb.core.USBError, ValueError):
        return ""
