"""The pair key file: 32 random bytes, hex-encoded, readable by its owner only.

Both controllers of a pair hold the same key and prove it to each other in
the hello exchange (HMAC-SHA256). A key anyone else on the machine can read
is no secret, so a file with any group or other permission bit is refused.
`create_pair_key` never overwrites: replacing the key of a running pair
would lock its controllers out of each other.
"""
from __future__ import annotations

import os
import secrets
import stat

from hal.backends.interfaces import HalError

KEY_BYTES = 32


def create_pair_key(path) -> bytes:
    """Write a fresh key to `path` (mode 0600); refuse if the file exists."""
    path = str(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise HalError(f"{path}: key file exists; refusing to overwrite a pair key") from None
    except OSError as exc:
        raise HalError(f"{path}: cannot create key file: {exc.strerror}") from None
    key = secrets.token_bytes(KEY_BYTES)
    try:
        os.fchmod(fd, 0o600)   # the umask could only have narrowed it, but be explicit
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def load_pair_key(path) -> bytes:
    """Read the key; refuse a missing file, one others may read, or bad content."""
    path = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HalError(f"{path}: no pair key file (create one with create_pair_key)") from None
    except OSError as exc:
        raise HalError(f"{path}: cannot read key file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HalError(f"{path}: key file is not a regular file")
        if st.st_mode & 0o077:
            raise HalError(f"{path}: key file mode is {stat.S_IMODE(st.st_mode):04o}; "
                           f"it must be readable by its owner only (chmod 600)")
        text = os.read(fd, 4 * KEY_BYTES)
    finally:
        os.close(fd)
    return _decode(path, text)


def _decode(path: str, text: bytes) -> bytes:
    try:
        key = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise HalError(f"{path}: key file does not hold hex digits") from None
    if len(key) != KEY_BYTES:
        raise HalError(f"{path}: key is {len(key)} bytes, need {KEY_BYTES} ({2 * KEY_BYTES} hex digits)")
    return key
