"""Signed firmware bundles: keys, build, verify, inspect (Ed25519 via `cryptography`).

The byte layout is firmware/formats/bundle.py; this module holds the keys.
A private key is a PKCS#8 PEM file written mode 0600; its public key sits
next to it as `<key>.pub` (SubjectPublicKeyInfo PEM). `verify` refuses a
bundle with a bad signature, the wrong target or a truncated or corrupt
payload, each with a one-line reason (BundleError).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (Ed25519PrivateKey,
                                                               Ed25519PublicKey)

from firmware.formats import FormatError
from firmware.formats import bundle as fmt


class BundleError(Exception):
    """A bundle that must not be flashed, or a key that cannot be used; one line.

    `kind` says why: "format" (truncated, corrupt, not a bundle), "signature",
    "target" or "key".
    """

    def __init__(self, message: str, kind: str = "format"):
        self.kind = kind
        super().__init__(message)


@dataclasses.dataclass
class VerifiedBundle:
    build_id: str
    target_kind: fmt.TargetKind
    created_at_s: int
    sha256: bytes                 # of the whole bundle file
    entries: list                 # [(EntryKind, name, data)]

    def entry(self, kind) -> tuple | None:
        return next((e for e in self.entries if e[0] == kind), None)


def keygen(private_path) -> tuple[pathlib.Path, pathlib.Path]:
    private_path = pathlib.Path(private_path)
    if private_path.exists():
        raise BundleError(f"{private_path}: exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def load_private_key(path) -> Ed25519PrivateKey:
    key = _load(path, serialization.load_pem_private_key, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: not an Ed25519 private key", "key")
    return key


def load_public_key(path) -> Ed25519PublicKey:
    key = _load(path, serialization.load_pem_public_key)
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path}: not an Ed25519 public key", "key")
    return key


def _load(path, loader, **kw):
    try:
        return loader(pathlib.Path(path).read_bytes(), **kw)
    except FileNotFoundError:
        raise BundleError(f"{path}: no such key file", "key") from None
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path}: not a PEM key ({exc})", "key") from None


def key_id(public_key: Ed25519PublicKey) -> bytes:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:fmt.KEY_ID_BYTES]


def build(private_key: Ed25519PrivateKey, entries, build_id: str,
          target_kind=fmt.TargetKind.BOARD, created_at_s: int | None = None) -> bytes:
    """entries: [(EntryKind, name, bytes)]; exactly one CONFIG entry, at most one WHEEL."""
    kinds = [int(kind) for kind, _, _ in entries]
    if kinds.count(fmt.EntryKind.CONFIG) != 1:
        raise BundleError("a bundle carries exactly one controller config")
    if kinds.count(fmt.EntryKind.WHEEL) > 1:
        raise BundleError("a bundle carries at most one twincache wheel")
    if len(build_id.encode("ascii", "replace")) > fmt.BUILD_ID_BYTES or not build_id.isascii():
        raise BundleError(f"build id {build_id!r}: at most {fmt.BUILD_ID_BYTES} ASCII characters")
    payload = fmt.build_payload(entries)
    created = int(time.time()) if created_at_s is None else created_at_s
    header = fmt.build_header(target_kind, build_id, created, len(payload),
                              key_id(private_key.public_key()))
    signature = private_key.sign(fmt.signed_message(header, hashlib.sha256(payload).digest()))
    return fmt.assemble(header, payload, signature)


def verify(blob: bytes, public_key: Ed25519PublicKey, target_kind=None,
           where: str = "bundle") -> VerifiedBundle:
    """Check structure, payload hash, signature and (if given) the target; BundleError otherwise."""
    try:
        parsed = fmt.parse_bundle_untrusted(blob, where)
    except FormatError as exc:
        raise BundleError(str(exc)) from None
    head = parsed.header.value
    try:
        public_key.verify(parsed.signature,
                          fmt.signed_message(parsed.header.data, parsed.payload_sha256))
    except InvalidSignature:
        signer = "this key" if head.key_id == key_id(public_key) else f"key {head.key_id.hex()}"
        raise BundleError(f"{where}: bad signature (signed by {signer}, not a valid signature "
                          f"from the trusted key {key_id(public_key).hex()})", "signature") from None
    if target_kind is not None and head.target_kind != int(target_kind):
        raise BundleError(f"{where}: wrong target: built for {_kind_name(head.target_kind)}, "
                          f"this is a {_kind_name(target_kind)}", "target")
    return _verified(parsed, blob)


def inspect(blob: bytes, where: str = "bundle") -> dict:
    """Describe a bundle without checking its signature (structure and hash are checked)."""
    try:
        parsed = fmt.parse_bundle_untrusted(blob, where)
    except FormatError as exc:
        raise BundleError(str(exc)) from None
    v = _verified(parsed, blob)
    return {"build_id": v.build_id, "target": _kind_name(v.target_kind),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v.created_at_s)),
            "key_id": parsed.header.value.key_id.hex(), "sha256": v.sha256.hex(),
            "payload_sha256": parsed.payload_sha256.hex(), "size_bytes": len(blob),
            "entries": [{"kind": fmt.EntryKind(k).name.lower(), "name": n, "size_bytes": len(d)}
                        for k, n, d in v.entries]}


def _verified(parsed, blob) -> VerifiedBundle:
    head = parsed.header.value
    entries = [(fmt.EntryKind(e.kind), e.name, e.data) for e in parsed.payload.value.entries]
    return VerifiedBundle(build_id=head.build_id, target_kind=_kind(head.target_kind),
                          created_at_s=head.created_at_s, sha256=hashlib.sha256(blob).digest(),
                          entries=entries)


def _kind(value):
    try:
        return fmt.TargetKind(value)
    except ValueError:
        return value


def _kind_name(value) -> str:
    kind = _kind(value)
    return kind.name.lower() if isinstance(kind, fmt.TargetKind) else f"unknown target {value}"


def parse_target(name: str) -> fmt.TargetKind:
    try:
        return fmt.TargetKind[name.upper()]
    except KeyError:
        choices = ", ".join(k.name.lower() for k in fmt.TargetKind)
        raise BundleError(f"target {name!r}: choose one of {choices}") from None
