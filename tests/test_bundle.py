"""Signed bundles: keygen, build, verify, inspect, through the API and the `twincache bundle` commands."""
import json
import os
import subprocess
import sys

import pytest

from board import bundle
from firmware.formats.bundle import EntryKind, TargetKind

TWINCACHE = os.path.join(os.path.dirname(sys.executable), "twincache")
ENTRIES = [(EntryKind.CONFIG, "controller.toml", b'[nbd]\nunix = "/run/nbd.sock"\n'),
           (EntryKind.WHEEL, "twincache-0.1.0-py3-none-any.whl", b"PK\x03\x04 not really"),
           (EntryKind.DEPENDENCY, "construct-2.10.70-py3-none-any.whl", b"PK\x03\x04 dep")]


@pytest.fixture
def keys(tmp_path):
    return bundle.keygen(tmp_path / "k")


def run(*args):
    return subprocess.run([TWINCACHE, *map(str, args)], capture_output=True, text=True, timeout=60)


def test_keygen_writes_a_private_key_only_its_owner_reads(keys):
    private, public = keys
    assert os.stat(private).st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    with pytest.raises(bundle.BundleError, match="refusing to overwrite"):
        bundle.keygen(private)


def test_build_then_verify_returns_the_entries(keys):
    blob = bundle.build(bundle.load_private_key(keys[0]), ENTRIES, "0.1.0", created_at_s=1700000000)
    v = bundle.verify(blob, bundle.load_public_key(keys[1]), TargetKind.BOARD)
    assert v.build_id == "0.1.0" and v.entries == ENTRIES and v.created_at_s == 1700000000
    assert v.entry(EntryKind.CONFIG)[2].startswith(b"[nbd]")


def test_a_bundle_signed_by_another_key_is_refused(tmp_path, keys):
    other, _ = bundle.keygen(tmp_path / "other")
    blob = bundle.build(bundle.load_private_key(other), ENTRIES, "x")
    with pytest.raises(bundle.BundleError, match="bad signature") as err:
        bundle.verify(blob, bundle.load_public_key(keys[1]))
    assert err.value.kind == "signature"


def test_a_changed_header_byte_breaks_the_signature(keys):
    blob = bytearray(bundle.build(bundle.load_private_key(keys[0]), ENTRIES, "0.1.0"))
    blob[12] ^= 1                       # a byte of the build id: the payload hash still holds
    with pytest.raises(bundle.BundleError, match="bad signature"):
        bundle.verify(bytes(blob), bundle.load_public_key(keys[1]))


def test_wrong_target_and_truncation_are_refused(keys):
    key, pub = bundle.load_private_key(keys[0]), bundle.load_public_key(keys[1])
    vm = bundle.build(key, ENTRIES, "x", TargetKind.VM)
    with pytest.raises(bundle.BundleError, match="wrong target: built for vm, this is a board"):
        bundle.verify(vm, pub, TargetKind.BOARD)
    with pytest.raises(bundle.BundleError, match="truncated bundle"):
        bundle.verify(vm[:-30], pub)


def test_build_refuses_a_bundle_without_exactly_one_config(keys):
    with pytest.raises(bundle.BundleError, match="exactly one controller config"):
        bundle.build(bundle.load_private_key(keys[0]), ENTRIES[1:], "x")


def test_cli_keygen_build_verify_inspect(tmp_path):
    key = tmp_path / "sign.key"
    cfg = tmp_path / "controller.toml"
    cfg.write_text('[nbd]\nunix = "/run/nbd.sock"\n')
    wheel = tmp_path / "twincache-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK wheel bytes")
    out = tmp_path / "fw.tcb"
    assert run("bundle", "keygen", key).returncode == 0
    r = run("bundle", "build", "--key", key, "--config", cfg, "--wheel", wheel, "-o", out)
    assert r.returncode == 0 and "build 0.1.0" in r.stdout, r.stderr
    r = run("bundle", "verify", out, "--pubkey", f"{key}.pub", "--target", "board")
    assert r.returncode == 0 and "OK, build 0.1.0 for board" in r.stdout
    info = json.loads(run("bundle", "inspect", out, "--json").stdout)
    assert [e["kind"] for e in info["entries"]] == ["config", "wheel"] and info["target"] == "board"
    out.write_bytes(out.read_bytes()[:-10])
    r = run("bundle", "verify", out, "--pubkey", f"{key}.pub")
    assert r.returncode == 1 and "truncated bundle" in r.stderr and "Traceback" not in r.stderr


def test_cli_refuses_bad_input_with_status_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    bundle.keygen(tmp_path / "k")
    r = run("bundle", "build", "--key", tmp_path / "k", "--config", bad, "-o", tmp_path / "o")
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    r = run("bundle", "verify", tmp_path / "o", "--pubkey", tmp_path / "missing.pub")
    assert r.returncode == 2
