"""The [replica] configuration section: defaults, every key, and clear errors."""
import pytest

from hal.runtime import config as C

BASE = {
    "controller": {"name": "b", "mode": "replica", "pair_id": "00" * 16},
    "disks": {"paths": ["d0.img"]},
    "nbd": {"unix": "nbd.sock"},
}


def load(**replica):
    return C.from_dict(dict(BASE, replica=replica), "test.toml")


def test_defaults():
    r = load().replica
    assert (r.variant, r.primary, r.ack, r.range_size_bytes, r.resync_rate_bytes_s, r.auto_promote_after_ms) == (
        "bitmap", "a", "cache", 64 << 10, 0, 0)


def test_every_key():
    r = load(variant="bitmap", primary="b", ack="disk", range_size="1M", resync_rate="50M",
             resync_inflight_max=4, auto_promote_after_ms=5000).replica
    assert (r.primary, r.ack, r.range_size_bytes, r.resync_rate_bytes_s, r.resync_inflight_max,
            r.auto_promote_after_ms) == ("b", "disk", 1 << 20, 50 << 20, 4, 5000)


@pytest.mark.parametrize("replica,message", [
    (dict(variant="log", role="destination"), "needs at least one"),
    (dict(variant="log", role="middle"), "choose one of source, destination"),
    (dict(cp_interval_ms=0), "cp_interval_ms must be positive"),
    (dict(sources=[dict(pair_id="00" * 16, key_file="k", link_path="l", images=[0], journal=1)]),
     "belongs to a log-variant destination"),
    (dict(variant="log", role="destination", sources=[dict(pair_id="xx", key_file="k", link_path="l")]),
     "pair_id must be 32 hex digits"),
    (dict(variant="log", role="destination", sources=[dict(pair_id="00" * 16, key_file="k", link_path="l",
                                                            images=[0], journal=0)]), "used twice"),
    (dict(variant="log", role="destination", sources=[dict(pair_id="00" * 16, key_file="k", link_path="l",
                                                            images=[5], journal=0)]), "not one of"),
    (dict(variant="drbd"), "choose one of bitmap, log"),
    (dict(ack="wire"), "choose one of cache, nvram, disk"),
    (dict(range_size="3K"), "power of two"),
    (dict(range_size="8M"), "power of two"),
    (dict(resync_inflight_max=0), "resync_inflight_max"),
    (dict(bitmap="yes"), "unknown key"),
])
def test_bad_values_name_the_key(replica, message):
    with pytest.raises(C.ConfigError, match=message):
        load(**replica)


def test_runtime_settings_follow_the_config():
    from hal.runtime.loop import replica_settings
    cfg = load(primary="b", ack="nvram", resync_rate="1M")
    s = replica_settings(cfg)
    assert (s.initial_primary, s.ack_level, s.resync_rate_bytes_s, s.variant) == (1, 1, 1 << 20, "bitmap")
    assert s.new_uuid() != s.new_uuid() and s.new_uuid() & 1


def test_log_destination_with_sources():
    doc = dict(BASE, disks={"paths": ["i0.img", "i1.img", "j.img"]},
               replica=dict(variant="log", role="destination",
                            sources=[dict(name="east", pair_id="11" * 16, key_file="k", link_path="l.sock",
                                          images=[0, 1], journal=2)]))
    r = C.from_dict(doc, "t.toml").replica
    (src,) = r.sources
    assert (r.variant, r.role, src.name, src.images, src.journal, src.pair_id) == (
        "log", "destination", "east", [0, 1], 2, bytes.fromhex("11" * 16))
    # and it survives the round trip through dump() (inline tables)
    again = C.from_dict(__import__("tomllib").loads(C.dump(doc)), "t.toml").replica
    assert again.sources == r.sources
