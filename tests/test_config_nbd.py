"""The [nbd] configuration section: defaults, every key, and clear errors."""
import pytest

from hal import config as C

BASE = {
    "controller": {"name": "a", "pair_id": "00" * 16},
    "disks": {"paths": ["d0.img"]},
}


def load(**nbd):
    return C.from_dict(dict(BASE, nbd=dict({"unix": "nbd.sock"}, **nbd)), "test.toml").nbd


def test_defaults():
    n = load()
    assert (n.max_connections, n.max_connections_per_client, n.max_inflight, n.max_output_mib,
            n.handshake_timeout_ms) == (64, 0, 128, 32, 10_000)


def test_every_key():
    n = load(max_connections=8, max_connections_per_client=2, max_inflight=16, max_output_mib=16,
             handshake_timeout_ms=500)
    assert (n.max_connections, n.max_connections_per_client, n.max_inflight, n.max_output_mib,
            n.handshake_timeout_ms) == (8, 2, 16, 16, 500)


@pytest.mark.parametrize("key,value", [
    ("max_connections", 0), ("max_connections_per_client", -1), ("handshake_timeout_ms", 10),
    ("max_output_mib", 2), ("max_inflight", 0), ("max_inflight", 5000), ("handshake_timeout_ms", "10s"),
])
def test_bad_values_refused(key, value):
    with pytest.raises(C.ConfigError, match=key):
        load(**{key: value})
