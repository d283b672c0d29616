"""Inputs the fuzzers (fuzz/, `inv fuzz`) found crashing, fed to the code they crashed.

Each test is the crashing input, reduced, given to the real parser or engine;
it failed before the fix named in its docstring. The contract: parsers of
untrusted bytes raise FormatError and nothing else.
"""
import base64

import pytest

from firmware.formats import FormatError
from firmware.formats import nvram as N


def test_commit_record_read_from_a_short_buffer_is_a_format_error():
    """read_commit_untrusted on bytes shorter than the commit area raised struct.error:
    CRC32C of nothing is 0, which "matched" the missing stored CRC."""
    with pytest.raises(FormatError):
        N.read_commit_untrusted(b"\n", 1)


# -- the link: messages from an authenticated partner ---------------------------

from firmware.formats import messages as M  # noqa: E402
from firmware.formats import frame as F  # noqa: E402
from fixtures.mempair import MemPair  # noqa: E402


def send_from_b(pair, msg_type, payload, resource=M.Resource.MIRROR, tag=0, flags=0):
    """Controller b's real link session sends a message (right sequence, ack and CRC) to a."""
    pair.ctrl[1].link.send(msg_type, resource, payload, lane=F.LANE_CONTROL, tag=tag, flags=flags)
    pair.wire[0].extend(F.split_frames(b"".join(bytes(b) for b in pair.ctrl[1].link.take_output())))
    pair.deliver()


@pytest.mark.parametrize("msg_type, payload, flags", [
    (M.MsgType.MIRROR_ACK, b"", F.FLAG_RESPONSE),          # found by the link fuzzer
    (M.MsgType.PONG, b"\x01", F.FLAG_RESPONSE),
    (M.MsgType.IO_REQUEST, b"\x00" * 7, 0),
])
def test_a_short_fixed_size_message_resets_the_link(msg_type, payload, flags):
    """A MIRROR_ACK (PONG, IO_REQUEST) body shorter than its struct raised struct.error out of
    link_frames; a malformed message is a protocol error: the session resets."""
    pair = MemPair(luns=2, lun_size=256 << 10, nvram_size=512 << 10)
    pair.connect()
    assert pair.ctrl[0].mirroring
    send_from_b(pair, msg_type, payload, resource=M.Resource.ADMIN, flags=flags)
    assert pair.ctrl[0].stats["link_errors"] == 1
    assert any(kind == "link_down" for kind, _ in pair.notes[0])


def test_a_short_io_reply_resets_the_link():
    """An IO_REPLY (to a forwarded read) shorter than its 4-byte error raised struct.error."""
    pair = MemPair(luns=2, lun_size=256 << 10, nvram_size=512 << 10)
    pair.connect()
    pair.ctrl[0].host_read("r", 1, 0, 4096)           # lun1 is b's: a forwards the read
    (tag,) = pair.ctrl[0].forwarder.inflight
    send_from_b(pair, M.MsgType.IO_REPLY, b"\x00", resource=M.Resource.HOST_IO, tag=tag,
                flags=F.FLAG_RESPONSE)
    assert pair.ctrl[0].stats["link_errors"] == 1
    assert pair.replies["r"] == (5, None), "the forwarded read fails with EIO at the reset"


# -- NVRAM recovery ----------------------------------------------------------------

from hal.sim.static import StaticController  # noqa: E402
from firmware.params import Params, format_nvram  # noqa: E402
from fixtures.mempair import KEY, PAIR_ID  # noqa: E402

LAYOUT = N.plan_layout(8 << 20, 4096, 0, bytes(range(16)))


@pytest.mark.parametrize("change", [
    {"primary_blocks": LAYOUT["primary_blocks"] + (1 << 24)},     # found by the nvram fuzzer
    {"mirror_desc_offset": LAYOUT["primary_desc_offset"]},         # the two descriptor tables overlap
    {"primary_data_offset": LAYOUT["mirror_desc_offset"]},         # data over descriptors
    {"primary_desc_offset": 0},                                    # descriptors over the superblock
    {"block_size_bytes": 4096 + 512},                              # not a power of two
], ids=lambda change: next(iter(change)))
def test_superblock_regions_must_fit_the_nvram_and_not_overlap(change):
    """A superblock (CRC intact) whose primary_blocks was 2^24 too large made recovery scan 16M
    descriptors past the end of the NVRAM (the fuzzer's timeout, 800 MB): the geometry check
    looked at the mirror data, log and bitmap ends only."""
    with pytest.raises(FormatError):
        N.parse_superblock_untrusted(N.build_superblock(dict(LAYOUT, **change)))


def test_controller_refuses_an_nvram_smaller_than_its_superblock_says():
    """The geometry is checked against nvram_size_bytes; an NVRAM mapped smaller than that
    was scanned past its end."""
    params = Params(0, PAIR_ID, [256 << 10] * 2)
    nv = bytearray(512 << 10)
    format_nvram(nv, params)
    sb = N.read_superblock_untrusted(nv)[0]
    fields = {k: v for k, v in sb.items() if not k.startswith("_") and k != "magic"}
    nv[:N.SUPERBLOCK_SIZE_BYTES] = N.build_superblock(dict(fields, nvram_size_bytes=1 << 30))
    with pytest.raises(FormatError, match="NVRAM"):
        StaticController(params, nv, KEY, 0)


def test_an_ownership_message_to_a_pair_without_fencing_resets_the_link():
    """With static ownership (fencing off) there is no fence table: an OWNERSHIP_REQUEST from the
    partner raised TypeError (len(None)) out of link_frames. Found by a seed of the link fuzzer."""
    pair = MemPair(luns=2, lun_size=256 << 10, nvram_size=512 << 10)
    pair.connect()
    body = M.build_body(M.MsgType.OWNERSHIP_REQUEST, lun=0, scope=0, reserved0=0, lba=0, generation=1,
                        reserved=bytes(8))
    send_from_b(pair, M.MsgType.OWNERSHIP_REQUEST, body, resource=M.Resource.OWNERSHIP)
    assert pair.ctrl[0].stats["link_errors"] == 1
    assert pair.ctrl[0].owns(0) and not pair.ctrl[1].owns(0)


def mirror_write_body(lun, ctx, seq, cache_id, fill=0x5A, block_size=4096):
    data = bytes([fill]) * block_size
    return (M.MIRROR_WRITE_HEAD.pack(lun, ctx, seq, 1, 1, 0, 1, 0, block_size)
            + M.MIRROR_BLOCK.pack(cache_id, 8, N.crc32c(data), b"\xff" * 16) + data)


def test_a_resync_mirror_write_for_a_lun_the_pair_does_not_have_resets_the_link():
    """With fencing on, a resync MIRROR_WRITE (CRC right) for lun2 of a 2-LUN pair was stored,
    then mirror_ours(2) indexed the fence table: IndexError out of link_frames. Found by the
    link fuzzer (a 20-minute run, 3 minutes in)."""
    pair = MemPair(luns=2, lun_size=256 << 10, nvram_size=512 << 10, fencing=True)
    pair.connect()
    pair.tick(10)
    body = mirror_write_body(2, M.CTX_FIRST | M.CTX_LAST | M.CTX_RESYNC, 9, 3)
    send_from_b(pair, M.MsgType.MIRROR_WRITE, body)
    assert pair.ctrl[0].stats["link_errors"] == 1
    assert pair.ctrl[0].mirror.blocks[3] is None, "nothing of the refused write was kept"


def test_a_superblock_with_no_cache_blocks_is_refused():
    """A superblock (CRC intact) with primary_blocks 0 was accepted; the recovered controller's
    first host write divided by the cache's capacity: ZeroDivisionError. Found by the nvram
    fuzzer. A segment has at least the 16 blocks plan_layout insists on."""
    for field in ("primary_blocks", "mirror_blocks"):
        with pytest.raises(FormatError):
            N.parse_superblock_untrusted(N.build_superblock(dict(LAYOUT, **{field: 0})))
        with pytest.raises(FormatError):
            N.parse_superblock_untrusted(N.build_superblock(dict(LAYOUT, **{field: N.BLOCKS_MIN - 1})))


def test_recovery_keeps_no_line_of_a_lun_the_pair_does_not_have():
    """Found by hand while writing the nvram target: an NVRAM from a pair with more LUNs (or a
    firmware bug) holds a dirty line of lun7; a 2-LUN controller recovered it and destaged it.
    Such an NVRAM is refused now: the line is acknowledged data, so it is neither dropped nor
    written to a LUN it does not belong to."""
    from fuzz import nvram as fuzz_nvram
    image, params, sb = fuzz_nvram.golden()
    img = bytearray(image)
    block = next(iter(StaticController(params, bytearray(image), KEY, 0).cache.lines.values())).block
    offset = sb.primary_desc_offset + block * N.DESC_SIZE_BYTES
    img[offset + 2:offset + 4] = (7).to_bytes(2, "big")                 # the descriptor's lun
    end = offset + N.DESC_SIZE_BYTES - 4
    img[end:end + 4] = N.crc32c(bytes(img[offset:end])).to_bytes(4, "big")
    with pytest.raises(FormatError, match=r"primary segment holds 1 dirty line\(s\) outside the configured "
                                          r"LUNs \(the first: lun7 .*the configuration has 2 LUNs"):
        StaticController(params, img, KEY, 0)


def test_an_nvram_whose_newest_sequence_number_is_the_largest_is_refused():
    """Found by the nvram fuzzer (11.8 minutes, 647,898 inputs): a descriptor resealed with
    sequence number 2^64 - 1 was recovered, and the first host write after it raised
    struct.error packing sequence number 2^64. No controller writes 2^64 times: such an NVRAM is
    refused at recovery, with the number named."""
    from fuzz import nvram as fuzz_nvram
    image, params, sb = fuzz_nvram.golden()
    img = bytearray(image)
    block = next(iter(StaticController(params, bytearray(image), KEY, 0).cache.lines.values())).block
    offset = sb.primary_desc_offset + block * N.DESC_SIZE_BYTES
    img[offset + 16:offset + 24] = ((1 << 64) - 1).to_bytes(8, "big")   # the descriptor's seq
    end = offset + N.DESC_SIZE_BYTES - 4
    img[end:end + 4] = N.crc32c(bytes(img[offset:end])).to_bytes(4, "big")
    with pytest.raises(FormatError, match="newest write sequence number is 18446744073709551615"):
        StaticController(params, img, KEY, 0)
    crash = base64.b64decode(                             # the fuzzer's own input
        "APUOiP8H6g7/////////////////////////////////////////////////////////////////////////////"
        "//////////////////////////////////////////////////////////////////////////////////////8A"
        "AABiYgc=")
    fuzz_nvram.one_input(crash)                           # refused at recovery now: no exception


@pytest.mark.parametrize("segment", [0, 1])
def test_an_nvram_whose_commit_counter_is_the_largest_is_refused(segment):
    """Found by the nvram fuzzer (12.8 minutes, 1,029,568 inputs): a commit record resealed with
    counter 2^64 - 1 was recovered, and the first host write after it raised struct.error
    packing counter 2^64. No controller commits 2^64 times: such an NVRAM is refused at
    recovery, with the segment and the counter named (either segment: the mirror's commits
    count the same way)."""
    from fuzz import nvram as fuzz_nvram
    image, params, sb = fuzz_nvram.golden()
    img = bytearray(image)
    counter, committed, _errors = N.read_commit_untrusted(img, segment)
    N.pack_commit_into(img, segment, N.COMMIT_COUNTER_MAX, committed)   # sealed, in the newer slot
    assert N.read_commit_untrusted(img, segment)[0] == N.COMMIT_COUNTER_MAX
    name = "mirror" if segment else "primary"
    with pytest.raises(FormatError, match=f"{name} commit record counter is 18446744073709551615"):
        StaticController(params, img, KEY, 0)
    img2 = bytearray(image)
    N.pack_commit_into(img2, segment, N.COMMIT_COUNTER_MAX - 1, committed)
    ctrl = StaticController(params, img2, KEY, 0)         # one below: recovered, and it writes on
    if segment == 0:
        ctrl.start()
        ctrl.host_write("w", 0, 0, b"x" * 4096)


def test_the_fuzzers_commit_counter_input_is_refused_at_recovery():
    from fuzz import nvram as fuzz_nvram
    crash = base64.b64decode(                             # the fuzzer's own input
        "Cf//////+////////wD/q0NOVlJBTTgAq0P///+FmP//BykAAP//////////////7wCIJycnJ5AnJyf///////8A"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA////AIiQJycnJydAACcnJycn+v8AAP8AiJAnJycnJyc=")
    fuzz_nvram.one_input(crash)                           # refused at recovery now: no exception
