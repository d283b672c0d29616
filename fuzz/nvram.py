"""Fuzz target `nvram`: a controller recovers from a corrupted NVRAM image.

The golden image is real: an in-memory pair (fixtures.mempair) whose
controller a holds dirty lines of single- and multi-block writes in its
primary segment and b's lines in its mirror segment, crashed before any
destage, with one write not yet acknowledged by the mirror. Each input mutates a copy: bytes flipped, written, zeroed or copied
(a misdirected write) anywhere or in a chosen region (superblock, commit
records, a descriptor, a data block); then, by its last byte, the superblock,
descriptor and commit checksums are recomputed ("sealed") or not, so the
fuzzer also reaches what lies behind them (records that are well-formed but
wrong, as a firmware bug would write them).

Then controller a boots on it. FormatError (no usable superblock, NVRAM of
another controller or geometry) is the one documented refusal. Otherwise
recovery must never yield data that fails its checksum (the format's
guarantee: torn or corrupt blocks are reported and never returned): every
line in the cache and every block in the mirror view must have a descriptor
that parses, names that line, and whose data CRC32C matches the block. The
recovered controller must then take a host write and a tick.
"""
from hal.sim.static import StaticController  # recovery, then the write path at once
from firmware.formats import FormatError
from firmware.formats import nvram as N
from fixtures.mempair import KEY, MemPair

from .reader import Reader

_golden = None


def _build_golden():
    pair = MemPair(luns=2, lun_size=256 << 10, nvram_size=512 << 10)
    pair.connect()
    for n in range(6):
        pair.write(0, f"a{n}", 0, n * 8192, bytes([n + 1]) * (4096 * (1 + n % 3)))
        pair.write(1, f"b{n}", 1, n * 4096, bytes([0x80 + n]) * 4096)
        pair.deliver()
    pair.write(0, "over", 0, 0, b"\xee" * 512)             # a partial rewrite of a line
    pair.deliver()
    pair.write(0, "unacked", 0, 64 << 10, b"\x55" * 8192)  # its mirror copy still on the wire
    image = bytes(pair.nv[0])
    sb, _slot = N.read_superblock_untrusted(image)
    return image, pair.params[0], sb


def golden():
    global _golden
    if _golden is None:
        _golden = _build_golden()
    return _golden


def _regions(sb):
    """(offset, size) of the places worth aiming at."""
    return [(0, N.SUPERBLOCK_SIZE_BYTES), (N.SB_SLOT_BYTES, N.SUPERBLOCK_SIZE_BYTES),
            (N.COMMIT_AREA_OFFSET, 4 * N.COMMIT_SLOT_BYTES),
            (sb.primary_desc_offset, sb.primary_blocks * N.DESC_SIZE_BYTES),
            (sb.mirror_desc_offset, sb.mirror_blocks * N.DESC_SIZE_BYTES),
            (sb.primary_data_offset, 16 * sb.block_size_bytes),
            (sb.mirror_data_offset, 16 * sb.block_size_bytes)]


def _mutate(img, r, sb):
    regions = _regions(sb)
    for _ in range(r.u8() % 16 + 1):
        op, where = r.u8(), r.u32()
        if op & 0x80:
            base, size = regions[(op >> 3) % len(regions)]
            at = base + where % size
        else:
            at = where % len(img)
        kind = op % 4
        if kind == 0:
            img[at] ^= r.u8() or 1
        elif kind == 1:
            blob = r.blob(64)
            img[at:at + len(blob)] = blob[:len(img) - at]
        elif kind == 2:
            n = min(r.u16() % 4097, len(img) - at)
            img[at:at + n] = bytes(n)
        else:
            src, n = r.u32() % len(img), r.u16() % 4097
            n = min(n, len(img) - src, len(img) - at)
            img[at:at + n] = img[src:src + n]


def _seal_record(img, offset, size):
    end = offset + size - 4
    if 0 <= offset and end + 4 <= len(img) and any(img[offset:end]):
        img[end:end + 4] = N.crc32c(bytes(img[offset:end])).to_bytes(4, "big")


def _seal(img, flags, sb):
    if flags & 1:
        for slot in range(N.SB_SLOTS):
            _seal_record(img, slot * N.SB_SLOT_BYTES, N.SUPERBLOCK_SIZE_BYTES)
    if flags & 2:
        for base, count in ((sb.primary_desc_offset, sb.primary_blocks), (sb.mirror_desc_offset, sb.mirror_blocks)):
            for i in range(count):
                _seal_record(img, base + i * N.DESC_SIZE_BYTES, N.DESC_SIZE_BYTES)
    if flags & 4:
        for segment in range(2):
            for slot in range(2):
                _seal_record(img, N.commit_slot_offset(segment, slot), N.COMMIT_SLOT_BYTES)


def _check_block(img, segment, index, lun, lba, what):
    assert 0 <= index < segment.blocks, f"{what}: block {index} outside the segment"
    offset = segment.desc_base + index * N.DESC_SIZE_BYTES
    try:
        rec = N.parse_descriptor_untrusted(img, offset)
    except FormatError as exc:
        raise AssertionError(f"{what}: recovered block {index} has no valid descriptor: {exc}") from None
    assert rec.state != N.BlockState.FREE, f"{what}: recovered block {index} is FREE in NVRAM"
    assert (rec.lun, rec.lba, rec.cache_id) == (lun, lba, index), f"{what}: block {index} descriptor names another line"
    assert N.crc32c(bytes(segment.data(index))) == rec.data_crc, \
        f"{what}: recovered block {index} fails its data CRC32C (corrupt data served as valid)"


def check_recovered(ctrl, img):
    sizes = ctrl.params.lun_sizes
    for line in ctrl.cache.lines.values():
        assert line.lun < len(sizes) and (line.lba << 9) < sizes[line.lun], \
            f"primary: recovered a line of lun{line.lun} sector {line.lba}, outside the configured LUNs"
        _check_block(img, ctrl.primary, line.block, line.lun, line.lba, "primary")
    mirror = ctrl.mirror
    for key, index in mirror.view.items():
        block = mirror.blocks[index]
        assert block is not None and block.key == key, f"mirror view names block {index}, which holds nothing"
        assert block.lun < len(sizes) and (block.lba << 9) < sizes[block.lun], \
            f"mirror: recovered a line of lun{block.lun} sector {block.lba}, outside the configured LUNs"
        _check_block(img, mirror.segment, index, block.lun, block.lba, "mirror")


def one_input(data: bytes) -> None:
    image, params, sb = golden()
    img = bytearray(image)
    r = Reader(data)
    _mutate(img, r, sb)
    _seal(img, r.u8(), sb)
    try:
        ctrl = StaticController(params, img, KEY, 0)
    except FormatError:
        return
    ctrl.start()
    check_recovered(ctrl, img)
    ctrl.host_write("fuzz", 0, 4096, b"\x77" * 8192)
    ctrl.tick(10)
