"""Coverage-guided fuzzing of everything that parses bytes from outside (issue 15).

One module per target; each exposes `one_input(data: bytes)`, which drives the
real code with `data` and raises only for a crash: an exception the code is not
documented to raise, or a broken invariant (an AssertionError naming it).

- `nbd`: a client's bytes into hal.host.nbd.NbdConnection (handshake, options,
  STARTTLS, requests), and ciphertext into hal.host.nbd_tls.TlsSession.
- `link`: bytes into both framers (hal.backends.framing) and, as the partner, frames
  into a real firmware Controller's link entry point after a real handshake.
- `formats`: every parse_*_untrusted of firmware/formats.
- `nvram`: a valid NVRAM image, mutated, then a Controller recovers from it;
  no recovered cache or mirror line may fail its data checksum.

The harnesses read their choices from the input with `reader.Reader`, not
from atheris, so a crashing input replays without it: `python -m fuzz
--target T --replay FILE`. `python -m fuzz` runs atheris (the `fuzz` extra);
`inv fuzz` drives it. Seeds: fuzz/seeds/<target>/, made by fuzz/make_seeds.py
from the tests' golden vectors.
"""

TARGETS = ("nbd", "link", "formats", "nvram")
