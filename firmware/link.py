"""The link session: authenticated, reliable, ordered frames with two lanes.

Owns everything between "a byte stream to the partner exists" and "a message
arrived from the partner": the HELLO exchange (frozen format), HMAC-SHA256
challenge-response authentication with the pair's pre-shared key, a MAC on
every frame after the HELLOs with keys of this session (firmware/link_auth.py:
forged, altered and replayed frames are dropped before anything here looks
at them, and too many end the session), sequence
numbers and cumulative acks (replays and duplicates within a session are
dropped), go-back-N retransmission for lossy transports (serial), heartbeats
and the dead-peer timeout, and the two lanes: control frames always go first
and do not count against the data window, so command-response traffic never
waits behind bulk mirror data (claims 1.6: reserved positions for
command-response data in the link's data flow).

No I/O: `connected(nonce, now_ms)`, `receive(frame, now_ms)`, `tick(now_ms)`
take events; `take_output()` returns the buffers to transmit. The session
state machine is the TRANSITIONS table below.
"""
import collections
import hashlib
import hmac

from .formats import FormatError
from .formats import frame as F
from .formats import messages as M
from .formats.nvram import crc32c_raw as _crc32c
from .link_auth import AUTH_FAILURE_WINDOW_MS, AUTH_FAILURES_MAX, AuthFailed, FrameAuth

AUTH_LABEL = b"twincache-auth-v1"
HEARTBEAT_STRUCT = M.HEARTBEAT_STRUCT
PROTOCOL_VERSION = 3           # 2: MIRROR_WRITE carries 1..n blocks of a host write; 3: frame MACs
SEQ_LIMIT = (1 << 32) - 1


class SessionState:
    DOWN = "down"
    HELLO_SENT = "hello-sent"     # our HELLO is out, waiting for the peer's
    AUTH_SENT = "auth-sent"       # peer's HELLO checked, our AUTH is out, waiting for theirs
    UP = "up"


class LinkProtocolError(Exception):
    """The peer broke the protocol; the session must be reset (an operating fault)."""


S = SessionState
# (state, event) -> (handler name, next state); a pair not here is a protocol error.
TRANSITIONS = {
    (S.DOWN, "connected"): ("_on_connected", S.HELLO_SENT),
    (S.HELLO_SENT, "hello"): ("_on_hello", S.AUTH_SENT),
    (S.AUTH_SENT, "auth"): ("_on_auth", S.UP),
    (S.UP, "message"): ("_on_message", S.UP),
    (S.HELLO_SENT, "disconnected"): ("_on_disconnected", S.DOWN),
    (S.AUTH_SENT, "disconnected"): ("_on_disconnected", S.DOWN),
    (S.UP, "disconnected"): ("_on_disconnected", S.DOWN),
    (S.DOWN, "disconnected"): ("_on_disconnected", S.DOWN),
}
EVENTS = ("connected", "hello", "auth", "message", "disconnected")


class Delivered:
    """A message from the partner, in order, exactly once within the session."""
    __slots__ = ("type", "flags", "resource", "tag", "payload")

    def __init__(self, type, flags, resource, tag, payload):
        self.type = type
        self.flags = flags
        self.resource = resource
        self.tag = tag
        self.payload = payload


def unpack_body(msg, fmt, exact=True):
    """Unpack a fixed-size body (or head, exact=False) with its struct; LinkProtocolError if it is
    short (or long): a malformed message from the peer resets the session, like any other."""
    size = len(msg.payload)
    if size < fmt.size or (exact and size != fmt.size):
        raise LinkProtocolError(f"message type {msg.type} of {size} bytes, expected {fmt.size}")
    return fmt.unpack_from(msg.payload)


class PeerHello:
    __slots__ = ("controller_id", "generation", "capabilities", "features", "mode",
                 "block_size_bytes", "primary_blocks")


class OutFrame:
    """A message on its way out: queued, then sent (numbered, stamped) and kept until acknowledged."""
    __slots__ = ("seq", "lane", "type", "flags", "resource", "tag", "payload", "size", "sent_ms")

    def __init__(self, lane, type, flags, resource, tag, payload, size):
        self.seq = 0
        self.lane = lane
        self.type = type
        self.flags = flags
        self.resource = resource
        self.tag = tag
        self.payload = payload        # bytes-like, or a tuple of them
        self.size = size
        self.sent_ms = 0


class LinkSession:
    """One controller's end of the link. `reliable_transport` skips retransmission (sockets)."""

    def __init__(self, controller_id, pair_id, key, *, mode=0, generation=1,
                 capabilities=M.CAP_MIRROR | M.CAP_FORWARD_IO, block_size_bytes=0,
                 primary_blocks=0, reliable_transport=True, data_window_bytes=1 << 20,
                 heartbeat_interval_ms=100, heartbeat_timeout_ms=1000, rto_ms=250,
                 unacked_max=65536, ack_every=16, auth_failures_max=AUTH_FAILURES_MAX,
                 auth_failure_window_ms=AUTH_FAILURE_WINDOW_MS):
        assert len(key) >= 16, "pairing key too short"
        self.controller_id = controller_id
        self.pair_id = pair_id
        self.key = key
        self.mode = mode
        self.generation = generation
        self.capabilities = capabilities
        self.block_size_bytes = block_size_bytes
        self.primary_blocks = primary_blocks
        self.reliable_transport = reliable_transport
        self.data_window_bytes = data_window_bytes
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.rto_ms = rto_ms
        self.unacked_max = unacked_max
        self.ack_every = ack_every      # explicit acks after this many frames without a reply
        self.state = S.DOWN
        self.peer = None
        self.now_ms = 0
        self.stats = collections.Counter()
        self.auth = FrameAuth(key, controller_id, reliable_transport, self.stats,
                              auth_failures_max, auth_failure_window_ms)
        self._reset_session()

    # -- session state ------------------------------------------------------

    def _reset_session(self):
        self.tx_seq = 0
        self.rx_expected = 0
        self.unacked = collections.deque()   # OutFrames sent, not yet acknowledged
        self.data_inflight_bytes = 0
        self.control_queue = collections.deque()
        self.data_queue = collections.deque()
        self.out = []
        self.need_ack = False
        self._ack_now = False       # an explicit ack is due regardless of ack_every
        self.acked_sent = 0         # rx_expected as of the last frame we sent
        self.nonce = b""
        self.peer_nonce = b""
        self.hello_body = b""       # our HELLO as sent and the peer's as received: the session's
        self.peer_hello_body = b""  # keys cover both
        self.last_rx_ms = 0
        self.heard_ms = -1 << 62     # send time of our newest frame the partner acknowledged
        self.last_tx_heartbeat_ms = 0
        self.last_progress_ms = 0
        self.last_retransmit_ms = -1 << 62
        self.connected_ms = 0
        self.auth.reset()

    def _fire(self, event, *args):
        try:
            handler, next_state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise LinkProtocolError(f"{event} not allowed in state {self.state}") from None
        result = getattr(self, handler)(*args)
        self.state = next_state
        return result

    @property
    def up(self) -> bool:
        return self.state == S.UP

    def connected(self, nonce: bytes, now_ms: int):
        """A transport to the partner exists: start the handshake."""
        assert len(nonce) == M.NONCE_BYTES
        self._fire("connected", nonce, now_ms)

    def disconnected(self):
        self._fire("disconnected")

    def _on_connected(self, nonce, now_ms):
        self._reset_session()
        self.nonce = nonce
        self.now_ms = now_ms
        self.last_rx_ms = self.last_tx_heartbeat_ms = self.last_progress_ms = self.connected_ms = now_ms
        body = M.Hello.build(dict(
            protocol_min=PROTOCOL_VERSION, protocol_max=PROTOCOL_VERSION,
            controller_id=self.controller_id, mode=self.mode, generation=self.generation,
            capabilities=self.capabilities, features=0, pair_id=self.pair_id, nonce=nonce,
            block_size_bytes=self.block_size_bytes, primary_blocks=self.primary_blocks,
            reserved=bytes(16)))
        self.hello_body = body
        self.send(M.MsgType.HELLO, M.Resource.SESSION, body, lane=F.LANE_CONTROL)

    def _on_disconnected(self):
        self.peer = None
        self._reset_session()

    def _mac(self, first_nonce, second_nonce, controller_id):
        return hmac.new(self.key, AUTH_LABEL + first_nonce + second_nonce + bytes([controller_id]),
                        hashlib.sha256).digest()

    def _on_hello(self, payload):
        hello = M.parse_body_untrusted(M.MsgType.HELLO, payload, "HELLO")
        if not hello.protocol_min <= PROTOCOL_VERSION <= hello.protocol_max:
            raise LinkProtocolError(f"peer speaks protocol {hello.protocol_min}..{hello.protocol_max}")
        if hello.pair_id != self.pair_id:
            raise LinkProtocolError(f"peer belongs to pair {hello.pair_id.hex()}, not {self.pair_id.hex()}")
        if hello.controller_id != 1 - self.controller_id:
            raise LinkProtocolError(f"peer claims controller id {hello.controller_id}")
        if hello.mode != self.mode:
            raise LinkProtocolError(f"peer runs mode {hello.mode}, this controller mode {self.mode}")
        peer = PeerHello()
        for name in PeerHello.__slots__:
            setattr(peer, name, hello[name])
        self.peer = peer
        self.peer_nonce = hello.nonce
        self.peer_hello_body = bytes(payload)
        self.auth.start(self.hello_body, self.peer_hello_body)     # every frame from here on carries a MAC
        mac = self._mac(self.peer_nonce, self.nonce, self.controller_id)
        self.send(M.MsgType.AUTH, M.Resource.SESSION, mac, lane=F.LANE_CONTROL)

    def _on_auth(self, payload):
        auth = M.parse_body_untrusted(M.MsgType.AUTH, payload, "AUTH")
        expected = self._mac(self.nonce, self.peer_nonce, self.peer.controller_id)
        if not hmac.compare_digest(auth.hmac, expected):
            raise LinkProtocolError("peer failed authentication: it does not hold the pair's key")

    def _on_message(self, delivered):
        if delivered.type == M.MsgType.HEARTBEAT:
            self.stats["heartbeats_received"] += 1
            return None
        return delivered

    # -- sending ------------------------------------------------------------

    def send(self, msg_type, resource, payload=b"", *, lane=F.LANE_DATA, tag=0, flags=0):
        """Queue a message; it goes out at the next take_output(), control lane first.

        `payload` is a bytes-like object or a tuple of them (a block's data views the NVRAM
        mapping until the frame is encoded: each frame is one buffer, see _encode).
        """
        size = sum(map(len, payload)) if type(payload) is tuple else len(payload)
        entry = OutFrame(lane, msg_type, flags, resource, tag, payload, size)
        (self.control_queue if lane == F.LANE_CONTROL else self.data_queue).append(entry)

    def _emit(self, entry):
        seq = self.tx_seq
        if seq >= SEQ_LIMIT:
            raise LinkProtocolError("sequence space exhausted; session must restart")
        self.tx_seq = seq + 1
        entry.seq = seq
        entry.sent_ms = self.now_ms
        self._encode(entry)
        if len(self.unacked) >= self.unacked_max:
            raise LinkProtocolError("peer stopped acknowledging frames")
        self.unacked.append(entry)
        if entry.lane == F.LANE_DATA:
            self.data_inflight_bytes += entry.size

    def _encode(self, entry, extra_flags=0):
        seq, lane, type, flags, resource, tag, payload, size = (entry.seq, entry.lane, entry.type, entry.flags,
                                                                 entry.resource, entry.tag, entry.payload,
                                                                 entry.size)
        # HELLOs go without a MAC: they carry the nonces the keys come from.
        sealed = self.auth.keyed and type != M.MsgType.HELLO
        if sealed:
            extra_flags |= F.FLAG_AUTH
        header = F.HEADER_STRUCT.pack(F.FRAME_MAGIC, F.FRAME_VERSION, type, flags | extra_flags,
                                      lane, resource, seq, self.rx_expected, tag, size, 0)
        # One buffer per frame: the 4 KiB copy out of NVRAM costs less than carrying
        # four small buffers per frame through the send queue and sendmsg's iovec.
        parts = (header, *payload) if payload.__class__ is tuple else (header, payload)
        if sealed:
            parts = (*parts, self.auth.seal(parts))      # a retransmission gets a new counter
        crc = 0
        for part in parts:
            crc = _crc32c(part, crc)
        self.out.append(b"".join((*parts, F.TRAILER_STRUCT.pack(crc))))    # one copy of the payload
        self.need_ack = self._ack_now = False
        self.acked_sent = self.rx_expected
        self.stats["frames_sent"] += 1

    def take_output(self) -> list:
        """All buffers to transmit now: control frames, then data frames within the window."""
        if self.state == S.DOWN:
            self.control_queue.clear()
            self.data_queue.clear()
            return []
        while self.control_queue:
            self._emit(self.control_queue.popleft())
        while self.data_queue and self.data_inflight_bytes < self.data_window_bytes:
            self._emit(self.data_queue.popleft())
        if self.need_ack and (self.rx_expected - self.acked_sent >= self.ack_every or self._ack_now):
            self._encode(OutFrame(F.LANE_CONTROL, 0, 0, M.Resource.SESSION, 0, b"", 0), F.FLAG_ACK_ONLY)
        out, self.out = self.out, []
        return out

    # -- receiving ----------------------------------------------------------

    def receive(self, frame, now_ms):
        """Take one whole frame from the framer; return a Delivered message or None."""
        head, payload = F.parse_frame_untrusted(frame, "link")
        self.now_ms = now_ms
        if self.state != S.UP:
            self.last_rx_ms = now_ms     # in the handshake a good CRC is all a frame can show
        try:
            if not self.auth.check(frame, head, now_ms, handshake=self.state != S.UP):
                return None              # dropped whole: its ack and seq are not looked at
        except AuthFailed as exc:
            raise LinkProtocolError(str(exc)) from None
        self.last_rx_ms = now_ms
        progressed = self._take_ack(head.ack, now_ms)
        if head.flags & F.FLAG_ACK_ONLY:
            if head.type == M.MsgType.HEARTBEAT:
                self.stats["heartbeats_received"] += 1
            if not progressed and self.unacked and not self.reliable_transport:
                self._fast_retransmit(now_ms)
            return None
        if head.seq > self.rx_expected and self.reliable_transport:
            # A reliable stream never loses a frame; a gap means bytes were corrupted
            # and skipped by the framer. Start a new session (and a resync).
            raise LinkProtocolError(f"frame {self.rx_expected} lost on a reliable transport")
        if head.seq != self.rx_expected:
            # A duplicate (already delivered) or a gap (a frame was lost): drop it and
            # re-announce what we expect, so the sender's go-back-N fills the gap.
            self.stats["frames_out_of_order"] += 1
            self.need_ack = self._ack_now = True
            return None
        self.rx_expected += 1
        self.need_ack = True
        if head.type == M.MsgType.HELLO:
            return self._fire("hello", payload)
        if head.type == M.MsgType.AUTH:
            return self._fire("auth", payload)
        return self._fire("message", Delivered(head.type, head.flags, head.resource, head.tag, payload))

    def _fast_retransmit(self, now_ms):
        """An explicit ack that moves nothing: the peer saw a gap. Go back now, not at the timeout."""
        quarter = self.rto_ms // 4
        if now_ms - self.last_retransmit_ms < quarter or now_ms - self.unacked[0].sent_ms < quarter:
            return
        self.last_retransmit_ms = self.last_progress_ms = now_ms
        self.stats["fast_retransmits"] += 1
        for entry in self.unacked:
            self._encode(entry)

    def _take_ack(self, ack, now_ms):
        unacked = self.unacked
        if ack > self.tx_seq:
            raise LinkProtocolError(f"peer acknowledged frame {ack} never sent (next is {self.tx_seq})")
        if not unacked or unacked[0].seq >= ack:
            return False
        while unacked and unacked[0].seq < ack:
            entry = unacked.popleft()
            self.heard_ms = entry.sent_ms     # the partner has heard from us as of this send time
            if entry.lane == F.LANE_DATA:
                self.data_inflight_bytes -= entry.size
            self.last_progress_ms = now_ms
        return True

    # -- time ---------------------------------------------------------------

    def tick(self, now_ms):
        """Heartbeats, dead-peer detection and retransmission. Raises LinkProtocolError on timeout."""
        self.now_ms = now_ms
        if self.state == S.DOWN:
            return
        if now_ms - self.last_rx_ms > self.heartbeat_timeout_ms:
            raise LinkProtocolError(f"peer silent for {now_ms - self.last_rx_ms} ms")
        if self.state != S.UP and now_ms - self.connected_ms > 2 * self.heartbeat_timeout_ms:
            # Frames carry no session id: on a lossy line a stale ack from the last session can
            # acknowledge our new HELLO, which is then never resent while the peer still waits
            # for it, and both sides keep talking (seed 8709 at 300 steps: stuck for a minute).
            raise LinkProtocolError(f"handshake not finished in {now_ms - self.connected_ms} ms")
        if (self.reliable_transport and self.unacked
                and now_ms - self.unacked[0].sent_ms > self.heartbeat_timeout_ms):
            # A reliable transport never loses a frame, so one the peer does not acknowledge while it
            # still talks was cut out on the way (a CRC the framer dropped): nothing would ever
            # resend it, so the session starts over (a resync follows). Seen in the simulator (seed
            # 641): a lost SYNC_DONE answer left the owner resyncing forever under live heartbeats.
            raise LinkProtocolError(f"frame {self.unacked[0].seq} unacknowledged for "
                                    f"{now_ms - self.unacked[0].sent_ms} ms while the peer talks")
        if self.need_ack:
            self._ack_now = True      # idle receiver: acknowledge what came in since the last frame
        if self.up and now_ms - self.last_tx_heartbeat_ms >= self.heartbeat_interval_ms:
            self.last_tx_heartbeat_ms = now_ms
            body = HEARTBEAT_STRUCT.pack(self.generation, now_ms, 0, bytes(7))
            entry = OutFrame(F.LANE_CONTROL, M.MsgType.HEARTBEAT, 0, M.Resource.SESSION, 0, body, len(body))
            entry.sent_ms = now_ms
            if self.unacked or self.control_queue or self.data_queue:
                # Heartbeats carry no sequence number (like an ack): on a lossy line they must
                # not join the go-back-N backlog, or a lossy link grows it without bound.
                self._encode(entry, F.FLAG_ACK_ONLY)
            else:
                # Idle: a sequenced heartbeat (a backlog of one at most), whose ack moves
                # heard_ms, the owner's link lease; with no frame to ack, an idle owner's
                # lease ran out and it held every request from then on.
                self._emit(entry)
        if (not self.reliable_transport and self.unacked
                and now_ms - self.last_progress_ms >= self.rto_ms):
            self.last_progress_ms = now_ms
            self.stats["retransmits"] += len(self.unacked)
            for entry in self.unacked:
                self._encode(entry)


__all__ = ["LinkSession", "LinkProtocolError", "unpack_body", "SessionState", "TRANSITIONS", "EVENTS",
           "Delivered", "FormatError"]
