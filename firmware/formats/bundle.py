"""The firmware bundle: what `twincache bundle build` writes and a board flashes.

    header (96 bytes) | payload (payload_len bytes) | payload SHA-256 (32) | signature (64)

The header names the build (build id, created-at, target kind). The payload
is a table of entries: the twincache wheel, its pinned dependencies as
wheels, and the board's controller config (TOML). The SHA-256 covers the
payload bytes; the Ed25519 signature covers `signed_message()`: the header
bytes followed by the payload SHA-256, so it binds every byte of the bundle.

This module only declares and parses: signing and verifying belong to
board/bundle.py, which holds the keys. parse_bundle_untrusted raises
FormatError for anything that is not a whole, self-consistent bundle.
"""
import enum
import hashlib

from construct import (Bytes, Checksum, Const, FixedSized, GreedyBytes, Int8ub,
                       Int16ub, Int32ub, Int64ub, PaddedString, PascalString,
                       Prefixed, PrefixedArray, RawCopy, Struct, Terminated, this)
from construct.core import ChecksumError, ConstructError

from . import FormatError

BUNDLE_MAGIC = b"TCBUNDL\x00"
BUNDLE_VERSION = 1
HEADER_SIZE_BYTES = 96
SHA256_BYTES = 32
SIGNATURE_BYTES = 64          # Ed25519
KEY_ID_BYTES = 8              # first bytes of SHA-256(raw public key)
BUILD_ID_BYTES = 32
PAYLOAD_MAX_BYTES = 256 << 20 # a wheel set is a few MiB; anything near this is refused
ENTRIES_MAX = 256


class TargetKind(enum.IntEnum):
    LOCAL = 1                 # local processes
    VM = 2                    # the libvirt/QEMU pair
    BOARD = 3                 # a dev board running the board agent


class EntryKind(enum.IntEnum):
    WHEEL = 1                 # the twincache wheel
    DEPENDENCY = 2            # a pinned dependency, as a wheel
    CONFIG = 3                # the board's controller config (TOML)


BundleHeader = Struct(
    "magic" / Const(BUNDLE_MAGIC),
    "version" / Int16ub,                              # BUNDLE_VERSION
    "target_kind" / Int8ub,                           # TargetKind
    "flags" / Int8ub,                                 # zero; for growth
    "build_id" / PaddedString(BUILD_ID_BYTES, "ascii"),  # e.g. "0.1.0+g1f2375b"
    "created_at_s" / Int64ub,                         # seconds since the Unix epoch
    "payload_len" / Int64ub,                          # bytes of payload that follow
    "key_id" / Bytes(KEY_ID_BYTES),                   # which key signed it
    "reserved" / Bytes(28),                           # zero
)
assert BundleHeader.sizeof() == HEADER_SIZE_BYTES

PayloadEntry = Struct(
    "kind" / Int8ub,                                  # EntryKind
    "reserved" / Bytes(3),                            # zero
    "name" / PascalString(Int16ub, "utf8"),           # file name, e.g. twincache-0.1.0-py3-none-any.whl
    "data" / Prefixed(Int32ub, GreedyBytes),          # the file's bytes
)

Payload = Struct(
    "entries" / PrefixedArray(Int16ub, PayloadEntry),
)

Bundle = Struct(
    "header" / RawCopy(BundleHeader),
    "payload" / RawCopy(FixedSized(this.header.value.payload_len, Payload)),
    "payload_sha256" / Checksum(Bytes(SHA256_BYTES), lambda data: hashlib.sha256(data).digest(),
                                this.payload.data),
    "signature" / Bytes(SIGNATURE_BYTES),             # Ed25519 over signed_message()
    Terminated,
)


def signed_message(header_bytes: bytes, payload_sha256: bytes) -> bytes:
    """What the signature covers: the header (which fixes the payload length) and the payload hash."""
    return bytes(header_bytes) + bytes(payload_sha256)


def build_payload(entries) -> bytes:
    """entries: iterable of (EntryKind, name, data)."""
    entries = [dict(kind=int(kind), reserved=bytes(3), name=name, data=bytes(data))
               for kind, name, data in entries]
    assert len(entries) <= ENTRIES_MAX
    return Payload.build(dict(entries=entries))


def build_header(target_kind, build_id: str, created_at_s: int, payload_len: int, key_id: bytes) -> bytes:
    assert len(build_id.encode("ascii")) <= BUILD_ID_BYTES
    return BundleHeader.build(dict(version=BUNDLE_VERSION, target_kind=int(target_kind), flags=0,
                                   build_id=build_id, created_at_s=created_at_s,
                                   payload_len=payload_len, key_id=key_id, reserved=bytes(28)))


def assemble(header: bytes, payload: bytes, signature: bytes) -> bytes:
    assert len(header) == HEADER_SIZE_BYTES and len(signature) == SIGNATURE_BYTES
    return header + payload + hashlib.sha256(payload).digest() + signature


def _check_header(head, size: int, where: str):
    if head.version != BUNDLE_VERSION:
        raise FormatError(f"unsupported bundle version {head.version}", where)
    if head.payload_len > PAYLOAD_MAX_BYTES:
        raise FormatError(f"payload of {head.payload_len} bytes exceeds {PAYLOAD_MAX_BYTES}", where)
    want = HEADER_SIZE_BYTES + head.payload_len + SHA256_BYTES + SIGNATURE_BYTES
    if size < want:
        raise FormatError(f"truncated bundle: {size} bytes, the header says {want}", where)
    if size > want:
        raise FormatError(f"{size - want} trailing bytes after the signature", where)


def parse_header_untrusted(buf, where: str = ""):
    """Parse and check the header; the rest of the bundle is not looked at."""
    if len(buf) < HEADER_SIZE_BYTES:
        raise FormatError(f"truncated bundle: {len(buf)} bytes, shorter than the header", where)
    try:
        return BundleHeader.parse(bytes(buf[:HEADER_SIZE_BYTES]))
    except ConstructError as exc:
        raise FormatError(f"not a twincache bundle ({_first_line(exc)})", where) from None


def parse_bundle_untrusted(buf, where: str = ""):
    """Parse a whole bundle; check sizes and the payload SHA-256 (not the signature)."""
    head = parse_header_untrusted(buf, where)
    _check_header(head, len(buf), where)
    try:
        bundle = Bundle.parse(bytes(buf))
    except ChecksumError:
        raise FormatError("payload SHA-256 mismatch: the payload is corrupt", where) from None
    except ConstructError as exc:
        raise FormatError(f"malformed bundle payload ({_first_line(exc)})", where) from None
    if len(bundle.payload.value.entries) > ENTRIES_MAX:
        raise FormatError(f"more than {ENTRIES_MAX} payload entries", where)
    for entry in bundle.payload.value.entries:
        if entry.kind not in EntryKind.__members__.values():
            raise FormatError(f"payload entry {entry.name!r} has unknown kind {entry.kind}", where)
    return bundle


def _first_line(exc) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
