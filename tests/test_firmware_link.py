"""The link session (sans-IO): its state table, authentication, lanes, reliability."""
import itertools

import pytest

from firmware.formats import frame as F
from firmware.formats import messages as M
from firmware.link import EVENTS, TRANSITIONS, LinkProtocolError, LinkSession, SessionState as S
from fixtures.mempair import PAIR_ID, split_frames

KEY = bytes(range(32))


def session(cid, key=KEY, pair_id=PAIR_ID, **kw):
    return LinkSession(cid, pair_id, key, block_size_bytes=4096, primary_blocks=16, **kw)


def pump(a, b, now=0, rounds=10):
    """Carry every frame each way until both are quiet; return what b and a delivered."""
    got = {id(a): [], id(b): []}
    for _ in range(rounds):
        moved = False
        for src, dst in ((a, b), (b, a)):
            for frame in split_frames(src.take_output()):
                moved = True
                msg = dst.receive(frame, now)
                if msg is not None:
                    got[id(dst)].append(msg)
        if not moved:
            break
    return got[id(a)], got[id(b)]


def up_pair(**kw):
    a, b = session(0, **kw), session(1, **kw)
    a.connected(b"\x01" * 32, 0)
    b.connected(b"\x02" * 32, 0)
    pump(a, b)
    assert a.up and b.up
    return a, b


def session_in(state):
    """A session driven into `state`, and a peer able to feed it the next frames."""
    a, b = session(0), session(1)
    if state == S.DOWN:
        return a, b
    a.connected(b"\x01" * 32, 0)
    b.connected(b"\x02" * 32, 0)
    if state == S.HELLO_SENT:
        return a, b
    hello_from_b = split_frames(b.take_output())[0]
    a.receive(hello_from_b, 0)
    assert a.state == S.AUTH_SENT
    if state == S.AUTH_SENT:
        b.receive(split_frames(a.take_output())[0], 0)          # b sees a's HELLO, sends AUTH
        return a, b
    pump(a, b)
    assert a.state == S.UP
    return a, b


def to_a(a, msg_type, lane, resource, payload):
    """A frame from b as a expects it next: sealed with b's direction key once a holds the
    session's keys (a frame without a MAC would be dropped before the state table), so only
    the state decides."""
    auth = None
    if a.auth.keyed:
        key = F.derive_direction_key(KEY, a.hello_body, a.peer_hello_body, 1)     # b's, as b derives it
        auth = (F.mac_hasher(key), a.auth.rx_seq_last + 1)
    return b"".join(F.encode_frame(msg_type, 0, lane, resource, a.rx_expected, 0, 0, payload, auth=auth))


def fire(a, b, event):
    if event == "connected":
        a.connected(b"\x03" * 32, 0)
    elif event == "disconnected":
        a.disconnected()
    elif event == "hello":
        peer = session(1)
        peer.connected(b"\x04" * 32, 0)
        hello = split_frames(peer.take_output())[0]
        # Renumber it to the sequence a expects, so only the state decides.
        head, payload = F.parse_frame_untrusted(hello)
        a.receive(to_a(a, head.type, head.lane, head.resource, bytes(payload)), 0)
    elif event == "auth":
        b_out = split_frames(b.take_output())
        auth = [f for f in b_out if F.parse_header_untrusted(f).type == M.MsgType.AUTH]
        mac = bytes(F.parse_frame_untrusted(auth[0])[1]) if auth else bytes(32)
        a.receive(to_a(a, M.MsgType.AUTH, 0, 0, mac), 0)
    elif event == "message":
        a.receive(to_a(a, M.MsgType.PING, 0, M.Resource.ADMIN, M.PING_STRUCT.pack(1)), 0)


@pytest.mark.parametrize("state,event", list(itertools.product(
    [S.DOWN, S.HELLO_SENT, S.AUTH_SENT, S.UP], EVENTS)))
def test_every_state_and_event_pair(state, event):
    a, b = session_in(state)
    if (state, event) in TRANSITIONS:
        fire(a, b, event)
        assert a.state == TRANSITIONS[(state, event)][1]
    else:
        with pytest.raises(LinkProtocolError):
            fire(a, b, event)


def test_wrong_key_is_refused_by_the_side_that_checks():
    a, b = session(0), session(1, key=bytes(32))
    a.connected(b"\x01" * 32, 0)
    b.connected(b"\x02" * 32, 0)
    with pytest.raises(LinkProtocolError, match="does not hold the pair's key"):
        pump(a, b)
    assert not (a.up and b.up)


def test_peer_of_another_pair_is_refused():
    a, b = session(0), session(1, pair_id=bytes(16))
    a.connected(b"\x01" * 32, 0)
    b.connected(b"\x02" * 32, 0)
    with pytest.raises(LinkProtocolError, match="belongs to pair"):
        pump(a, b)


def test_control_frame_overtakes_megabytes_of_queued_bulk_data():
    """Reserved credit (claims 1.6): a control message never waits behind the data lane."""
    a, b = up_pair(data_window_bytes=256 << 10)
    block = bytes(4096)
    for i in range(12_800):                                    # 50 MiB of mirror data queued
        a.send(M.MsgType.MIRROR_WRITE, M.Resource.MIRROR, block)
    first = split_frames(a.take_output())
    assert sum(len(f) for f in first) < (256 << 10) + 8192     # the window bounds what goes out
    a.send(M.MsgType.PING, M.Resource.ADMIN, M.PING_STRUCT.pack(7), lane=F.LANE_CONTROL, tag=99)
    nxt = split_frames(a.take_output())
    assert nxt and F.parse_header_untrusted(nxt[0]).type == M.MsgType.PING
    assert F.parse_header_untrusted(nxt[0]).lane == F.LANE_CONTROL


def test_replayed_and_duplicated_frames_are_dropped():
    a, b = up_pair(reliable_transport=False)
    a.send(M.MsgType.PING, M.Resource.ADMIN, M.PING_STRUCT.pack(1), lane=F.LANE_CONTROL, tag=5)
    frame = split_frames(a.take_output())[0]
    assert b.receive(frame, 0).tag == 5
    assert b.receive(frame, 0) is None                          # the replay is not delivered again
    assert b.stats["auth_replays"] == 1                         # its MAC counter is not new
    assert b.stats["auth_failures"] == 0                        # a lossy line duplicates: no failure


def test_go_back_n_fills_a_gap_on_a_lossy_transport():
    a, b = up_pair(reliable_transport=False, rto_ms=50)
    for tag in range(5):
        a.send(M.MsgType.PING, M.Resource.ADMIN, M.PING_STRUCT.pack(tag), lane=F.LANE_CONTROL, tag=tag)
    frames = split_frames(a.take_output())
    delivered = [b.receive(f, 0) for i, f in enumerate(frames) if i != 1]   # frame 1 is lost
    assert [m.tag for m in delivered if m] == [0]
    a.tick(60)                                                  # retransmit after the timeout
    got = [b.receive(f, 60) for f in split_frames(a.take_output())]
    assert [m.tag for m in got if m] == [1, 2, 3, 4]


def test_a_gap_on_a_reliable_transport_resets_the_session():
    a, b = up_pair()
    for tag in range(3):
        a.send(M.MsgType.PING, M.Resource.ADMIN, M.PING_STRUCT.pack(tag), lane=F.LANE_CONTROL, tag=tag)
    frames = split_frames(a.take_output())
    with pytest.raises(LinkProtocolError, match="lost"):
        b.receive(frames[1], 0)


def test_a_frame_lost_last_on_a_reliable_transport_resets_the_session_under_live_heartbeats():
    """Seed 641: the last sequenced frame was cut out (a CRC the framer dropped); later heartbeats
    are unsequenced while it is unacked, so the peer sees no gap and keeps the session alive.
    The sender now gives up on a frame unacknowledged past the heartbeat timeout."""
    a, b = up_pair(heartbeat_interval_ms=100, heartbeat_timeout_ms=500)
    a.send(M.MsgType.PING, M.Resource.ADMIN, M.PING_STRUCT.pack(1), lane=F.LANE_CONTROL, tag=1)
    a.take_output()                                   # lost on the way
    with pytest.raises(LinkProtocolError, match="unacknowledged"):
        for now in range(0, 2000, 50):
            a.tick(now)
            b.tick(now)
            pump(a, b, now)
    assert b.up and now < 1000                        # the peer talked all along; a gave up in time


def test_silent_peer_times_out_and_heartbeats_keep_it_alive():
    a, b = up_pair(heartbeat_interval_ms=100, heartbeat_timeout_ms=500)
    for now in range(0, 2000, 50):
        a.tick(now)
        b.tick(now)
        pump(a, b, now)
    assert a.up and b.up and b.stats["heartbeats_received"] >= 15
    with pytest.raises(LinkProtocolError, match="silent"):
        a.tick(2600)


def test_an_idle_link_keeps_moving_heard_ms_the_owners_link_lease():
    # Heartbeats on an idle link are sequenced, so the peer's ack moves heard_ms; before,
    # an idle owner's link lease ran out and it held every host request from then on.
    a, b = up_pair(heartbeat_interval_ms=100, heartbeat_timeout_ms=500)
    for now in range(0, 3000, 10):
        a.tick(now)
        b.tick(now)
        pump(a, b, now)
    assert 2900 - 200 <= a.heard_ms <= 2990 and 2900 - 200 <= b.heard_ms <= 2990
    assert len(a.unacked) <= 1 and len(b.unacked) <= 1


def test_a_busy_link_sends_heartbeats_unsequenced():
    a, b = up_pair(heartbeat_interval_ms=100, heartbeat_timeout_ms=5000)
    for now in range(0, 1000, 10):
        a.send(M.MsgType.HEARTBEAT, M.Resource.SESSION, bytes(24), lane=F.LANE_CONTROL)   # queued traffic
        a.tick(now)
        a.take_output()                  # never delivered: the backlog stays
    heartbeats = [e for e in a.unacked if e.type == M.MsgType.HEARTBEAT and e.payload != bytes(24)]
    assert heartbeats == [], "a heartbeat joined the go-back-N backlog of a busy link"


def test_a_handshake_that_stalls_while_the_peer_talks_is_started_over():
    # Seed 8709 at 300 steps (lossy line): a stale ack of the last session acknowledged a's new
    # HELLO, which a then never resent; b, waiting for it, kept acknowledging a's AUTH as out of
    # order, so each heard the other and neither session ended. The handshake has a deadline.
    a, b = session(0, reliable_transport=False), session(1, reliable_transport=False)
    a.connected(b"\x01" * 32, 0)
    b.connected(b"\x02" * 32, 0)
    a.take_output()                                     # a's HELLO is lost on the line
    a.receive(split_frames(b.take_output())[0], 0)      # b's HELLO arrives: a sends AUTH
    assert (a.state, b.state) == (S.AUTH_SENT, S.HELLO_SENT)
    a.unacked.popleft()                                 # the stale ack: a's HELLO counts as delivered
    limit = 2 * a.heartbeat_timeout_ms
    now = 0
    with pytest.raises(LinkProtocolError, match="handshake not finished"):
        while now <= limit + 100:
            now += 50
            for src, dst in ((a, b), (b, a)):           # both keep talking: nobody is silent
                for frame in split_frames(src.take_output()):
                    dst.receive(frame, now)
            b.tick(now) if b.state != S.DOWN else None
            a.tick(now)
    assert now > limit
    assert b.state == S.HELLO_SENT                      # b never got a's HELLO


# -- per-frame authentication (firmware/link_auth.py) -------------------------------------

def with_crc(body) -> bytes:
    """A frame body with a CRC that matches it: what someone on the cable who knows the format sends."""
    body = bytes(body)
    return body + F.TRAILER_STRUCT.pack(F.crc32c(body))


def ping_frame(a, tag=1):
    a.send(M.MsgType.PING, M.Resource.ADMIN, M.PING_STRUCT.pack(tag), lane=F.LANE_CONTROL, tag=tag)
    (frame,) = split_frames(a.take_output())
    return frame


def test_every_frame_after_the_hellos_is_sealed_and_the_hellos_are_not():
    a, b = session(0), session(1)
    a.connected(b"\x01" * 32, 0)
    b.connected(b"\x02" * 32, 0)
    hello = split_frames(a.take_output())[0]
    assert not F.parse_header_untrusted(hello).flags & F.FLAG_AUTH
    b.receive(hello, 0)
    sent = []
    for _ in range(5):
        for src, dst in ((a, b), (b, a)):
            for frame in split_frames(src.take_output()):
                sent.append(F.parse_header_untrusted(frame))
                dst.receive(frame, 0)
    assert a.up and b.up
    assert [h.type for h in sent if not h.flags & F.FLAG_AUTH] == [M.MsgType.HELLO]       # b's
    assert {h.type for h in sent if h.flags & F.FLAG_AUTH} >= {M.MsgType.AUTH}
    assert b.receive(ping_frame(a), 0).tag == 1


def test_an_altered_frame_is_dropped_counted_and_never_delivered():
    a, b = up_pair()
    frame = bytearray(ping_frame(a, tag=7))
    frame[F.HEADER_SIZE_BYTES] ^= 0x01                     # one payload bit, CRC made to match
    assert b.receive(with_crc(frame[:-4]), 0) is None
    assert b.stats["auth_failures"] == 1 and b.rx_expected == 1 + 1    # HELLO, AUTH only
    assert b.up


def test_a_frame_stripped_of_its_mac_is_refused():
    a, b = up_pair()
    frame = ping_frame(a)
    head = F.parse_header_untrusted(frame)
    body = bytearray(frame[:F.HEADER_SIZE_BYTES + head.payload_len])
    body[4] &= ~F.FLAG_AUTH & 0xFF                           # the flag cleared, the trailer cut off
    assert b.receive(with_crc(body), 0) is None
    assert b.stats["auth_failures"] == 1
    assert b.receive(frame, 0).tag == 1                       # the genuine one still goes through


def test_a_forged_frames_ack_is_not_looked_at():
    a, b = up_pair()
    frame = bytearray(ping_frame(a))
    frame[12:16] = (1 << 30).to_bytes(4, "big")              # ack of frames b never sent: a protocol error if read
    assert b.receive(with_crc(frame[:-4]), 0) is None
    assert b.up and b.stats["auth_failures"] == 1


def test_frames_of_another_session_or_reflected_back_are_refused():
    a, b = up_pair()
    old = ping_frame(a)                                      # sealed with this session's a->b key
    assert a.receive(old, 0) is None                         # reflected to its sender: the other key
    a.disconnected()
    b.disconnected()
    a.connected(b"\x05" * 32, 0)
    b.connected(b"\x06" * 32, 0)
    pump(a, b)
    assert a.up and b.up
    assert b.receive(old, 0) is None                         # a frame of the last session
    assert a.stats["auth_failures"] == 1 and b.stats["auth_failures"] == 1


def test_a_replay_is_a_failure_on_a_socket_and_only_a_drop_on_a_lossy_line():
    for reliable, failures in ((True, 1), (False, 0)):
        a, b = up_pair(reliable_transport=reliable)
        first, second = ping_frame(a, 1), ping_frame(a, 2)
        assert b.receive(first, 0).tag == 1 and b.receive(second, 0).tag == 2
        assert b.receive(first, 0) is None                   # an old counter: replayed or reordered
        assert b.stats["auth_replays"] == 1 and b.stats["auth_failures"] == failures


def test_repeated_failures_within_the_window_end_the_session():
    a, b = up_pair(auth_failures_max=4, auth_failure_window_ms=1000)
    forged = bytearray(ping_frame(a))
    forged[-5] ^= 0xFF                                       # a MAC byte
    forged = with_crc(forged[:-4])
    for now in (0, 100, 200):
        assert b.receive(forged, now) is None
    with pytest.raises(LinkProtocolError, match="4 frames failed authentication"):
        b.receive(forged, 300)


def test_failures_spread_wider_than_the_window_are_only_counted():
    a, b = up_pair(auth_failures_max=4, auth_failure_window_ms=1000, heartbeat_timeout_ms=10 ** 6)
    forged = bytearray(ping_frame(a))
    forged[-5] ^= 0xFF
    forged = with_crc(forged[:-4])
    for now in range(0, 10_000, 400):                        # 4 in any 1.2 s: never 4 within 1 s
        assert b.receive(forged, now) is None
    assert b.up and b.stats["auth_failures"] == 25


def test_in_the_handshake_one_bad_mac_ends_it():
    a, b = session(0), session(1)
    a.connected(b"\x01" * 32, 0)
    b.connected(b"\x02" * 32, 0)
    a.receive(split_frames(b.take_output())[0], 0)           # b's HELLO: a is keyed, sends AUTH
    b.receive(split_frames(a.take_output())[0], 0)           # a's HELLO: b is keyed, sends AUTH
    auth = bytearray(split_frames(b.take_output())[0])
    auth[F.HEADER_SIZE_BYTES] ^= 0x01                        # b's AUTH altered on the way
    with pytest.raises(LinkProtocolError, match="does not hold the pair's key"):
        a.receive(with_crc(auth[:-4]), 0)


def test_a_sealed_frame_before_the_keys_exist_is_dropped_not_failed():
    """On a lossy line a's AUTH can overtake its HELLO: b, without keys yet, drops it as early
    (go-back-N sends it again) and counts no failure; the handshake then finishes."""
    a, b = session(0, reliable_transport=False, rto_ms=50), session(1, reliable_transport=False, rto_ms=50)
    a.connected(b"\x01" * 32, 0)
    b.connected(b"\x02" * 32, 0)
    hello_a = split_frames(a.take_output())[0]
    a.receive(split_frames(b.take_output())[0], 0)           # b's HELLO: a is keyed, sends AUTH
    (auth_a,) = split_frames(a.take_output())
    assert b.receive(auth_a, 0) is None                      # overtook a's HELLO
    assert b.stats["auth_early"] == 1 and b.stats["auth_failures"] == 0 and b.state == S.HELLO_SENT
    b.receive(hello_a, 10)
    a.tick(100)
    b.tick(100)
    pump(a, b, 100)
    assert a.up and b.up


def test_a_retransmitted_hello_after_the_keys_exist_is_dropped_not_failed():
    a, b = up_pair(reliable_transport=False)
    hello = session(0)
    hello.connected(b"\x01" * 32, 0)
    assert b.receive(split_frames(hello.take_output())[0], 0) is None
    assert b.stats["auth_stale_hellos"] == 1 and b.stats["auth_failures"] == 0 and b.up


def test_a_hello_field_altered_on_the_way_fails_the_handshake():
    """The AUTH covers only the nonces; the keys cover both HELLOs whole, so a generation (or
    geometry, capabilities...) changed on the way gives the ends different keys."""
    a, b = session(0), session(1)
    a.connected(b"\x01" * 32, 0)
    b.connected(b"\x02" * 32, 0)
    hello_b = bytearray(split_frames(b.take_output())[0])
    hello_b[F.HEADER_SIZE_BYTES + 11] ^= 0x01               # the low byte of b's generation
    a.receive(with_crc(hello_b[:-4]), 0)
    b.receive(split_frames(a.take_output())[0], 0)
    with pytest.raises(LinkProtocolError, match="HELLO was altered"):
        for frame in split_frames(b.take_output()):          # b's AUTH, sealed with b's key
            a.receive(frame, 0)
