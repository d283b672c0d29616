"""An emulated USB DFU 1.1 device, plugged into pyusb as a backend (usb.backend.IBackend).

This is an EMULATOR, the one stand-in in the board tests: no USB device can
exist on a test machine. It implements the device side of the USB Device
Firmware Upgrade spec 1.1 closely enough that the real host code in
board/dfu.py, running through the real pyusb core (usb.core.find,
Device.ctrl_transfer, set_interface_altsetting, reset, util.get_string),
cannot tell it from a device:

  - run-time mode (interface FE/01/01) with DFU_DETACH, wDetachTimeOut and a
    USB reset that re-enumerates it in DFU mode (FE/01/02, a new address),
    or bitWillDetach to re-enumerate by itself;
  - DFU mode with one alternate setting per memory partition, named by
    iInterface strings, and the DFU functional descriptor (bmAttributes,
    wDetachTimeOut, wTransferSize, bcdDFUVersion 0x0110);
  - the state machine of spec section A.1: dfuIDLE, dfuDNLOAD-SYNC,
    dfuDNBUSY, dfuDNLOAD-IDLE, dfuMANIFEST-SYNC, dfuMANIFEST,
    dfuMANIFEST-WAIT-RESET, dfuUPLOAD-IDLE, dfuERROR; a request the current
    state does not accept stalls and enters dfuERROR with errSTALLEDPKT;
  - bwPollTimeout: a request while programming or manifesting (before the
    poll timeout has passed) stalls, as the device is busy; counted in
    `poll_violations`;
  - CLRSTATUS and ABORT recovery; UPLOAD ends with a short packet.

Faults it injects (DfuFaults): stall the DNLOAD of a given block (the
packet is refused: errSTALLEDPKT), report an error status (errSTALLEDPKT,
errWRITE, ...) after a given block, fail manifestation with errVERIFY, and
start in dfuERROR as a device left by an interrupted session would.
"""
from __future__ import annotations

import dataclasses
import errno
import time

import usb.backend
import usb.core

from .dfu import (DFU_ABORT, DFU_CLRSTATUS, DFU_DETACH, DFU_DNLOAD, DFU_GETSTATE, DFU_GETSTATUS,
                  DFU_UPLOAD, ATTR_CAN_DNLOAD, ATTR_CAN_UPLOAD, ATTR_MANIFESTATION_TOLERANT,
                  ATTR_WILL_DETACH, FunctionalDescriptor, State, Status, StatusReply)

BUSY_STATES = (State.dfuDNBUSY, State.dfuMANIFEST)
ABORTABLE = (State.dfuIDLE, State.dfuDNLOAD_SYNC, State.dfuDNLOAD_IDLE, State.dfuMANIFEST_SYNC,
             State.dfuUPLOAD_IDLE)


class Stall(Exception):
    """The device answers the request with a STALL handshake."""


@dataclasses.dataclass
class DfuFaults:
    stall_block: int | None = None            # DNLOAD of this block stalls...
    stall_times: int = 1                      # ...this many times
    status_error_block: int | None = None     # after programming this block, GETSTATUS reports...
    status_error: Status = Status.errSTALLEDPKT   # ...this status (once)
    manifest_error: Status | None = None      # manifestation always fails with this (errVERIFY)
    start_in_error: bool = False


@dataclasses.dataclass
class Partition:
    name: str
    capacity_bytes: int
    data: bytearray = dataclasses.field(default_factory=bytearray)


class DfuDeviceModel:
    """The device: its descriptors, its mode, the DFU state machine and its memory."""

    def __init__(self, vid: int, pid: int, partitions=(("bundle", 1 << 20), ("env", 64 << 10)),
                 transfer_size: int = 1024, poll_timeout_ms: int = 5, detach_timeout_ms: int = 1000,
                 manifestation_tolerant: bool = True, will_detach: bool = False, start_in_dfu: bool = False,
                 faults: DfuFaults | None = None, now=time.monotonic):
        self.vid, self.pid = vid, pid
        self.partitions = [Partition(n, c) for n, c in partitions]
        self.transfer_size = transfer_size
        self.poll_timeout_ms = poll_timeout_ms
        self.detach_timeout_ms = detach_timeout_ms
        self.attributes = ATTR_CAN_DNLOAD | ATTR_CAN_UPLOAD | \
            (ATTR_MANIFESTATION_TOLERANT if manifestation_tolerant else 0) | (ATTR_WILL_DETACH if will_detach else 0)
        self.faults = faults or DfuFaults()
        self.now = now
        self.address = 5
        self.generation = 0                   # bumped on every re-enumeration; old handles go stale
        self.dfu_mode = start_in_dfu
        self.state = State.dfuERROR if start_in_dfu and self.faults.start_in_error else \
            State.dfuIDLE if start_in_dfu else State.appIDLE
        self.status = Status.errUNKNOWN if self.state == State.dfuERROR else Status.OK
        self.alt = 0
        self.busy_until = 0.0
        self.detach_deadline = 0.0
        self.poll_violations = 0
        self.requests = []                    # (name, state before) for tests to read
        self._reset_transfer()

    def _reset_transfer(self):
        self.staging = bytearray()
        self.next_block = 0
        self.block_pending = False
        self.manifest_pending = False
        self.upload_offset = 0

    # -- USB-level events --------------------------------------------------------

    def usb_reset(self):
        self._advance_busy()                  # time has passed: finish programming or manifesting
        if not self.dfu_mode and self.state == State.appDETACH and self.now() <= self.detach_deadline:
            self._enumerate(dfu=True)
        elif self.dfu_mode:
            self._enumerate(dfu=False)        # leaves DFU mode and runs the (new) firmware
        else:
            self.state = State.appIDLE

    def _enumerate(self, dfu: bool):
        self.dfu_mode = dfu
        self.address += 1
        self.generation += 1
        self.alt = 0
        self.state = State.dfuIDLE if dfu else State.appIDLE
        self.status = Status.OK
        self._reset_transfer()

    # -- class requests ---------------------------------------------------------------

    def request(self, b_request: int, w_value: int, data: bytes | None, w_length: int) -> bytes | int:
        """One DFU class request; returns IN data or the OUT byte count, or raises Stall."""
        self.requests.append((b_request, self.state))
        if not self.dfu_mode:
            return self._runtime_request(b_request, w_value)
        self._advance_busy()
        if self.state == State.dfuMANIFEST_WAIT_RESET:
            raise Stall()                     # only a USB reset gets it out of here
        if self.state in BUSY_STATES:
            # The host did not wait bwPollTimeout: a busy device cannot answer.
            self.poll_violations += 1
            return self._stall(Status.errSTALLEDPKT)
        handler = {DFU_DNLOAD: self._dnload, DFU_UPLOAD: self._upload, DFU_GETSTATUS: self._getstatus,
                   DFU_CLRSTATUS: self._clrstatus, DFU_GETSTATE: self._getstate,
                   DFU_ABORT: self._abort}.get(b_request)
        if handler is None:                   # DFU_DETACH is not a DFU-mode request
            return self._stall(Status.errSTALLEDPKT)
        return handler(w_value, data, w_length)

    def _runtime_request(self, b_request, w_value):
        if b_request == DFU_DETACH and self.state == State.appIDLE:
            self.state = State.appDETACH
            self.detach_deadline = self.now() + min(w_value, self.detach_timeout_ms) / 1000
            if self.attributes & ATTR_WILL_DETACH:
                self._enumerate(dfu=True)     # detaches and re-attaches by itself
            return 0
        if b_request == DFU_GETSTATUS:
            return StatusReply.build(dict(status=Status.OK, poll_timeout_ms=0, state=self.state, string=0))
        if b_request == DFU_GETSTATE:
            return bytes([self.state])
        raise Stall()

    def _stall(self, status: Status):
        if self.state != State.dfuERROR:
            self.state, self.status = State.dfuERROR, status
        raise Stall()

    def _advance_busy(self):
        if self.state not in BUSY_STATES or self.now() < self.busy_until:
            return
        if self.state == State.dfuDNBUSY:
            self.state, self.block_pending = State.dfuDNLOAD_SYNC, False
            return
        self.manifest_pending = False       # manifestation finished
        if self.faults.manifest_error is not None:
            self.state, self.status = State.dfuERROR, self.faults.manifest_error
            return
        part = self.partitions[self.alt]
        part.data = bytearray(self.staging)
        self.state = State.dfuMANIFEST_SYNC if self.attributes & ATTR_MANIFESTATION_TOLERANT \
            else State.dfuMANIFEST_WAIT_RESET

    def _dnload(self, w_value, data, w_length):
        if w_length == 0:
            if self.state != State.dfuDNLOAD_IDLE:
                return self._stall(Status.errSTALLEDPKT)
            self.state, self.manifest_pending = State.dfuMANIFEST_SYNC, True
            return 0
        if self.state not in (State.dfuIDLE, State.dfuDNLOAD_IDLE) or w_length > self.transfer_size:
            return self._stall(Status.errSTALLEDPKT)
        if self.state == State.dfuIDLE:
            self._reset_transfer()
        if w_value != self.next_block & 0xFFFF:
            return self._stall(Status.errSTALLEDPKT)
        if self.faults.stall_block == w_value and self.faults.stall_times > 0:
            self.faults.stall_times -= 1
            return self._stall(Status.errSTALLEDPKT)
        if len(self.staging) + w_length > self.partitions[self.alt].capacity_bytes:
            return self._stall(Status.errADDRESS)
        self.staging += bytes(data)
        self.next_block += 1
        self.state, self.block_pending = State.dfuDNLOAD_SYNC, True
        return w_length

    def _getstatus(self, w_value, data, w_length):
        poll_ms = 0
        if self.state == State.dfuDNLOAD_SYNC and self.block_pending:
            self.state, self.busy_until, poll_ms = State.dfuDNBUSY, self.now() + self.poll_timeout_ms / 1000, \
                self.poll_timeout_ms
            if self.faults.status_error_block == self.next_block - 1:
                self.faults.status_error_block = None
                self.state, self.status, poll_ms = State.dfuERROR, self.faults.status_error, 0
        elif self.state == State.dfuDNLOAD_SYNC:
            self.state = State.dfuDNLOAD_IDLE
        elif self.state == State.dfuMANIFEST_SYNC and self.manifest_pending:
            self.state, self.busy_until, poll_ms = State.dfuMANIFEST, self.now() + self.poll_timeout_ms / 1000, \
                self.poll_timeout_ms
        elif self.state == State.dfuMANIFEST_SYNC:
            self.state = State.dfuIDLE
        return StatusReply.build(dict(status=self.status, poll_timeout_ms=poll_ms, state=self.state, string=0))

    def _clrstatus(self, w_value, data, w_length):
        if self.state != State.dfuERROR:
            return self._stall(Status.errSTALLEDPKT)
        self.state, self.status = State.dfuIDLE, Status.OK
        self._reset_transfer()
        return 0

    def _getstate(self, w_value, data, w_length):
        return bytes([self.state])

    def _abort(self, w_value, data, w_length):
        if self.state not in ABORTABLE:
            return self._stall(Status.errSTALLEDPKT)
        self.state = State.dfuIDLE
        self._reset_transfer()
        return 0

    def _upload(self, w_value, data, w_length):
        if self.state not in (State.dfuIDLE, State.dfuUPLOAD_IDLE) or w_length > self.transfer_size:
            return self._stall(Status.errSTALLEDPKT)
        if self.state == State.dfuIDLE:
            self.upload_offset = 0
        content = self.partitions[self.alt].data
        chunk = bytes(content[self.upload_offset:self.upload_offset + w_length])
        self.upload_offset += len(chunk)
        self.state = State.dfuIDLE if len(chunk) < w_length else State.dfuUPLOAD_IDLE
        return chunk

    # -- descriptors ---------------------------------------------------------------

    def interfaces(self) -> list:
        """[(alt, protocol, iInterface)]: one alt in run-time mode, one per partition in DFU mode."""
        if not self.dfu_mode:
            return [(0, 1, 4)]
        return [(i, 2, 5 + i) for i in range(len(self.partitions))]

    def strings(self) -> dict:
        names = {1: "twincache", 2: "DFU 1.1 emulator (not a real device)", 3: "EMU0001", 4: "twincache runtime"}
        names.update({5 + i: p.name for i, p in enumerate(self.partitions)})
        return names

    def functional_descriptor(self) -> bytes:
        return FunctionalDescriptor.build(dict(attributes=self.attributes, detach_timeout_ms=self.detach_timeout_ms,
                                               transfer_size=self.transfer_size, dfu_version=0x0110))


class _Desc:
    def __init__(self, **fields):
        self.__dict__.update(fields)


class DfuEmulatorBackend(usb.backend.IBackend):
    """pyusb backend serving DfuDeviceModel devices; pass it as usb.core.find(backend=...)."""

    def __init__(self, *devices: DfuDeviceModel):
        self.devices = list(devices)

    def enumerate_devices(self):
        return iter(self.devices)

    def get_device_descriptor(self, dev):
        return _Desc(bLength=18, bDescriptorType=1, bcdUSB=0x0200, bDeviceClass=0, bDeviceSubClass=0,
                     bDeviceProtocol=0, bMaxPacketSize0=64, idVendor=dev.vid, idProduct=dev.pid,
                     bcdDevice=0x0100 if not dev.dfu_mode else 0x0200, iManufacturer=1, iProduct=2,
                     iSerialNumber=3, bNumConfigurations=1, address=dev.address, bus=1, port_number=1,
                     port_numbers=(1,), speed=3)

    def get_configuration_descriptor(self, dev, config):
        if config != 0:
            raise IndexError(config)
        return _Desc(bLength=9, bDescriptorType=2, wTotalLength=9 + 18 * len(dev.interfaces()), bNumInterfaces=1,
                     bConfigurationValue=1, iConfiguration=0, bmAttributes=0x80, bMaxPower=50,
                     extra_descriptors=[])

    def get_interface_descriptor(self, dev, intf, alt, config):
        interfaces = dev.interfaces()
        if intf != 0 or config != 0 or alt >= len(interfaces):
            raise IndexError(alt)
        number, protocol, string = interfaces[alt]
        return _Desc(bLength=9, bDescriptorType=4, bInterfaceNumber=0, bAlternateSetting=number, bNumEndpoints=0,
                     bInterfaceClass=0xFE, bInterfaceSubClass=1, bInterfaceProtocol=protocol,
                     iInterface=string, extra_descriptors=list(dev.functional_descriptor()))

    def get_endpoint_descriptor(self, dev, ep, intf, alt, config):
        raise IndexError(ep)                  # DFU uses the default control pipe only

    def open_device(self, dev):
        return (dev, dev.generation)

    def close_device(self, dev_handle):
        pass

    def set_configuration(self, dev_handle, config_value):
        self._live(dev_handle)

    def get_configuration(self, dev_handle):
        self._live(dev_handle)
        return 1

    def set_interface_altsetting(self, dev_handle, intf, altsetting):
        dev = self._live(dev_handle)
        if altsetting >= len(dev.interfaces()) or (dev.dfu_mode and dev.state != State.dfuIDLE):
            raise usb.core.USBError("Pipe error", -9, errno.EPIPE)
        dev.alt = altsetting

    def claim_interface(self, dev_handle, intf):
        self._live(dev_handle)

    def release_interface(self, dev_handle, intf):
        pass

    def is_kernel_driver_active(self, dev_handle, intf):
        return False

    def reset_device(self, dev_handle):
        self._live(dev_handle).usb_reset()

    def ctrl_transfer(self, dev_handle, bmRequestType, bRequest, wValue, wIndex, data, timeout):
        dev = self._live(dev_handle)
        try:
            if bmRequestType & 0x60 == 0:     # standard request: only GET_DESCRIPTOR(string) is needed
                return self._standard(dev, bmRequestType, bRequest, wValue, data)
            if bmRequestType & 0x7F != 0x21 or wIndex != 0:
                raise Stall()
            is_in = bool(bmRequestType & 0x80)
            result = dev.request(bRequest, wValue, None if is_in else bytes(data), len(data))
        except Stall:
            raise usb.core.USBError("Pipe error", -9, errno.EPIPE) from None
        if not is_in:
            return result
        data[:len(result)] = type(data)(data.typecode, result)
        return len(result)

    def _standard(self, dev, bmRequestType, bRequest, wValue, data):
        if bRequest != 6 or wValue >> 8 != 3:
            raise Stall()
        index = wValue & 0xFF
        if index == 0:
            payload = bytes([4, 3, 0x09, 0x04])            # LANGID: en-US
        else:
            text = dev.strings().get(index)
            if text is None:
                raise Stall()
            raw = text.encode("utf-16-le")
            payload = bytes([2 + len(raw), 3]) + raw
        payload = payload[:len(data)]
        data[:len(payload)] = type(data)(data.typecode, payload)
        return len(payload)

    @staticmethod
    def _live(dev_handle):
        dev, generation = dev_handle
        if generation != dev.generation:
            raise usb.core.USBError("No such device (it has been disconnected)", -4, errno.ENODEV)
        return dev
