"""The [nbd] configuration section: defaults, every key, and clear errors."""
import pytest

from hal.runtime import config as C

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


# -- TLS ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Real certificates from `pair up --tls`'s generator: DIR/server and DIR/client."""
    from hal.host.tls_certs import create_tls_dir
    return create_tls_dir(tmp_path_factory.mktemp("tls"))


def test_tls_is_off_by_default():
    n = load()
    assert (n.tls, n.tls_cert, n.tls_key, n.tls_ca, n.tls_verify_client) == ("off", "", "", "", False)


@pytest.mark.parametrize("mode", ["allow", "require"])
def test_tls_with_real_certificates(certs, mode):
    n = load(tls=mode, tls_cert=certs["cert"], tls_key=certs["key"], tls_ca=certs["ca"], tls_verify_client=True)
    assert (n.tls, n.tls_cert, n.tls_verify_client) == (mode, certs["cert"], True)


def test_tls_mode_must_be_known():
    with pytest.raises(C.ConfigError, match=r"\[nbd\] tls = 'on': choose one of off, allow, require"):
        load(tls="on")


def test_tls_on_without_a_certificate_is_refused():
    with pytest.raises(C.ConfigError, match="tls_cert is not set"):
        load(tls="require")


def test_tls_missing_files_are_named(certs, tmp_path):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(C.ConfigError, match=f"tls_cert '{missing}': no such file"):
        load(tls="require", tls_cert=missing, tls_key=certs["key"])
    with pytest.raises(C.ConfigError, match=f"tls_key '{missing}': no such file"):
        load(tls="require", tls_cert=certs["cert"], tls_key=missing)
    with pytest.raises(C.ConfigError, match=f"tls_ca '{missing}': no such file"):
        load(tls="allow", tls_cert=certs["cert"], tls_key=certs["key"], tls_ca=missing)


def test_tls_unreadable_or_wrong_key_is_refused(certs, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(C.ConfigError, match="cannot load the pair"):
        load(tls="require", tls_cert=certs["cert"], tls_key=str(garbage))
    with pytest.raises(C.ConfigError, match="cannot load the pair"):       # the client's key
        load(tls="require", tls_cert=certs["cert"], tls_key=certs["client_key"])
    with pytest.raises(C.ConfigError, match="tls_ca .*not a PEM certificate"):
        load(tls="require", tls_cert=certs["cert"], tls_key=certs["key"], tls_ca=str(garbage))


def test_tls_verify_client_needs_a_ca_and_tls_on(certs):
    with pytest.raises(C.ConfigError, match="tls_verify_client = true needs tls_ca"):
        load(tls="require", tls_cert=certs["cert"], tls_key=certs["key"], tls_verify_client=True)
    with pytest.raises(C.ConfigError, match="tls_verify_client = true needs tls = "):
        load(tls_verify_client=True)
