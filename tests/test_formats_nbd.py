"""NBD structured replies and metadata contexts (firmware/formats/nbd.py): golden vectors and twins.

Each vector is written out in hex from the NBD spec's layouts, so a change to
any declaration fails here; the struct twins the host port packs with must
agree with the declarations on random values.
"""
import random

import pytest
from construct.core import ConstructError

from firmware.formats import FormatError
from firmware.formats import messages as M
from firmware.formats import nbd as W

VECTORS = {
    "STRUCTURED_REPLY_HEAD": (      # an OFFSET_DATA chunk, DONE, cookie 7, 8 + 4096 payload bytes
        W.STRUCTURED_REPLY_HEAD, dict(flags=1, type=1, cookie=7, length=4104),
        "668e33ef" "0001" "0001" "0000000000000007" "00001008"),
    "OFFSET_DATA_HEAD": (W.OFFSET_DATA_HEAD, dict(offset=0x100000), "0000000000100000"),
    "OFFSET_HOLE": (W.OFFSET_HOLE, dict(offset=0x200000, hole_size=65536), "0000000000200000" "00010000"),
    "ERROR_CHUNK": (W.ERROR_CHUNK, dict(error=22, message="bad"), "00000016" "0003" "626164"),
    "BLOCK_STATUS": (               # context 1: 1 MiB hole+zero, then 64 KiB data
        W.BLOCK_STATUS, dict(context_id=1, descriptors=[dict(length=1 << 20, status=3),
                                                        dict(length=65536, status=0)]),
        "00000001" "00100000" "00000003" "00010000" "00000000"),
    "META_CONTEXT_REQUEST": (
        W.META_CONTEXT_REQUEST, dict(export_name="lun0", queries=["base:allocation"]),
        "00000004" "6c756e30" "00000001" "0000000f" "626173653a616c6c6f636174696f6e"),
    "META_CONTEXT_REPLY": (
        W.META_CONTEXT_REPLY, dict(context_id=1, name="base:allocation"),
        "00000001" "626173653a616c6c6f636174696f6e"),
    "INFO_BLOCK_SIZE": (            # 512 / 4 KiB / 4 MiB
        W.INFO_BLOCK_SIZE, dict(minimum_bytes=512, preferred_bytes=4096, maximum_bytes=4 << 20),
        "0003" "00000200" "00001000" "00400000"),
    "BlockRuns (link)": (
        M.BlockRuns, [dict(length=4096, status=0), dict(length=8192, status=3)],
        "00001000" "00000000" "00002000" "00000003"),
}


def plain(value):
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_golden_build_and_parse(name):
    fmt, fields, golden = VECTORS[name]
    raw = bytes.fromhex(golden)
    assert fmt.build(fields) == raw
    parsed = plain(fmt.parse(raw))
    if isinstance(fields, dict):
        assert {k: parsed[k] for k in fields} == fields
    else:
        assert parsed == fields


@pytest.mark.parametrize("fmt, size", [(W.STRUCTURED_REPLY_HEAD, 20), (W.OFFSET_DATA_HEAD, 8),
                                       (W.OFFSET_HOLE, 12), (W.BLOCK_DESCRIPTOR, 8), (W.INFO_BLOCK_SIZE, 14)])
def test_fixed_sizes(fmt, size):
    assert fmt.sizeof() == size


def test_magic_is_checked():
    raw = bytearray.fromhex(VECTORS["STRUCTURED_REPLY_HEAD"][2])
    raw[0] ^= 1
    with pytest.raises(ConstructError):
        W.STRUCTURED_REPLY_HEAD.parse(bytes(raw))


def test_struct_twins_agree_with_the_declarations():
    rng = random.Random(15)
    for _ in range(200):
        flags, typ, cookie, length = rng.getrandbits(16), rng.getrandbits(16), rng.getrandbits(64), rng.getrandbits(32)
        head = dict(flags=flags, type=typ, cookie=cookie, length=length)
        assert W.STRUCTURED_REPLY_HEAD_STRUCT.pack(W.STRUCTURED_REPLY_MAGIC, flags, typ, cookie, length) \
            == W.STRUCTURED_REPLY_HEAD.build(head)
        offset = rng.getrandbits(64)
        assert W.OFFSET_DATA_CHUNK_HEAD_STRUCT.pack(W.STRUCTURED_REPLY_MAGIC, flags, typ, cookie, length, offset) \
            == W.STRUCTURED_REPLY_HEAD.build(head) + W.OFFSET_DATA_HEAD.build(dict(offset=offset))
        error = rng.getrandbits(32)
        assert W.ERROR_CHUNK_STRUCT.pack(W.STRUCTURED_REPLY_MAGIC, flags, typ, cookie, length, error, 0) \
            == W.STRUCTURED_REPLY_HEAD.build(head) + W.ERROR_CHUNK.build(dict(error=error, message=""))
        sizes = [rng.getrandbits(32) for _ in range(3)]
        assert W.INFO_BLOCK_SIZE_STRUCT.pack(3, *sizes) == W.INFO_BLOCK_SIZE.build(
            dict(minimum_bytes=sizes[0], preferred_bytes=sizes[1], maximum_bytes=sizes[2]))
        runs = [(rng.randrange(1, 1 << 32), rng.getrandbits(32)) for _ in range(rng.randrange(1, 5))]
        assert M.pack_block_runs(runs) == M.BlockRuns.build([dict(length=n, status=s) for n, s in runs])


def test_meta_context_request_parses_the_golden_vector():
    raw = bytes.fromhex(VECTORS["META_CONTEXT_REQUEST"][2])
    assert W.parse_meta_context_request_untrusted(raw) == ("lun0", ["base:allocation"])
    assert W.parse_meta_context_request_untrusted(bytes.fromhex("00000000" "00000000")) == ("", [])


@pytest.mark.parametrize("raw", [
    "",                                     # nothing
    "00000004" "6c756e",                    # export name cut short
    "00000004" "6c756e30",                  # no query count
    "00000004" "6c756e30" "00000002" "00000001" "61",           # two queries promised, one sent
    "00000004" "6c756e30" "00000000" "00",  # a byte after the queries
    "00000002" "ff fe" "00000000",          # not UTF-8
    "00000001" "00" "00000000",             # NUL in the name
    "00000000" "ffffffff",                  # four billion queries
])
def test_bad_meta_context_requests_raise_format_error_only(raw):
    with pytest.raises(FormatError):
        W.parse_meta_context_request_untrusted(bytes.fromhex(raw.replace(" ", "")))


@pytest.mark.parametrize("raw, length", [
    ("", 4096),                             # no run
    ("00001000" "000000", 4096),            # not whole runs
    ("00000000" "00000000", 4096),          # an empty run
    ("00001000" "00000000" "00001000" "00000003", 4096),     # more than the range
])
def test_bad_block_runs_from_the_link_raise_format_error(raw, length):
    with pytest.raises(FormatError):
        M.parse_block_runs_untrusted(bytes.fromhex(raw), length)


def test_block_runs_round_trip_and_bound():
    runs = [(512, 3)] * (M.BLOCK_RUNS_MAX + 5)
    packed = M.pack_block_runs(runs)
    assert len(packed) == 8 * M.BLOCK_RUNS_MAX
    assert M.parse_block_runs_untrusted(packed, 512 * M.BLOCK_RUNS_MAX) == runs[:M.BLOCK_RUNS_MAX]
