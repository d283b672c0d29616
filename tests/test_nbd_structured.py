"""Structured replies, metadata contexts and BLOCK_STATUS in the NBD engine (hal/nbd*.py), without I/O.

Golden bytes for every reply the negotiation and the transmission phase produce
once a client asks for NBD_OPT_STRUCTURED_REPLY, and the rules around them: the
simple path is untouched without it, contexts need structured replies, the
selection holds only for its export, STARTTLS forgets what was negotiated.
"""
import struct

import pytest

from firmware.formats import nbd as W
from hal.host import nbd
from hal.host.nbd import NbdConnection
from hal.host.nbd_structured import BLOCK_STATUS_DESCRIPTORS_MAX

from test_nbd_protocol import EXPORTS, error_chunk, feed, go_data, option, request, simple_reply

MiB = 1 << 20
REP = "0003e889045565a9"                    # option reply magic, hex


def meta_data(export, *queries):
    return W.META_CONTEXT_REQUEST.build(dict(export_name=export, queries=list(queries)))


def structured_conn(export="lun0", meta_export="lun0", queries=("base:allocation",)):
    conn = NbdConnection(EXPORTS)
    hello = struct.pack(">I", 3) + option(nbd.NBD_OPT_STRUCTURED_REPLY)
    if meta_export is not None:
        hello += option(nbd.NBD_OPT_SET_META_CONTEXT, meta_data(meta_export, *queries))
    feed(conn, hello + option(nbd.NBD_OPT_GO, go_data(export)))
    assert conn.export.name == export
    return conn


def chunk(flags, typ, cookie, payload=b""):
    return struct.pack(">IHHQI", 0x668E33EF, flags, typ, cookie, len(payload)) + payload


def test_structured_reply_is_acknowledged_golden_bytes():
    conn = NbdConnection(EXPORTS)
    conn.pending_output()
    _, out = feed(conn, struct.pack(">I", 3) + option(nbd.NBD_OPT_STRUCTURED_REPLY))
    assert out.hex() == REP + "00000008" "00000001" "00000000"
    assert conn.structured


def test_structured_reply_with_data_is_invalid():
    conn = NbdConnection(EXPORTS)
    conn.pending_output()
    _, out = feed(conn, struct.pack(">I", 3) + option(nbd.NBD_OPT_STRUCTURED_REPLY, b"x"))
    assert out[8:16].hex() == "00000008" "80000003" and not conn.structured


def test_transmission_flags_carry_df_only_with_structured_replies():
    for structured, flags in ((False, 0x016D), (True, 0x01ED)):
        conn = NbdConnection(EXPORTS)
        conn.pending_output()
        hello = struct.pack(">I", 3) + (option(nbd.NBD_OPT_STRUCTURED_REPLY) if structured else b"")
        _, out = feed(conn, hello + option(nbd.NBD_OPT_GO, go_data("lun0")))
        info = REP + "00000007" "00000003" "0000000c" "0000" "0000000004000000" + f"{flags:04x}"
        assert info in out.hex()


def test_read_is_one_offset_data_chunk_flagged_done():
    conn = structured_conn()
    reqs, _ = feed(conn, request(nbd.NBD_CMD_READ, 9, 4096, 512, flags=nbd.NBD_CMD_FLAG_DF))
    unsent = conn.unsent_bytes
    conn.reply(reqs[0][0], data=b"\xab" * 512)
    out = b"".join(bytes(b) for b in conn.pending_output())
    assert out == bytes.fromhex("668e33ef" "0001" "0001" "0000000000000009" "00000208"
                                "0000000000001000") + b"\xab" * 512
    assert conn.read_bytes_owed == 0 and conn.unsent_bytes - unsent == len(out)


def test_errors_are_error_chunks_and_other_successes_simple_replies():
    conn = structured_conn()
    reqs, out = feed(conn, request(nbd.NBD_CMD_READ, 1, 0, 512) + request(nbd.NBD_CMD_WRITE, 2, 0, 512,
                                                                           data=b"w" * 512)
                     + request(nbd.NBD_CMD_FLUSH, 3) + request(nbd.NBD_CMD_READ, 4, 100 * MiB, 512))
    assert out == error_chunk(nbd.NBD_EINVAL, 4)           # refused here: beyond the end
    conn.reply(reqs[0][0], error=nbd.NBD_EIO)
    conn.reply(reqs[1][0])
    conn.reply(reqs[2][0])
    out = b"".join(bytes(b) for b in conn.pending_output())
    assert out == (bytes.fromhex("668e33ef" "0001" "8001" "0000000000000001" "00000006" "00000005" "0000")
                   + simple_reply(0, 2) + simple_reply(0, 3))


def test_empty_read_is_a_none_chunk():
    conn = structured_conn()
    _, out = feed(conn, request(nbd.NBD_CMD_READ, 5, 0, 0))
    assert out.hex() == "668e33ef" "0001" "0000" "0000000000000005" "00000000"


def test_without_negotiation_replies_stay_simple_and_df_is_refused():
    conn = NbdConnection(EXPORTS)
    feed(conn, struct.pack(">I", 3) + option(nbd.NBD_OPT_GO, go_data("lun0")))
    conn.pending_output()
    reqs, out = feed(conn, request(nbd.NBD_CMD_READ, 1, 0, 512, flags=nbd.NBD_CMD_FLAG_DF)
                     + request(nbd.NBD_CMD_BLOCK_STATUS, 2, 0, 512) + request(nbd.NBD_CMD_READ, 3, 0, 512))
    assert out == simple_reply(nbd.NBD_EINVAL, 1) + simple_reply(nbd.NBD_EINVAL, 2)
    conn.reply(reqs[0][0], data=b"r" * 512)
    assert b"".join(bytes(b) for b in conn.pending_output()) == simple_reply(0, 3) + b"r" * 512
    assert "reply" not in vars(conn)        # the simple path is the class's own method


def test_set_meta_context_golden_bytes():
    conn = NbdConnection(EXPORTS)
    conn.pending_output()
    hello = struct.pack(">I", 3) + option(nbd.NBD_OPT_STRUCTURED_REPLY)
    feed(conn, hello)
    _, out = feed(conn, option(nbd.NBD_OPT_SET_META_CONTEXT, meta_data("lun0", "x-other:thing", "base:allocation")))
    assert out.hex() == (REP + "0000000a" "00000004" "00000013" "00000001" "626173653a616c6c6f636174696f6e"
                         + REP + "0000000a" "00000001" "00000000")


@pytest.mark.parametrize("queries, listed", [((), True), (("base:",), True), (("base:allocation",), True),
                                             (("base:other",), False), (("qemu:dirty-bitmap:x",), False)])
def test_list_meta_context(queries, listed):
    conn = NbdConnection(EXPORTS)
    feed(conn, struct.pack(">I", 3) + option(nbd.NBD_OPT_STRUCTURED_REPLY))
    conn.pending_output()
    _, out = feed(conn, option(nbd.NBD_OPT_LIST_META_CONTEXT, meta_data("lun0", *queries)))
    context = REP + "00000009" "00000004" "00000013" "00000000" "626173653a616c6c6f636174696f6e"
    assert out.hex() == (context if listed else "") + REP + "00000009" "00000001" "00000000"
    assert conn.meta_export is None         # listing selects nothing


@pytest.mark.parametrize("opt", [nbd.NBD_OPT_SET_META_CONTEXT, nbd.NBD_OPT_LIST_META_CONTEXT])
def test_meta_context_needs_structured_replies_and_good_data(opt):
    conn = NbdConnection(EXPORTS)
    conn.pending_output()
    _, out = feed(conn, struct.pack(">I", 3) + option(opt, meta_data("lun0", "base:allocation")))
    assert out[12:16].hex() == "80000003"   # NBD_REP_ERR_INVALID
    _, out = feed(conn, option(nbd.NBD_OPT_STRUCTURED_REPLY) + option(opt, b"\0\0\0\x09lun0"))
    assert out[20 + 12:20 + 16].hex() == "80000003"
    _, out = feed(conn, option(opt, meta_data("nope", "base:allocation")))
    assert out[12:16].hex() == "80000006"   # NBD_REP_ERR_UNKNOWN
    assert conn.meta_export is None and conn.want_read


def block_status(conn, cookie, offset, length, flags=0):
    reqs, out = feed(conn, request(nbd.NBD_CMD_BLOCK_STATUS, cookie, offset, length, flags))
    return [r for r, _ in reqs], out


def test_block_status_reply_golden_bytes():
    conn = structured_conn()
    reqs, out = block_status(conn, 0x42, 0, 2 * MiB)
    assert out == b"" and reqs[0].length == 2 * MiB
    conn.reply(reqs[0], data=[(MiB, 3), (65536, 0), (MiB - 65536, 3)])
    assert b"".join(conn.pending_output()).hex() == (
        "668e33ef" "0001" "0005" "0000000000000042" "0000001c" "00000001"
        "00100000" "00000003" "00010000" "00000000" "000f0000" "00000003")


def test_block_status_req_one_joins_and_bounds():
    conn = structured_conn()
    reqs, _ = block_status(conn, 1, 0, MiB, flags=nbd.NBD_CMD_FLAG_REQ_ONE)
    conn.reply(reqs[0], data=[(4096, 0), (4096, 0), (8192, 3)])
    assert b"".join(conn.pending_output()) == chunk(1, 5, 1, struct.pack(">III", 1, 8192, 0))
    reqs, _ = block_status(conn, 2, 0, 4096)
    conn.reply(reqs[0], data=[(MiB, 3)])    # longer than asked: cut to the request
    assert b"".join(conn.pending_output()) == chunk(1, 5, 2, struct.pack(">III", 1, 4096, 3))
    reqs, _ = block_status(conn, 3, 0, 64 * MiB)
    conn.reply(reqs[0], data=[(512, i & 1) for i in range(3 * BLOCK_STATUS_DESCRIPTORS_MAX)])
    out = b"".join(conn.pending_output())
    assert len(out) == 20 + 4 + 8 * BLOCK_STATUS_DESCRIPTORS_MAX


def test_block_status_refusals():
    conn = structured_conn()
    _, out = block_status(conn, 1, 0, 0)
    assert out == error_chunk(nbd.NBD_EINVAL, 1)                 # empty: nothing to describe
    _, out = block_status(conn, 2, 64 * MiB - 512, 1024)
    assert out == error_chunk(nbd.NBD_EINVAL, 2)                 # beyond the end
    _, out = block_status(conn, 3, 100, 512)
    assert out == error_chunk(nbd.NBD_EINVAL, 3)                 # not 512-aligned
    _, out = block_status(conn, 4, 0, 512, flags=nbd.NBD_CMD_FLAG_DF)
    assert out == error_chunk(nbd.NBD_EINVAL, 4)                 # DF is a READ flag
    reqs, out = block_status(conn, 5, 0, 0xFFFFFE00)
    assert out == error_chunk(nbd.NBD_EINVAL, 5)                 # 4 GiB on a 64 MiB export


@pytest.mark.parametrize("meta_export, queries", [("lun1", ("base:allocation",)), ("lun0", ("base:other",)),
                                                  (None, ())])
def test_block_status_needs_the_context_selected_for_this_export(meta_export, queries):
    conn = structured_conn("lun0", meta_export, queries)
    _, out = block_status(conn, 7, 0, 4096)
    assert out == error_chunk(nbd.NBD_EINVAL, 7)


def test_set_meta_context_replaces_the_selection():
    conn = NbdConnection(EXPORTS)
    feed(conn, struct.pack(">I", 3) + option(nbd.NBD_OPT_STRUCTURED_REPLY)
         + option(nbd.NBD_OPT_SET_META_CONTEXT, meta_data("lun0", "base:allocation"))
         + option(nbd.NBD_OPT_SET_META_CONTEXT, meta_data("lun0")) + option(nbd.NBD_OPT_GO, go_data("lun0")))
    _, out = block_status(conn, 8, 0, 4096)
    assert out.endswith(error_chunk(nbd.NBD_EINVAL, 8))


def test_starttls_forgets_structured_replies_negotiated_in_the_clear():
    conn = NbdConnection(EXPORTS, tls="allow")
    feed(conn, struct.pack(">I", 3) + option(nbd.NBD_OPT_STRUCTURED_REPLY)
         + option(nbd.NBD_OPT_SET_META_CONTEXT, meta_data("lun0", "base:allocation"))
         + option(nbd.NBD_OPT_STARTTLS))
    assert conn.starttls and conn.structured
    conn.tls_leftover()
    conn.tls_started()
    assert not conn.structured and conn.meta_export is None and "reply" not in vars(conn)
    feed(conn, option(nbd.NBD_OPT_GO, go_data("lun0")))
    conn.pending_output()
    reqs, out = feed(conn, request(nbd.NBD_CMD_READ, 1, 0, 512) + request(nbd.NBD_CMD_BLOCK_STATUS, 2, 0, 512))
    assert out == simple_reply(nbd.NBD_EINVAL, 2)
    conn.reply(reqs[0][0], data=b"s" * 512)
    assert b"".join(bytes(b) for b in conn.pending_output()) == simple_reply(0, 1) + b"s" * 512


def test_block_size_info_is_the_declared_layout():
    conn = NbdConnection(EXPORTS)
    conn.pending_output()
    _, out = feed(conn, struct.pack(">I", 3) + option(nbd.NBD_OPT_INFO, go_data("lun0", [nbd.NBD_INFO_BLOCK_SIZE])))
    info = W.INFO_BLOCK_SIZE.build(dict(minimum_bytes=512, preferred_bytes=4096, maximum_bytes=4 * MiB))
    assert (bytes.fromhex(REP) + struct.pack(">III", nbd.NBD_OPT_INFO, nbd.NBD_REP_INFO, 14) + info) in out


def test_disc_after_structured_replies_closes_once_replied():
    conn = structured_conn()
    reqs, _ = feed(conn, request(nbd.NBD_CMD_READ, 1, 0, 512) + request(nbd.NBD_CMD_DISC, 2))
    assert not conn.closed
    conn.reply(reqs[0][0], data=b"d" * 512)
    assert conn.closed and conn.close_reason == "client sent NBD_CMD_DISC"
