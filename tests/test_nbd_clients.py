"""Real NBD clients against the protocol engine, through the in-memory server.

qemu-io, nbdinfo, nbdcopy and fio's nbd engine talk to hal.host.nbd exactly as
they will talk to a controller; the server keeps each export in a bytearray,
so these tests check the protocol, not the controller.
"""
import json
import subprocess

import pytest

from fixtures.nbd_memserver import MemServer
from hal.host.nbd import Export

MiB = 1 << 20
EXPORTS = [
    Export("lun0", 64 * MiB, 0, description="first LUN"),
    Export("lun1", 16 * MiB, 1, description="read-only LUN", read_only=True),
]


@pytest.fixture
def server(tmp_path):
    srv = MemServer(tmp_path / "nbd.sock", EXPORTS).start()
    yield srv
    srv.stop()


def run(*argv, timeout_s=60):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"{argv[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def qemu_io(uri, *commands):
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    out = run(*argv, uri)
    assert "failed" not in out and "Pattern verification failed" not in out, out
    return out


@pytest.mark.needs("qemu-io")
def test_qemu_io_write_patterns_and_read_them_back(server):
    uri = server.uri("lun0")
    qemu_io(uri, "write -P 0xa1 0 64k", "write -P 0xb2 1M 1M", "write -f -P 0xc3 60M 4M",
            "aio_write -P 0xd4 8M 128k", "aio_write -P 0xe5 9M 128k", "aio_flush")
    qemu_io(uri, "read -P 0xa1 0 64k", "read -P 0xb2 1M 1M", "read -P 0xc3 60M 4M",
            "read -P 0xd4 8M 128k", "read -P 0xe5 9M 128k", "read -P 0 64k 64k")
    assert server.stores["lun0"][1 * MiB:2 * MiB] == b"\xb2" * MiB


@pytest.mark.needs("qemu-io")
def test_qemu_io_zeroes_discard_and_unaligned_writes(server):
    uri = server.uri("lun0")
    # qemu honours the advertised 512-byte minimum with read-modify-write.
    qemu_io(uri, "write -P 0x11 0 1M", "write -z 4k 8k", "discard 64k 64k",
            "write -P 0x22 100 1000", "flush")
    qemu_io(uri, "read -P 0x11 0 100", "read -P 0x22 100 1000", "read -P 0x11 1100 2996",
            "read -P 0 4k 8k", "read -P 0x11 12k 52k")


@pytest.mark.needs("qemu-io")
def test_qemu_io_refuses_to_write_a_read_only_export(server):
    result = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", server.uri("lun1")],
                            capture_output=True, text=True, timeout=60)
    assert "Permission denied" in result.stderr + result.stdout
    run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 1M", server.uri("lun1"))


@pytest.mark.needs("nbdinfo")
def test_nbdinfo_list_shows_every_export(server):
    info = json.loads(run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={server.socket_path}"))
    exports = {e["export-name"]: e for e in info["exports"]}
    assert set(exports) == {"lun0", "lun1"}
    assert exports["lun0"]["description"] == "first LUN"
    assert exports["lun0"]["export-size"] == 64 * MiB and exports["lun1"]["is_read_only"] is True
    assert info["protocol"] == "newstyle-fixed" and info["TLS"] is False


@pytest.mark.needs("nbdinfo")
def test_nbdinfo_of_one_export(server):
    info = json.loads(run("nbdinfo", "--json", server.uri("lun0")))
    [export] = info["exports"]
    assert export["export-name"] == "lun0" and export["export-size"] == 64 * MiB
    assert (export["block_size_minimum"], export["block_size_preferred"],
            export["block_size_maximum"]) == (512, 4096, 4 * MiB)
    assert export["can_flush"] and export["can_fua"] and export["can_multi_conn"]
    assert export["can_trim"] and export["can_zero"] and not export["is_read_only"]
    assert run("nbdinfo", "--size", server.uri("lun1")).strip() == str(16 * MiB)


@pytest.mark.needs("nbdcopy")
def test_nbdcopy_round_trip_of_a_random_image(server, tmp_path):
    image, back = tmp_path / "in.img", tmp_path / "out.img"
    data = bytearray(__import__("random").Random(3).randbytes(64 * MiB))
    data[5 * MiB:9 * MiB] = bytes(4 * MiB)          # a zero run, which nbdcopy may send as zeroes
    image.write_bytes(data)
    run("nbdcopy", "--flush", str(image), server.uri("lun0"))
    assert server.stores["lun0"] == data
    run("nbdcopy", server.uri("lun0"), str(back))
    assert back.read_bytes() == data


@pytest.mark.needs("fio")
def test_fio_nbd_engine_verifies_with_several_jobs(server, tmp_path):
    out = run("fio", "--name=nbdverify", "--ioengine=nbd", f"--uri={server.uri('lun0')}",
              "--rw=randwrite", "--bssplit=4k/50:64k/30:256k/20", "--iodepth=8", "--numjobs=4",
              "--size=16M", "--offset_increment=16M", "--verify=crc32c", "--verify_state_save=0", "--verify_fatal=1",
              "--do_verify=1", "--runtime=5", "--group_reporting=0", "--output-format=json",
              timeout_s=120)
    jobs = json.loads(out[out.index("{"):])["jobs"]
    assert len(jobs) == 4 and all(job["error"] == 0 for job in jobs)
    assert all(job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0 for job in jobs)


@pytest.mark.needs("fio")
def test_fio_deep_queues_against_a_small_inflight_bound(tmp_path):
    """iodepth 32 against max_inflight 8: backpressure, with reads checked for errors."""
    srv = MemServer(tmp_path / "nbd.sock", EXPORTS, max_inflight=8).start()
    try:
        out = run("fio", "--name=deep", "--ioengine=nbd", f"--uri={srv.uri('lun0')}",
                  "--rw=randrw", "--bs=4k", "--iodepth=32", "--numjobs=2", "--size=64M",
                  "--time_based", "--runtime=3", "--output-format=json", timeout_s=60)
    finally:
        srv.stop()
    jobs = json.loads(out[out.index("{"):])["jobs"]
    assert all(job["error"] == 0 and job["read"]["io_bytes"] and job["write"]["io_bytes"] for job in jobs)
    iops = sum(job["read"]["iops"] + job["write"]["iops"] for job in jobs)
    print(f"fio 4k randrw QD32 x2 jobs against the in-memory server: {iops:.0f} IOPS")
