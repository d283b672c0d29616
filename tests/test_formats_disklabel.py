"""Disk label: golden vector, the regions it defines, and bad input."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.formats import FormatError
from firmware.formats import disklabel as DL

P = bytes(range(16))
# disk 1 of pair 00..0f, serial QM00001, 256 MiB of data at 1 MiB, created at generation 3
GOLDEN_LABEL = bytes.fromhex(
    "54434449534b4c42" "0001" "0001" "00000000" "000102030405060708090a0b0c0d0e0f"
    "514d303030303100000000000000000000000000000000000000000000000000"
    "0000000000100000" "0000000010000000" "0000000000000003") + bytes(420) + bytes.fromhex("791a2968")
GOLDEN_FIELDS = dict(magic=DL.LABEL_MAGIC, version=1, disk_index=1, flags=0, pair_id=P,
                     serial=b"QM00001".ljust(32, b"\0"), data_offset_bytes=1 << 20,
                     data_size_bytes=256 << 20, created_generation=3, reserved=bytes(420))


def plain(value):
    return {k: v for k, v in value.items() if not k.startswith("_")}


def test_label_golden_build_parse_sizeof():
    assert DL.DiskLabel.sizeof() == DL.LABEL_SIZE_BYTES == len(GOLDEN_LABEL) == 512
    assert DL.build_disklabel(1, P, 256 << 20, b"QM00001", created_generation=3) == GOLDEN_LABEL
    label = DL.parse_disklabel_untrusted(GOLDEN_LABEL, "disk1.img offset 0")
    assert plain(label) == GOLDEN_FIELDS
    assert DL.label_serial(label) == "QM00001"
    assert DL.DiskLabel.build({"fields": {"value": GOLDEN_FIELDS}}) == GOLDEN_LABEL


def test_compiled_form_agrees():
    assert plain(DL.DiskLabel.compile().parse(GOLDEN_LABEL).fields.value) == GOLDEN_FIELDS


def test_regions():
    assert DL.RESERVATION_OFFSET_BYTES == 4096
    assert DL.RESERVATION_OFFSET_BYTES + DL.RESERVATION_SIZE_BYTES == DL.DATA_OFFSET_BYTES == 1 << 20


def test_label_followed_by_anything_parses():
    # The label sits in a 4 KiB slot; callers may pass the whole slot.
    assert DL.parse_disklabel_untrusted(GOLDEN_LABEL + b"\xee" * 3584).disk_index == 1


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:100], "512"),
    (lambda b: b"XX" + b[2:], "bad magic"),
    (lambda b: b[:20] + b"\x01" + b[21:], "checksum"),
    (lambda b: bytes(512), "bad magic"),
])
def test_bad_labels_refused_naming_where(mutate, message):
    with pytest.raises(FormatError, match=f"sdb offset 0: .*{message}"):
        DL.parse_disklabel_untrusted(mutate(GOLDEN_LABEL), "sdb offset 0")


def test_label_with_good_checksum_but_impossible_values_refused():
    fields = dict(GOLDEN_FIELDS)
    del fields["magic"]
    for bad, message in ((dict(version=2), "version"), (dict(data_offset_bytes=4096), "data offset"),
                         (dict(data_size_bytes=100), "data size")):
        label = DL.DiskLabel.build({"fields": {"value": dict(fields, **bad)}})
        with pytest.raises(FormatError, match=message):
            DL.parse_disklabel_untrusted(label)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_format_error(data):
    try:
        DL.parse_disklabel_untrusted(data, "fuzz")
    except FormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 511), st.integers(1, 255)), min_size=1, max_size=3))
def test_any_corruption_is_detected(flips):
    data = bytearray(GOLDEN_LABEL)
    for pos, xor in flips:
        data[pos] ^= xor
    if bytes(data) == GOLDEN_LABEL:
        return
    with pytest.raises(FormatError):
        DL.parse_disklabel_untrusted(data, "fuzz")
