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
