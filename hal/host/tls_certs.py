"""Throwaway x509 certificates for a local pair's NBD port (`pair up --tls`).

Owns making a CA, a server certificate and a client certificate, laid out the
way QEMU's tls-creds-x509 and libnbd's tls-certificates= expect a directory:

    DIR/tls/client/ca-cert.pem, client-cert.pem, client-key.pem   (hand to clients)
    DIR/tls/server/ca-cert.pem, server-cert.pem, server-key.pem   (the controllers' [nbd])

Made with the `cryptography` library rather than the `openssl` command: it is
already a dependency (the `board` extra signs bundles with it), it needs no
config file for subject alternative names or key usages, and errors are
exceptions, not exit codes and stderr to parse. The CA's key is never written
down: nobody can sign another certificate for this pair afterwards.

RSA 2048 with digitalSignature + keyEncipherment on the leaves, as QEMU's own
documentation makes them: QEMU checks the key usage of the certificates it
loads. The server certificate names localhost, 127.0.0.1 and ::1 (libnbd
checks the name "localhost" for nbds+unix:// URIs; QEMU takes tls-hostname).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib

VALID_DAYS = 3650
SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1", "::1")


def _imports():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise RuntimeError("certificates need the cryptography package (pip install '.[board]')") from exc
    return x509, hashes, serialization, rsa, ExtendedKeyUsageOID, NameOID


def _key():
    _x509, _h, _s, rsa, _e, _n = _imports()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _builder(subject, issuer, public_key, days=VALID_DAYS):
    x509, _h, _s, _r, _e, NameOID = _imports()
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def make_ca(name: str):
    """(key, certificate) of a self-signed CA."""
    x509, hashes, *_ = _imports()
    key = _key()
    cert = (_builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(ca_key, ca_cert, name: str, server: bool):
    """(key, certificate) for a server (with the loopback names) or a client, signed by the CA."""
    x509, hashes, _s, _r, EKU, NameOID = _imports()
    key = _key()
    issuer = ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    builder = (_builder(name, issuer, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=True, data_encipherment=False, key_agreement=False,
                                            key_cert_sign=False, crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH if server else EKU.CLIENT_AUTH]),
                              critical=False))
    if server:
        names = [x509.DNSName(n) for n in SERVER_NAMES]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in SERVER_ADDRESSES]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _write_pem(path: pathlib.Path, obj, private=False):
    _x, _h, serialization, *_ = _imports()
    if private:
        data = obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))


def create_tls_dir(directory, ca_name="twincache pair CA") -> dict:
    """Make the client and server directories under `directory` (kept if they exist); their paths."""
    d = pathlib.Path(directory)
    paths = tls_paths(d)
    if all(pathlib.Path(p).exists() for p in paths.values() if p.endswith(".pem")):
        return paths
    (d / "client").mkdir(parents=True, exist_ok=True)
    (d / "server").mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(ca_name)
    server_key, server_cert = make_leaf(ca_key, ca_cert, "twincache controller", server=True)
    client_key, client_cert = make_leaf(ca_key, ca_cert, "twincache client", server=False)
    for sub in ("client", "server"):
        _write_pem(d / sub / "ca-cert.pem", ca_cert)
    _write_pem(d / "server" / "server-cert.pem", server_cert)
    _write_pem(d / "server" / "server-key.pem", server_key, private=True)
    _write_pem(d / "client" / "client-cert.pem", client_cert)
    _write_pem(d / "client" / "client-key.pem", client_key, private=True)
    return paths


def tls_paths(d: pathlib.Path) -> dict:
    return {"client_dir": str(d / "client"), "server_dir": str(d / "server"),
            "ca": str(d / "server" / "ca-cert.pem"), "cert": str(d / "server" / "server-cert.pem"),
            "key": str(d / "server" / "server-key.pem"),
            "client_ca": str(d / "client" / "ca-cert.pem"), "client_cert": str(d / "client" / "client-cert.pem"),
            "client_key": str(d / "client" / "client-key.pem")}


def client_options(client_dir: str, socket_path: str, export: str) -> dict:
    """How qemu and libnbd tools reach `export` over TLS with the client directory."""
    from urllib.parse import quote
    uri = (f"nbds+unix:///{quote(export, safe='')}?socket={quote(socket_path, safe='/')}"
           f"&tls-certificates={quote(client_dir, safe='/')}")
    return {
        "qemu_object": f"tls-creds-x509,id=tls0,dir={client_dir},endpoint=client",
        "qemu_image_opts": (f"driver=nbd,server.type=unix,server.path={socket_path},export={export},"
                            f"tls-creds=tls0,tls-hostname=localhost"),
        "uri": uri,
    }
