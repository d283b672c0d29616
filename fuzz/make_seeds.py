"""Write the seed corpora, fuzz/seeds/<target>/, from the tests' golden vectors.

`python -m fuzz.make_seeds` (from the repository root) rewrites them; they are
committed, small, and every one must run without a crash (tests/test_fuzz.py).
Each seed is a valid input in the target's input format (see each target's
docstring): the fuzzer starts from real messages, not from nothing.
"""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")


def _tests():
    sys.path.insert(0, TESTS)
    import test_formats_bundle as tb
    import test_formats_disklabel as tdl
    import test_formats_frame as tf
    import test_formats_logfile as tlf
    import test_formats_messages as tm
    import test_formats_nvram as tn
    import test_formats_replica_record as trr
    import test_formats_reservation as trs
    import test_nbd_protocol as tnbd
    return tb, tdl, tf, tlf, tm, tn, trr, trs, tnbd


def format_seeds():
    from firmware.formats import flashproto as FP
    from firmware.formats import logfile as LF
    from firmware.formats import messages as M
    from firmware.formats import reservation as RS

    from .formats import PARSERS
    tb, tdl, tf, tlf, tm, tn, trr, trs, _ = _tests()
    index = {name: i for i, (name, _seal, _check) in enumerate(PARSERS)}
    bundle = tb.whole_bundle()
    header = tlf.GOLDEN_HEADER_HEAD + bytes(436) + tlf.GOLDEN_HEADER_CRC
    seeds = {
        "bundle.header": [bundle[:96]], "bundle": [bundle],
        "disklabel": [tdl.GOLDEN_LABEL],
        "flashproto": [FP.build_frame(t, 0x1234, **fields) for t, fields, _hex in tb.FRAMES],
        "frame.header": [tf.GOLDEN_HEADER], "frame": [tf.GOLDEN_FRAME, tf.GOLDEN_EMPTY_FRAME],
        "logfile.header": [header], "logfile.newest": [header + header],
        "logfile.entry": [tlf.GOLDEN_RECORD_HEAD],
        "messages.block_refs": [M.pack_block_refs([(1, 2), (3, 4)])],
        "nvram.superblock": [tn.GOLDEN_SUPERBLOCK],
        "nvram.read_superblock": [bytes(tn.image_with(tn.GOLDEN_LAYOUT, dict(tn.GOLDEN_LAYOUT, sb_seq=2)))],
        "nvram.descriptor": [tn.GOLDEN_DESCRIPTOR, tn.GOLDEN_FREE_DESCRIPTOR],
        "replica_record": [trr.GOLDEN], "replica_record.read": [trr.GOLDEN + trr.GOLDEN],
        "reservation": [RS.build_record(trs.record())],
    }
    for name, blobs in seeds.items():
        for n, blob in enumerate(blobs):
            yield f"{name}-{n}", bytes([index[name], 0]) + blob
    for name, (_fields, blob) in tm.VECTORS.items():
        yield f"messages-{name}", bytes([index["messages"], int(M.MsgType[name]) << 1]) + blob
    commit = bytearray(2 * 4096 + 4 * 64)
    from firmware.formats import nvram as N
    N.pack_commit_into(commit, 0, 3, 41)
    yield "nvram.commit-0", bytes([index["nvram.commit"], 0]) + bytes(commit)
    del LF


def nbd_seeds():
    from hal.host import nbd
    *_, tnbd = _tests()
    option, go, request = tnbd.option, tnbd.go_data, tnbd.request
    hello = struct.pack(">I", 3)
    go_lun0 = option(nbd.NBD_OPT_GO, go("lun0", (nbd.NBD_INFO_NAME, nbd.NBD_INFO_BLOCK_SIZE)))
    io = b"".join([request(nbd.NBD_CMD_WRITE, 1, 4096, 512, data=b"\xab" * 512),
                   request(nbd.NBD_CMD_READ, 2, 0, 8192), request(nbd.NBD_CMD_FLUSH, 3),
                   request(nbd.NBD_CMD_TRIM, 4, 8192, 4096),
                   request(nbd.NBD_CMD_WRITE_ZEROES, 5, 0, 4096, flags=nbd.NBD_CMD_FLAG_NO_HOLE),
                   request(nbd.NBD_CMD_DISC, 6)])
    yield "go-io", b"\x00\x07" + hello + go_lun0 + io
    yield "export-name-io", b"\x21\x03" + hello + option(nbd.NBD_OPT_EXPORT_NAME, b"lun1") + io
    yield "list-info-abort", b"\x00\x01" + hello + b"".join([
        option(nbd.NBD_OPT_LIST), option(nbd.NBD_OPT_INFO, go("big", (nbd.NBD_INFO_DESCRIPTION,))),
        option(nbd.NBD_OPT_STRUCTURED_REPLY), option(nbd.NBD_OPT_ABORT)])
    yield "starttls-go", b"\x01\x05" + hello + option(nbd.NBD_OPT_STARTTLS) + go_lun0 + io
    yield "require-go", b"\x02\x02" + hello + go_lun0 + option(nbd.NBD_OPT_STARTTLS) + go_lun0 + io
    yield "starttls-handshake", b"\x41\x00" + hello + option(nbd.NBD_OPT_STARTTLS) + bytes.fromhex(
        "160301002e0100002a0303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"


def link_seeds():
    from firmware.formats import frame as F
    from firmware.formats import messages as M
    from hal.backends.framing import CobsFramer
    _, _, tf, _, tm, *_ = _tests()
    frames = tf.GOLDEN_FRAME + tf.GOLDEN_EMPTY_FRAME
    yield "framers-stream", b"\x00\x05" + b"junk" + frames
    yield "framers-cobs", b"\x00\x02" + b"".join(CobsFramer().encode([tf.GOLDEN_FRAME]))
    writes = bytes([2, 0, 0, 4, 0x11, 8, 0]) + bytes([3, 1, 0, 2, 0x22, 0, 1]) + bytes([4, 0, 50])
    for mode in (1, 3, 5):
        yield f"pair-{mode}-writes", bytes([mode]) + writes + bytes([9, 0, 1, 0, 0, 2])
    for name, (_fields, body) in tm.VECTORS.items():
        op = bytes([0, F.FLAG_RESPONSE if name.endswith(("ACK", "REPLY", "PONG")) else 0,
                    int(M.MsgType[name]), int(M.Resource.MIRROR), 0, 0, 0, 0, 1]) + struct.pack(">H", len(body))
        yield f"pair-send-{name}", b"\x01" + writes + op + body
    mirror_write = (bytes([8, 1]) + struct.pack(">HHQIHH", 1, M.CTX_FIRST | M.CTX_LAST, 9, 1, 1, 0)
                    + bytes([0x5A]) + struct.pack(">IQ", 3, 8) + b"\xff" * 16)
    yield "pair-mirror-write", b"\x01" + mirror_write + mirror_write
    yield "pair-corrupt-reconnect", b"\x03" + writes[:7] + bytes([5, 0, 40, 0xff, 1, 7, 4, 0, 100])


def nvram_seeds():
    yield "untouched", b"\x00\x00\x00\x00\x00\x00"
    for region in range(7):
        for seal in (0, 7):
            op = 0x80 | (region << 3)
            yield f"region{region}-seal{seal}", bytes([0, op, 0, 0, 0, 0x44 + region, 0x10, seal])
    yield "misdirected-seal", bytes([1, 0x80 | (5 << 3) | 3, 0, 0, 0, 0, 0, 0, 0x10, 0x00, 0, 0x10, 7])


def main() -> int:
    targets = {"formats": format_seeds, "nbd": nbd_seeds, "link": link_seeds, "nvram": nvram_seeds}
    for target, make in targets.items():
        directory = os.path.join(HERE, "seeds", target)
        os.makedirs(directory, exist_ok=True)
        for old in os.listdir(directory):
            os.unlink(os.path.join(directory, old))
        count = 0
        for name, data in make():
            with open(os.path.join(directory, f"{name}.bin"), "wb") as f:
                f.write(data)
            count += 1
        print(f"{target}: {count} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
