"""Block status (base:allocation) and structured replies on a real local pair, with real clients.

nbdinfo --map and qemu-img map read the allocation through both controllers
(lun0 is a's, so through b it is asked of a over the link); nbdcopy and
qemu-img convert copy a sparse LUN and must read only its data (the pair's own
read counters, twincache_host_request_bytes_total, say how much) while the
copy comes out byte-identical. A range written and acknowledged but not yet
destaged is a hole on the disk file: it must still be reported as data.
"""
import json
import os

import pytest

from firmware.formats.disklabel import DATA_OFFSET_BYTES
from fixtures.pair import make_pair, run
from hal.host import tls_certs

from test_pair_metrics import KEEP_DIRTY, metrics_url, scrape, value

MiB = 1 << 20
LUN_BYTES = 64 * MiB
pytestmark = pytest.mark.needs("qemu-io", "qemu-img", "nbdinfo", "nbdcopy")

# What the tests write on lun0 and lun1 (offset, length, byte): 3 MiB of 64.
LAYOUT = [(1 * MiB, 64 << 10, 0xAB), (8 * MiB, 4096, 0xCD), (40 * MiB, 2 * MiB, 0x11), (63 * MiB, MiB, 0x5A)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    pair = make_pair(tmp_path_factory.mktemp("bs"), lun_size_bytes=LUN_BYTES, metrics=True)
    pair.wait_settled(owners={"lun0": "a", "lun1": "b"})
    for lun in (0, 1):
        write_layout(pair.uri("a", lun))
    yield pair
    pair.stop_all()


def write_layout(uri, layout=LAYOUT, image_opts=(), obj=()):
    cmds = []
    for offset, length, byte in layout:
        cmds += ["-c", f"write -P {byte:#x} {offset} {length}"]
    run(["qemu-io", *obj, "-f", "raw", *cmds, uri] if not image_opts else ["qemu-io", *obj, *cmds, *image_opts],
        timeout=60)


def expected_image(layout=LAYOUT):
    image = bytearray(LUN_BYTES)
    for offset, length, byte in layout:
        image[offset:offset + length] = bytes([byte]) * length
    return image


def expected_map(layout=LAYOUT):
    """[(offset, length, data?)] of the whole LUN, holes between the written ranges."""
    out, pos = [], 0
    for offset, length, _ in sorted(layout):
        if offset > pos:
            out.append((pos, offset - pos, False))
        out.append((offset, length, True))
        pos = offset + length
    if pos < LUN_BYTES:
        out.append((pos, LUN_BYTES - pos, False))
    return out


def nbdinfo_map(uri):
    """nbdinfo --map --json as [(offset, length, data?)]; checks hole and zero go together."""
    extents = json.loads(run(["nbdinfo", "--map", "--json", uri], timeout=60).stdout)
    out = []
    for e in extents:
        assert e["type"] in (0, 3), e                          # data, or hole+zero
        out.append((e["offset"], e["length"], e["type"] == 0))
    return out


def read_bytes(pair, name, lun):
    m = scrape(metrics_url(pair, name))
    return value(m, "twincache_host_request_bytes_total", controller=name, lun=f"lun{lun}", op="read")


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("via", ["a", "b"])
def test_nbdinfo_map_shows_the_written_ranges_as_data_and_the_rest_as_holes(pair, via):
    assert nbdinfo_map(pair.uri(via, 0)) == expected_map()
    assert nbdinfo_map(pair.uri(via, 1)) == expected_map()


@pytest.mark.parametrize("via", ["a", "b"])
def test_nbdinfo_sees_structured_replies_the_context_and_the_block_sizes(pair, via):
    doc = json.loads(run(["nbdinfo", "--json", pair.uri(via, 0)], timeout=30).stdout)
    export = doc["exports"][0]
    assert doc["structured"] is True and export["contexts"] == ["base:allocation"] and export["can_df"]
    assert (export["block_size_minimum"], export["block_size_preferred"], export["block_size_maximum"]) \
        == (512, 4096, 4 * MiB)


@pytest.mark.parametrize("via", ["a", "b"])
def test_qemu_img_map_json(pair, via):
    extents = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", pair.uri(via, 1)],
                             timeout=60).stdout)
    got = [(e["start"], e["length"], e["data"]) for e in extents]
    assert got == expected_map()
    assert all(e["zero"] is not e["data"] for e in extents)   # the holes read as zeroes


@pytest.mark.parametrize("via", ["a", "b"])
def test_nbdcopy_of_a_sparse_lun_reads_only_its_data_and_copies_it_exactly(pair, via, tmp_path):
    out = tmp_path / "copy.img"
    before = read_bytes(pair, via, 0)
    run(["nbdcopy", pair.uri(via, 0), str(out)], timeout=120)
    read = read_bytes(pair, via, 0) - before
    written = sum(length for _, length, _ in LAYOUT)
    print(f"nbdcopy via {via}: read {read} bytes of a {LUN_BYTES}-byte LUN ({written} written)")
    assert out.read_bytes() == expected_image()
    assert written <= read < LUN_BYTES // 8              # 3 MiB (rounded to its requests), not 64
    assert allocated_bytes(out) < LUN_BYTES // 8        # the copy is sparse too


@pytest.mark.parametrize("via", ["a", "b"])
def test_qemu_img_convert_of_a_sparse_lun_reads_only_its_data(pair, via, tmp_path):
    out = tmp_path / "convert.img"
    before = read_bytes(pair, via, 1)
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", pair.uri(via, 1), str(out)], timeout=120)
    read = read_bytes(pair, via, 1) - before
    print(f"qemu-img convert via {via}: read {read} bytes of a {LUN_BYTES}-byte LUN")
    assert out.read_bytes() == expected_image()
    assert read < LUN_BYTES // 8 and allocated_bytes(out) < LUN_BYTES // 8


def test_a_full_read_without_block_status_reads_everything(pair, tmp_path):
    """The counter the tests above rely on does count a whole copy: without extents, 64 MiB."""
    out = tmp_path / "full.img"
    before = read_bytes(pair, "a", 0)
    run(["nbdcopy", "--no-extents", pair.uri("a", 0), str(out)], timeout=120)
    assert read_bytes(pair, "a", 0) - before == LUN_BYTES
    assert out.read_bytes() == expected_image()


def disk_has_data(path, offset, length):
    """Whether the disk file holds data anywhere in the LUN range [offset, offset + length)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start = os.lseek(fd, DATA_OFFSET_BYTES + offset, os.SEEK_DATA)
    except OSError:
        return False                                    # ENXIO: nothing after it at all
    finally:
        os.close(fd)
    return start < DATA_OFFSET_BYTES + offset + length


@pytest.mark.parametrize("via", ["a", "b"])
def test_a_written_range_not_yet_destaged_is_reported_as_data(tmp_path, via):
    pair = make_pair(tmp_path, lun_size_bytes=LUN_BYTES, cache=KEEP_DIRTY)
    try:
        pair.wait_settled(owners={"lun0": "a", "lun1": "b"})
        layout = [(20 * MiB, 128 << 10, 0x77)]
        write_layout(pair.uri(via, 0), layout)
        assert pair.status("a")["luns"]["lun0"]["dirty_lines"] == 32      # in the cache only
        assert not disk_has_data(pair.disk_path(0), 20 * MiB, 128 << 10)  # the disk file: a hole
        assert nbdinfo_map(pair.uri(via, 0)) == expected_map(layout)
        run(["qemu-io", "-f", "raw", "-c", f"read -P 0x77 {20 * MiB} {128 << 10}", pair.uri(via, 0)], timeout=30)
    finally:
        pair.stop_all()


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    pair = make_pair(tmp_path_factory.mktemp("bstls"), lun_size_bytes=LUN_BYTES, tls=True)
    pair.wait_settled(owners={"lun0": "a", "lun1": "b"})
    yield pair
    pair.stop_all()


def test_block_status_and_a_sparse_copy_over_tls(tls_pair, tmp_path):
    certs = tls_pair.tls_client_dir()
    opts = tls_certs.client_options(certs, tls_pair.socket_path("a"), "lun0")
    write_layout(None, image_opts=["--image-opts", opts["qemu_image_opts"]], obj=["--object", opts["qemu_object"]])
    for via in ("a", "b"):
        uri = tls_certs.client_options(certs, tls_pair.socket_path(via), "lun0")["uri"]
        info = run(["nbdinfo", uri], timeout=30).stdout
        assert "with TLS" in info and "using structured packets" in info
        assert nbdinfo_map(uri) == expected_map()
        out = tmp_path / f"tls-{via}.img"
        run(["nbdcopy", uri, str(out)], timeout=120)
        assert out.read_bytes() == expected_image() and allocated_bytes(out) < LUN_BYTES // 8
