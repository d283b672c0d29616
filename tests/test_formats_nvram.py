"""NVRAM layout: golden vectors for the superblock, descriptor and log headers; bad input.

A torn or corrupt superblock copy or descriptor must raise FormatError
naming where it is, never anything else, and never parse as data.
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.formats import FormatError
from firmware.formats import nvram as nv

P = bytes(range(16))
NVRAM_BYTES = 8 << 20

GOLDEN_SUPERBLOCK = bytes.fromhex(
    "54434e5652414d00000100010000000000000000000000010000000000000001"
    "000102030405060708090a0b0c0d0e0f00000000008000000000100002000040"
    "000003de000003de000000000001000000000000000200000000000000030000"
    "000000000040e00000000000007ec000000100000001000000000000007fc000"
    "0000000000001000" + "00" * 116 + "fe59f627")
GOLDEN_LAYOUT = dict(
    version=1, controller_id=0, peer_id=1, flags=0, generation=1, sb_seq=1, pair_id=P,
    nvram_size_bytes=NVRAM_BYTES, block_size_bytes=4096, sector_size_bytes=512, desc_size_bytes=64,
    primary_blocks=990, mirror_blocks=990, primary_desc_offset=0x10000, mirror_desc_offset=0x20000,
    primary_data_offset=0x30000, mirror_data_offset=0x40E000, log_offset=0x7EC000, log_partitions=1,
    reserved0=0, log_partition_bytes=0x10000, bitmap_offset=0x7FC000, bitmap_bytes=4096, reserved=bytes(116))

# DIRTY, lun 2, group 0/3, lba 0x1000, seq 42, generation 7, cache id 5, data crc 0xdeadbeef
GOLDEN_DESCRIPTOR = bytes.fromhex(
    "01000002000000030000000000001000000000000000002a0000000700000005"
    "deadbeef0f0000000000000000000000000000000000000000000000ef9406f2")
GOLDEN_DESC_FIELDS = dict(state=1, flags=0, lun=2, group_index=0, group_count=3, lba=0x1000, seq=42,
                          generation=7, cache_id=5, data_crc=0xDEADBEEF,
                          dirty_bitmap=b"\x0f" + bytes(15), reserved=bytes(8))
GOLDEN_FREE_DESCRIPTOR = bytes(60) + bytes.fromhex("5a0b0531")

GOLDEN_LOG_PARTITION = bytes.fromhex(
    "4c500001010000000000000000000064000000020000100000000000000000000000000000000000"
    "000000000000000000000000000000000000000011223344")
GOLDEN_LOG_ENTRY = bytes.fromhex("4c4500010000100000000000000000640000000000000008aabbccdd01020304")


def plain(value):
    return {k: v for k, v in value.items() if not k.startswith("_")}


def layout():
    return nv.plan_layout(NVRAM_BYTES, 4096, 0, P, log_partitions=1, log_partition_bytes=65536,
                          bitmap_bytes=4096)


def image_with(*slots) -> bytearray:
    image = bytearray(2 * nv.SB_SLOT_BYTES)
    for slot, fields in enumerate(slots):
        if fields is not None:
            offset = slot * nv.SB_SLOT_BYTES
            image[offset:offset + nv.SUPERBLOCK_SIZE_BYTES] = nv.build_superblock(fields)
    return image


def test_superblock_golden():
    assert len(GOLDEN_SUPERBLOCK) == nv.Superblock.sizeof() == nv.SUPERBLOCK_SIZE_BYTES == 256
    assert layout() == GOLDEN_LAYOUT
    assert nv.build_superblock(GOLDEN_LAYOUT) == GOLDEN_SUPERBLOCK
    assert plain(nv.parse_superblock_untrusted(GOLDEN_SUPERBLOCK)) == dict(GOLDEN_LAYOUT, magic=nv.SB_MAGIC)
    assert nv.SuperblockFields.compile().parse(GOLDEN_SUPERBLOCK).primary_blocks == 990


def test_geometry_from_golden_superblock():
    geometry = nv.Geometry(nv.parse_superblock_untrusted(GOLDEN_SUPERBLOCK))
    assert geometry.desc_offset(False, 3) == 0x10000 + 3 * 64
    assert geometry.desc_offset(True, 0) == 0x20000
    assert geometry.data_offset(True, 2) == 0x40E000 + 2 * 4096
    assert all(off % 4096 == 0 for off in (geometry.primary_data_offset, geometry.mirror_data_offset))


def test_newest_superblock_copy_wins():
    newer = dict(GOLDEN_LAYOUT, sb_seq=2, generation=5)
    sb, slot = nv.read_superblock_untrusted(image_with(GOLDEN_LAYOUT, newer), "nv.img")
    assert (slot, sb.generation) == (1, 5)


def test_torn_superblock_falls_back_to_the_other_copy():
    image = image_with(GOLDEN_LAYOUT, dict(GOLDEN_LAYOUT, sb_seq=2))
    image[4096 + 40] ^= 0x01                               # tear the newer copy
    sb, slot = nv.read_superblock_untrusted(image, "nv.img")
    assert (slot, sb.sb_seq) == (0, 1)
    image[40] ^= 0x01
    with pytest.raises(FormatError, match=r"nv.img.*offset 0.*offset 4096"):
        nv.read_superblock_untrusted(image, "nv.img")


def test_superblock_geometry_past_the_end_refused():
    with pytest.raises(FormatError, match="does not fit"):
        nv.parse_superblock_untrusted(nv.build_superblock(dict(GOLDEN_LAYOUT, nvram_size_bytes=1 << 20)))


def test_descriptor_golden_struct_twin():
    buf = bytearray(64)
    nv.pack_descriptor_into(buf, 0, 1, 2, 0, 3, 0x1000, 42, 7, 5, 0xDEADBEEF, b"\x0f" + bytes(15))
    assert bytes(buf) == GOLDEN_DESCRIPTOR
    assert nv.DESC_STRUCT.unpack_from(GOLDEN_DESCRIPTOR) == tuple(GOLDEN_DESC_FIELDS.values())


def test_descriptor_golden_construct():
    assert nv.Descriptor.sizeof() == nv.DESC_SIZE_BYTES == 64
    parsed = nv.Descriptor.parse(GOLDEN_DESCRIPTOR)
    assert plain(parsed.fields.value) == GOLDEN_DESC_FIELDS
    assert nv.Descriptor.build({"fields": {"value": GOLDEN_DESC_FIELDS}}) == GOLDEN_DESCRIPTOR


def test_parse_descriptor_golden():
    rec = nv.parse_descriptor_untrusted(b"\0" * 64 + GOLDEN_DESCRIPTOR, 64, "nv.img offset 64")
    assert (rec.state, rec.lun, rec.group_count, rec.lba, rec.seq, rec.cache_id) == (1, 2, 3, 0x1000, 42, 5)


def test_free_descriptor_golden():
    assert nv.FREE_DESCRIPTOR == GOLDEN_FREE_DESCRIPTOR
    assert nv.parse_descriptor_untrusted(GOLDEN_FREE_DESCRIPTOR).state == nv.BlockState.FREE


@pytest.mark.parametrize("offset", [0, 7, 31, 59, 60, 63])
def test_torn_descriptor_detected_with_where(offset):
    torn = bytearray(GOLDEN_DESCRIPTOR)
    torn[offset] ^= 0x40
    with pytest.raises(FormatError, match="nv.img offset 65600: descriptor CRC32C mismatch"):
        nv.parse_descriptor_untrusted(torn, 0, "nv.img offset 65600")


def test_impossible_descriptor_refused_even_with_good_crc():
    buf = bytearray(64)
    nv.pack_descriptor_into(buf, 0, 1, 0, 3, 3, 0, 0, 0, 0, 0, bytes(16))   # group 3 of 3
    with pytest.raises(FormatError, match="impossible"):
        nv.parse_descriptor_untrusted(buf)
    nv.pack_descriptor_into(buf, 0, 9, 0, 0, 1, 0, 0, 0, 0, 0, bytes(16))   # state 9
    with pytest.raises(FormatError, match="state 9"):
        nv.parse_descriptor_untrusted(buf)


def test_log_headers_golden():
    fields = dict(magic=nv.LOG_PARTITION_MAGIC, partition=1, state=1, reserved0=bytes(3), first_seq=100,
                  entries=2, used_bytes=4096, reserved=bytes(36), crc=0x11223344)
    assert nv.LogPartitionHeader.build(fields) == GOLDEN_LOG_PARTITION
    assert plain(nv.LogPartitionHeader.parse(GOLDEN_LOG_PARTITION)) == fields
    entry = dict(magic=nv.LOG_ENTRY_MAGIC, lun=1, length=4096, seq=100, lba=8, data_crc=0xAABBCCDD,
                 hdr_crc=0x01020304)
    assert nv.LogEntryHeader.build(entry) == GOLDEN_LOG_ENTRY
    assert plain(nv.LogEntryHeader.parse(GOLDEN_LOG_ENTRY)) == entry
    assert nv.LogPartitionHeader.sizeof() == 64 and nv.LogEntryHeader.sizeof() == 32


def test_log_partition_twin_agrees_with_construct():
    """The log's hot-path twin (pack/parse_log_partition) and the declaration say the same bytes."""
    packed = nv.pack_log_partition(1, 1, 100, 2, 4096)
    fields = plain(nv.LogPartitionHeader.parse(packed))
    assert (fields["partition"], fields["state"], fields["first_seq"], fields["entries"], fields["used_bytes"]) \
        == (1, 1, 100, 2, 4096)
    assert fields["crc"] == nv.crc32c(packed[:60])
    assert packed[:60] == GOLDEN_LOG_PARTITION[:60]
    assert nv.parse_log_partition_untrusted(packed) == (1, 1, 100, 2, 4096)
    torn = bytearray(packed)
    torn[20] ^= 1
    assert nv.parse_log_partition_untrusted(torn) is None
    assert nv.parse_log_partition_untrusted(nv.pack_log_partition(1, 4, 100, 2, 4096)) is None   # no such state
    assert nv.parse_log_partition_untrusted(bytes(64)) is None


def test_plan_layout_refuses_bad_geometry():
    with pytest.raises(ValueError, match="power of two"):
        nv.plan_layout(NVRAM_BYTES, 3072, 0, P)
    with pytest.raises(ValueError, match="too small"):
        nv.plan_layout(128 << 10, 4096, 0, P, log_partitions=1, log_partition_bytes=4096,
                       bitmap_bytes=4096)


u8, u16, u32, u64 = (st.integers(0, (1 << b) - 1) for b in (8, 16, 32, 64))


@settings(max_examples=200, deadline=None)
@given(state=st.integers(0, 2), flags=u8, lun=u16, gi=u16, gc=u16, lba=u64, seq=u64, gen=u32,
       cache_id=u32, crc=u32, bitmap=st.binary(min_size=16, max_size=16))
def test_descriptor_twin_agrees_with_construct(state, flags, lun, gi, gc, lba, seq, gen, cache_id, crc, bitmap):
    buf = bytearray(64)
    nv.pack_descriptor_into(buf, 0, state, lun, gi, gc, lba, seq, gen, cache_id, crc, bitmap, flags=flags)
    fields = dict(state=state, flags=flags, lun=lun, group_index=gi, group_count=gc, lba=lba, seq=seq,
                  generation=gen, cache_id=cache_id, data_crc=crc, dirty_bitmap=bitmap, reserved=bytes(8))
    assert nv.Descriptor.build({"fields": {"value": fields}}) == bytes(buf)
    assert plain(nv.Descriptor.parse(bytes(buf)).fields.value) == fields


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_into_superblock_and_descriptor_parsers(data):
    for parse in (nv.parse_superblock_untrusted, nv.parse_descriptor_untrusted):
        try:
            parse(data)
        except FormatError:
            pass


@settings(max_examples=200, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 255), st.integers(1, 255)), min_size=1, max_size=4))
def test_mutated_superblock_raises_only_format_error(flips):
    data = bytearray(GOLDEN_SUPERBLOCK)
    for pos, xor in flips:
        data[pos] ^= xor
    image = bytearray(2 * nv.SB_SLOT_BYTES)
    image[:256] = data
    try:
        nv.read_superblock_untrusted(image, "fuzz")
    except FormatError:
        pass


@settings(max_examples=100, deadline=None)
@given(fields=st.fixed_dictionaries(dict(
    nvram_size_bytes=u64, block_size_bytes=u32, primary_blocks=u32, mirror_blocks=u32,
    mirror_data_offset=u64, log_offset=u64, log_partitions=u16, log_partition_bytes=u32,
    bitmap_offset=u64, bitmap_bytes=u64, version=u16, desc_size_bytes=u16)))
def test_superblock_with_good_crc_but_wild_geometry(fields):
    # A checksum proves nothing against a buggy or hostile writer: the geometry is checked too.
    try:
        nv.parse_superblock_untrusted(nv.build_superblock(dict(GOLDEN_LAYOUT, **fields)))
    except FormatError:
        pass
