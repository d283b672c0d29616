"""Inputs the fuzzers (fuzz/, `inv fuzz`) found crashing, fed to the code they crashed.

Each test is the crashing input, reduced, given to the real parser or engine;
it failed before the fix named in its docstring. The contract: parsers of
untrusted bytes raise FormatError and nothing else.
"""
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
    (tag,) = pair.ctrl[0].forwarded
    send_from_b(pair, M.MsgType.IO_REPLY, b"\x00", resource=M.Resource.HOST_IO, tag=tag,
                flags=F.FLAG_RESPONSE)
    assert pair.ctrl[0].stats["link_errors"] == 1
    assert pair.replies["r"] == (5, None), "the forwarded read fails with EIO at the reset"
