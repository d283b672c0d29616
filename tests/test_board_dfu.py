"""USB DFU: the real host code through the real pyusb core, against the DFU 1.1 device emulator.

The emulator (board/dfu_emulator.py) is the one stand-in: it is a pyusb
backend, so usb.core.find, ctrl_transfer, set_interface_altsetting, reset
and get_string all run as they would against libusb.
"""
import argparse
import os

import pytest
import usb.core

from board import dfu
from board.cli import _flash_usb, parse_usb_spec
from board.dfu import State, Status
from board.dfu_emulator import DfuDeviceModel, DfuEmulatorBackend, DfuFaults
from hal.cli.errors import CommandFailed, UsageError

VID, PID = 0x1209, 0x7C01
BLOB = os.urandom(9000)        # 18 blocks of 512, the last one short


class Log(list):
    def write(self, text):
        self.append(text)

    def flush(self):
        pass

    def text(self):
        return "".join(self)


def device(**kw) -> DfuDeviceModel:
    kw.setdefault("transfer_size", 512)
    kw.setdefault("poll_timeout_ms", 2)
    return DfuDeviceModel(VID, PID, **kw)


def flash(model, alt="bundle", blob=BLOB, **kw):
    log = Log()
    result = dfu.flash(blob, VID, PID, alt, backend=DfuEmulatorBackend(model), out=log, **kw)
    return result, log.text()


def test_pyusb_sees_the_emulated_device_in_run_time_mode():
    dev = usb.core.find(idVendor=VID, idProduct=PID, backend=DfuEmulatorBackend(device()))
    intf = dfu.find_dfu_interfaces(dev)[0]
    assert intf.bInterfaceProtocol == dfu.PROTOCOL_RUNTIME
    func = dfu.functional_descriptor(intf)
    assert (func.transfer_size, func.dfu_version) == (512, 0x0110)
    assert "emulator" in usb.util.get_string(dev, dev.iProduct)


def test_detach_download_manifest_upload_verify():
    model = device()
    result, log = flash(model)
    assert "read back and verified" in result
    assert "DFU_DETACH" in log and model.dfu_mode
    assert bytes(model.partitions[0].data) == BLOB and model.state == State.dfuIDLE
    assert model.poll_violations == 0          # bwPollTimeout honoured on every busy answer
    assert sum(1 for r, _ in model.requests if r == dfu.DFU_DNLOAD) == 18 + 1   # blocks + zero-length


def test_alt_by_number_and_by_name():
    model = device()
    flash(model, alt=1, blob=BLOB[:3000])
    assert bytes(model.partitions[1].data) == BLOB[:3000] and not model.partitions[0].data
    with pytest.raises(dfu.DfuError, match="0=bundle, 1=env"):
        flash(device(), alt="rootfs")


def test_a_host_that_ignores_bw_poll_timeout_is_caught_by_the_emulator():
    model = device(poll_timeout_ms=50)
    with pytest.raises(dfu.DfuError, match="download failed 3 times"):
        flash(model, sleep=lambda s: None)
    assert model.poll_violations >= 3


def test_a_stalled_dnload_is_recovered_with_clrstatus_and_a_fresh_download():
    model = device(faults=DfuFaults(stall_block=5, stall_times=1))
    result, log = flash(model)
    assert "DNLOAD block 5: [Errno 32] Pipe error" in log and "CLRSTATUS" in log
    assert bytes(model.partitions[0].data) == BLOB


def test_a_device_that_keeps_stalling_fails_after_the_attempt_limit():
    model = device(faults=DfuFaults(stall_block=2, stall_times=99))
    with pytest.raises(dfu.DfuError, match="download failed 3 times; last: DNLOAD block 2"):
        flash(model)
    assert not model.partitions[0].data


def test_err_stalledpkt_status_is_recovered():
    model = device(faults=DfuFaults(status_error_block=7, status_error=Status.errSTALLEDPKT))
    _, log = flash(model)
    assert "block 7: device reports errSTALLEDPKT" in log
    assert bytes(model.partitions[0].data) == BLOB


def test_err_verify_at_manifestation_fails_the_flash_with_the_status_named():
    model = device(faults=DfuFaults(manifest_error=Status.errVERIFY))
    with pytest.raises(dfu.DfuError, match="manifestation: device reports errVERIFY"):
        flash(model)
    assert model.state == State.dfuERROR and model.status == Status.errVERIFY


def test_a_non_tolerant_device_is_reset_and_re_entered_for_the_read_back():
    model = device(manifestation_tolerant=False)
    _, log = flash(model)
    assert "not manifestation tolerant" in log and log.count("DFU_DETACH") == 2
    assert bytes(model.partitions[0].data) == BLOB


def test_a_device_left_in_dfu_error_is_cleared_first():
    model = device(start_in_dfu=True, faults=DfuFaults(start_in_error=True))
    _, log = flash(model)
    assert "device in dfuERROR (errUNKNOWN): CLRSTATUS" in log and "DFU_DETACH" not in log


def test_a_device_that_detaches_by_itself():
    model = device(will_detach=True)
    flash(model)
    assert bytes(model.partitions[0].data) == BLOB


def test_an_image_larger_than_the_partition_is_refused():
    model = device(partitions=(("bundle", 4096),))
    with pytest.raises(dfu.DfuError, match="download failed|errADDRESS"):
        flash(model)


def test_cli_usb_spec_and_flash_through_the_command(tmp_path, capsys):
    assert parse_usb_spec("1209:7c01") == (VID, PID, None)
    assert parse_usb_spec("1209:7c01,1") == (VID, PID, 1)
    assert parse_usb_spec("1209:7c01,bundle") == (VID, PID, "bundle")
    with pytest.raises(UsageError):
        parse_usb_spec("12097c01")
    from board.bundle import build, keygen, load_private_key
    from firmware.formats.bundle import EntryKind
    key, _ = keygen(tmp_path / "k")
    path = tmp_path / "b.tcb"
    path.write_bytes(build(load_private_key(key), [(EntryKind.CONFIG, "c.toml", b"x = 1\n")], "dfu-1"))
    model = device()
    _flash_usb(argparse.Namespace(usb="1209:7c01,bundle", bundle=str(path)), backend=DfuEmulatorBackend(model))
    assert bytes(model.partitions[0].data) == path.read_bytes()
    assert "read back and verified" in capsys.readouterr().out
    with pytest.raises(CommandFailed, match="no USB DFU device 1209:7c02"):
        _flash_usb(argparse.Namespace(usb="1209:7c02", bundle=str(path)), backend=DfuEmulatorBackend(model))
