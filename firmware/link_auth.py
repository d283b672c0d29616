"""Per-frame authentication of one link session: its keys, its counters, what is refused.

Owns the session's two direction keys (derived from the pair key and both
HELLO bodies once the peer's HELLO is taken: firmware/formats/frame.py), the
sender's frame counter, the last counter taken from the peer, and the rules:

- Before the key exists only frames without a MAC are taken (the HELLOs,
  which carry the nonces). A frame with a MAC is dropped (`auth_early`): on
  a lossy line it overtook the HELLO, and go-back-N sends it again.
- Once it exists every frame must carry a MAC that verifies. A HELLO without
  one is a lossy line's retransmission and is dropped (`auth_stale_hellos`);
  any other frame without one, or with a MAC that does not verify, is an
  authentication failure (`auth_failures`).
- A frame whose MAC verifies but whose counter is not above the last one
  taken was replayed, duplicated or reordered: dropped (`auth_replays`). A
  socket never does that by itself, so there it is a failure too.
- `failures_max` failures within `failure_window_ms` end the session
  (LinkProtocolError): a peer, or someone on the cable, that keeps sending
  frames that do not verify is not talked to further. In the handshake one
  failure ends it: the peer's AUTH is sealed, so a peer without the pair key
  fails there, and is told so at once rather than at the handshake deadline.

A refused frame is dropped whole, before its ack or sequence number is
looked at: nothing in it reaches the session or the firmware's handlers.
No I/O, no clock: `now_ms` comes in with each frame.
"""
import collections
import hmac

from .formats import frame as F
from .formats import messages as M

AUTH_FAILURES_MAX = 8
AUTH_FAILURE_WINDOW_MS = 10_000
STATS = ("auth_failures", "auth_replays", "auth_early", "auth_stale_hellos")


class AuthFailed(Exception):
    """Too many frames failed authentication; the caller turns it into a protocol error."""


class FrameAuth:
    def __init__(self, pair_key, controller_id, reliable_transport, stats,
                 failures_max=AUTH_FAILURES_MAX, failure_window_ms=AUTH_FAILURE_WINDOW_MS):
        assert failures_max >= 1 and failure_window_ms >= 0
        self.pair_key = pair_key
        self.controller_id = controller_id
        self.reliable_transport = reliable_transport
        self.failures_max = failures_max
        self.failure_window_ms = failure_window_ms
        self.stats = stats
        for name in STATS:
            stats[name] += 0            # shown at zero in status and metrics
        self.reset()

    def reset(self):
        """A new session: no keys until the peer's HELLO, counters from the start."""
        self.tx = None                  # keyed BLAKE2b of our direction, to copy() per frame
        self.rx = None                  # the peer's
        self.tx_seq = 0
        self.rx_seq_last = -1
        self.failures = collections.deque(maxlen=self.failures_max)   # when the last ones failed (ms)

    @property
    def keyed(self) -> bool:
        return self.tx is not None

    def start(self, own_hello, peer_hello):
        """The peer's HELLO was taken: derive both direction keys of this session from both
        HELLO bodies as sent and as received (they differ only if one was altered)."""
        hellos = (own_hello, peer_hello) if self.controller_id == 0 else (peer_hello, own_hello)
        peer_id = 1 - self.controller_id
        self.tx = F.mac_hasher(F.derive_direction_key(self.pair_key, *hellos, self.controller_id))
        self.rx = F.mac_hasher(F.derive_direction_key(self.pair_key, *hellos, peer_id))

    def seal(self, parts) -> bytes:
        """The auth trailer of the next frame we send (its header already has FLAG_AUTH)."""
        seq = self.tx_seq
        self.tx_seq = seq + 1
        return F.auth_trailer(self.tx, parts, seq)

    def check(self, frame, head, now_ms, handshake=False) -> bool:
        """True if the frame may be taken; False if it is dropped. Raises AuthFailed at the limit
        (in the handshake: at the first failure)."""
        authed = head.flags & F.FLAG_AUTH
        if self.rx is None:
            if authed:
                self.stats["auth_early"] += 1
                return False
            return True
        if not authed:
            if head.type == M.MsgType.HELLO and not head.flags & F.FLAG_ACK_ONLY:
                self.stats["auth_stale_hellos"] += 1
                return False
            return self._failed(now_ms, handshake)
        auth_seq, mac, covered = F.parse_auth_untrusted(frame, head)
        h = self.rx.copy()
        h.update(covered)
        if not hmac.compare_digest(h.digest(), mac):
            return self._failed(now_ms, handshake)
        if auth_seq <= self.rx_seq_last:
            self.stats["auth_replays"] += 1
            return self._failed(now_ms, handshake) if self.reliable_transport else False
        self.rx_seq_last = auth_seq
        return True

    def _failed(self, now_ms, handshake) -> bool:
        self.stats["auth_failures"] += 1
        if handshake:
            raise AuthFailed("peer failed authentication: it does not hold the pair's key, or a "
                             "HELLO was altered on the way (a frame's MAC did not verify in the handshake)")
        failures = self.failures
        failures.append(now_ms)
        if len(failures) == self.failures_max and now_ms - failures[0] <= self.failure_window_ms:
            raise AuthFailed(f"{self.failures_max} frames failed authentication within "
                             f"{now_ms - failures[0]} ms")
        return False
