"""Controller configuration: one TOML file per controller, validated on load.

    [controller]
    name = "a"                 # "a" (id 0) or "b" (id 1)
    mode = "ha"                # "ha" or "replica"
    pair_id = "<32 hex digits>"  # both controllers and every disk label carry it
    key_file = "DIR/pair.key"  # pre-shared pairing key, mode 0600
    state_dir = "DIR/a"        # pid file, control socket, events log

    [nvram]
    backend = "file"           # "file" or "dax"
    path = "DIR/a/nvram.img"   # file, /dev/daxX.Y or /dev/pmemX
    size = "64M"
    durability = "controller"  # "controller" or "host" (file backend)
    block_size = 4096          # cache line size in bytes

    [disks]
    backend = "file"           # "file" (files or block devices by path) or "serial" (/dev/sd* by serial)
    paths = ["DIR/disks/disk0.img", "DIR/disks/disk1.img"]   # one disk per LUN
    serials = []               # with backend = "serial"
    lun_size = "256M"
    direct = false             # O_DIRECT
    write_cache = "os"         # "os" (the kernel's) or "volatile": tests only, writes stay in the
                               # controller's memory until a flush (hal/backends/disk_volatile.py); or
                               # "ignore-flush" (needs TWINCACHE_TEST_FAULTS=1): a disk that lies
                               # about flushes, the destage benchmark's no-flush peer
    fault_files = false        # tests only (needs TWINCACHE_TEST_FAULTS=1): hal/backends/disk_faulty.py

    [link]
    transport = "unix"         # "unix", "tcp", "serial" (pyserial URL or tty) or "virtio" (fd I/O)
    listen = true              # unix/tcp: this end listens (controller a) or connects (b)
    path = "DIR/link.sock"     # unix
    address = "127.0.0.1:7100" # tcp
    device = "/dev/ttyS1"      # serial / virtio
    baud = 115200              # serial

    [nbd]
    unix = "DIR/a/nbd.sock"    # optional; one of unix / tcp at least
    tcp = "127.0.0.1:10809"    # optional
    max_connections = 64
    max_connections_per_client = 0  # per peer (TCP address, unix uid); 0 = max_connections
    max_inflight = 128         # requests in flight per connection
    max_output_mib = 32        # replies queued for a client that does not read them; then stop reading it
    handshake_timeout_ms = 10000  # a connection not through the handshake by then is closed (TLS included)
    tls = "off"                # "off", "allow" (STARTTLS offered) or "require" (no export without TLS)
    tls_cert = "DIR/tls/server/server-cert.pem"   # PEM server certificate (chain); needed unless tls = "off"
    tls_key = "DIR/tls/server/server-key.pem"     # its PEM private key, unencrypted
    tls_ca = "DIR/tls/server/ca-cert.pem"         # CA that signs client certificates
    tls_verify_client = false  # true: a client must present a certificate tls_ca signed

    [cache]                    # tuning, all optional
    high_watermark = 0.5       # start destaging above this dirty fraction
    low_watermark = 0.25       # stop destaging below it
    idle_flush_ms = 500        # destage everything after this long with no host I/O
    destage_inflight_max = 64
    heartbeat_interval_ms = 100
    heartbeat_timeout_ms = 1000
    degraded_after_ms = 30000  # a LUN whose destage writes fail this long goes degraded (writes get EIO)
    disk_retry_max_ms = 5000   # failed destage writes are retried after 200 ms, doubling up to this

    [replica]                  # mode = "replica" only; all optional
    variant = "bitmap"         # "bitmap" (cache-acknowledged, destage record, quick resync) or "log"
                               # (NVRAM-log shipping with consistency points)
    # bitmap variant:
    primary = "a"              # which controller starts as primary on a new pair
    ack = "cache"              # where the secondary holds a copy before the ack: "cache", "nvram", "disk"
    range_size = "64K"         # bytes of LUN per record bit
    resync_rate = 0            # bytes per second the resync may send; 0 = unlimited (sizes accepted)
    resync_inflight_max = 16   # ranges in flight during a resync
    auto_promote_after_ms = 0  # promote the secondary after this long without its peer; 0 = never
    # log variant:
    role = "source"            # "source" or "destination"
    source_id = 0              # source: its id at the destination
    cp_interval_ms = 2000      # source: a consistency point at least this often

    [metrics]                  # off unless listen is set
    listen = "127.0.0.1:9520"  # Prometheus text format at http://127.0.0.1:9520/metrics
    allow_remote = false       # true: listen may be a non-loopback address (metrics carry no
                               # secrets but name LUNs and load; prefer a proxy that authenticates)

    [[replica.sources]]        # log variant, destination: one table per source (fan-in)
    name = "a"                 # names the source's exports (a-lun0, ...) and its status
    source_id = 0
    pair_id = "<32 hex digits>"  # the source's pair id (its NVRAM, its link's HELLO)
    key_file = "DIR/pair.key"  # the key that source's link authenticates with
    link_path = "DIR/link.sock"  # this destination listens here for that source (or link_address)
    images = [0, 1]            # [disks] indexes of its image volumes, one per source LUN
    journal = 2                # [disks] index of the disk holding its file of requests

Sizes accept K, M, G suffixes (powers of 1024).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import tomllib


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the file and the key."""


_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.I)


def parse_size(value, what: str = "size") -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))
    else:
        raise ConfigError(f"{what}: {value!r} is not a size (like 256M)")
    if size <= 0:
        raise ConfigError(f"{what}: must be positive, got {value!r}")
    return size


@dataclasses.dataclass
class NvramConfig:
    backend: str = "file"
    path: str = ""
    size_bytes: int = 64 << 20
    durability: str = "controller"
    block_size_bytes: int = 4096


@dataclasses.dataclass
class DiskConfig:
    backend: str = "file"
    paths: list = dataclasses.field(default_factory=list)
    serials: list = dataclasses.field(default_factory=list)
    lun_size_bytes: int = 256 << 20
    direct: bool = False
    write_cache: str = "os"
    fault_files: bool = False


@dataclasses.dataclass
class LinkConfig:
    transport: str = "unix"
    listen: bool = True
    path: str = ""
    address: str = ""
    device: str = ""
    baud: int = 115200


@dataclasses.dataclass
class NbdConfig:
    unix: str = ""
    tcp: str = ""
    max_connections: int = 64
    max_connections_per_client: int = 0     # 0: only max_connections applies
    max_inflight: int = 128
    max_output_mib: int = 32
    handshake_timeout_ms: int = 10_000
    tls: str = "off"
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_verify_client: bool = False


@dataclasses.dataclass
class CacheConfig:
    high_watermark: float = 0.5
    low_watermark: float = 0.25
    idle_flush_ms: int = 500
    destage_inflight_max: int = 64
    heartbeat_interval_ms: int = 100
    heartbeat_timeout_ms: int = 1000
    degraded_after_ms: int = 30000
    disk_retry_max_ms: int = 5000


@dataclasses.dataclass
class SourceEntry:
    name: str
    source_id: int
    pair_id: bytes
    key_file: str
    link_path: str
    link_address: str
    images: list
    journal: int


@dataclasses.dataclass
class ReplicaConfig:
    variant: str = "bitmap"
    primary: str = "a"
    ack: str = "cache"
    range_size_bytes: int = 64 << 10
    resync_rate_bytes_s: int = 0
    resync_inflight_max: int = 16
    auto_promote_after_ms: int = 0
    role: str = "source"
    source_id: int = 0
    cp_interval_ms: int = 2000
    sources: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class MetricsConfig:
    listen: str = ""               # host:port; "" = no metrics server
    allow_remote: bool = False


@dataclasses.dataclass
class ControllerConfig:
    name: str
    controller_id: int
    mode: str
    pair_id: bytes
    key_file: str
    state_dir: str
    nvram: NvramConfig
    disks: DiskConfig
    link: LinkConfig
    nbd: NbdConfig
    cache: CacheConfig
    replica: ReplicaConfig = dataclasses.field(default_factory=ReplicaConfig)
    source: str = ""
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)

    @property
    def luns(self) -> int:
        return len(self.disks.paths or self.disks.serials)


def _section(doc: dict, name: str, where: str) -> dict:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return value


def _take(section: dict, key: str, kind, default, where: str):
    if key not in section:
        return default
    value = section[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} = {value!r} must be {kind.__name__}")
    return value


def _choice(value: str, choices: tuple, what: str) -> str:
    if value not in choices:
        raise ConfigError(f"{what} = {value!r}: choose one of {', '.join(choices)}")
    return value


def load(path) -> ControllerConfig:
    path = pathlib.Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(doc, str(path))


def from_dict(doc: dict, where: str = "<config>") -> ControllerConfig:
    known = {"controller", "nvram", "disks", "link", "nbd", "cache", "replica", "metrics"}
    if unknown := set(doc) - known:
        raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}")
    c = _section(doc, "controller", where)
    name = _choice(_take(c, "name", str, "", where), ("a", "b"), f"{where}: [controller] name")
    mode = _choice(_take(c, "mode", str, "ha", where), ("ha", "replica"), f"{where}: [controller] mode")
    pair_hex = _take(c, "pair_id", str, "", where)
    if not re.fullmatch(r"[0-9a-fA-F]{32}", pair_hex):
        raise ConfigError(f"{where}: [controller] pair_id must be 32 hex digits")
    n = _section(doc, "nvram", where)
    nvram = NvramConfig(
        backend=_choice(_take(n, "backend", str, "file", where), ("file", "dax"), f"{where}: [nvram] backend"),
        path=_take(n, "path", str, "", where),
        size_bytes=parse_size(n.get("size", "64M"), f"{where}: [nvram] size"),
        durability=_choice(_take(n, "durability", str, "controller", where), ("controller", "host"),
                           f"{where}: [nvram] durability"),
        block_size_bytes=_take(n, "block_size", int, 4096, where))
    d = _section(doc, "disks", where)
    disks = DiskConfig(
        backend=_choice(_take(d, "backend", str, "file", where), ("file", "serial"), f"{where}: [disks] backend"),
        paths=list(_take(d, "paths", list, [], where)), serials=list(_take(d, "serials", list, [], where)),
        lun_size_bytes=parse_size(d.get("lun_size", "256M"), f"{where}: [disks] lun_size"),
        direct=_take(d, "direct", bool, False, where),
        write_cache=_choice(_take(d, "write_cache", str, "os", where), ("os", "volatile", "ignore-flush"),
                            f"{where}: [disks] write_cache"),
        fault_files=_take(d, "fault_files", bool, False, where))
    if disks.fault_files and os.environ.get("TWINCACHE_TEST_FAULTS") != "1":
        raise ConfigError(f"{where}: [disks] fault_files is for tests: it needs TWINCACHE_TEST_FAULTS=1")
    if disks.write_cache == "ignore-flush" and os.environ.get("TWINCACHE_TEST_FAULTS") != "1":
        raise ConfigError(f'{where}: [disks] write_cache = "ignore-flush" loses data at a power cut; it is '
                          f"for benchmarks and tests and needs TWINCACHE_TEST_FAULTS=1")
    if not (disks.paths or disks.serials):
        raise ConfigError(f"{where}: [disks] needs paths (or serials) for at least one LUN")
    if disks.lun_size_bytes % 4096:
        raise ConfigError(f"{where}: [disks] lun_size must be a multiple of 4096")
    lk = _section(doc, "link", where)
    link = LinkConfig(
        transport=_choice(_take(lk, "transport", str, "unix", where), ("unix", "tcp", "serial", "virtio"),
                          f"{where}: [link] transport"),
        listen=_take(lk, "listen", bool, name == "a", where), path=_take(lk, "path", str, "", where),
        address=_take(lk, "address", str, "", where), device=_take(lk, "device", str, "", where),
        baud=_take(lk, "baud", int, 115200, where))
    nb = _section(doc, "nbd", where)
    nbd_defaults = NbdConfig()
    nbd = NbdConfig(unix=_take(nb, "unix", str, "", where), tcp=_take(nb, "tcp", str, "", where),
                    **{k: _take(nb, k, int, getattr(nbd_defaults, k), where)
                       for k in ("max_connections", "max_connections_per_client", "max_inflight",
                                 "max_output_mib", "handshake_timeout_ms")},
                    tls=_choice(_take(nb, "tls", str, "off", where), ("off", "allow", "require"),
                                f"{where}: [nbd] tls"),
                    tls_cert=_take(nb, "tls_cert", str, "", where), tls_key=_take(nb, "tls_key", str, "", where),
                    tls_ca=_take(nb, "tls_ca", str, "", where),
                    tls_verify_client=_take(nb, "tls_verify_client", bool, False, where))
    if not (nbd.unix or nbd.tcp):
        raise ConfigError(f"{where}: [nbd] needs unix or tcp")
    if (nbd.max_connections < 1 or nbd.max_connections_per_client < 0 or nbd.handshake_timeout_ms < 100
            or not 4 <= nbd.max_output_mib <= 1024 or not 1 <= nbd.max_inflight <= 4096):
        raise ConfigError(f"{where}: [nbd] needs max_connections >= 1, max_connections_per_client >= 0, "
                          f"handshake_timeout_ms >= 100, 4 <= max_output_mib <= 1024 and "
                          f"1 <= max_inflight <= 4096")
    _check_nbd_tls(nbd, where)
    ca = _section(doc, "cache", where)
    defaults = CacheConfig()
    cache = CacheConfig(**{f.name: _take(ca, f.name, type(getattr(defaults, f.name)), getattr(defaults, f.name), where)
                           for f in dataclasses.fields(CacheConfig)})
    if not 0 < cache.low_watermark < cache.high_watermark <= 1:
        raise ConfigError(f"{where}: [cache] need 0 < low_watermark < high_watermark <= 1")
    if cache.degraded_after_ms <= 0 or cache.disk_retry_max_ms < 200:
        raise ConfigError(f"{where}: [cache] need degraded_after_ms > 0 and disk_retry_max_ms >= 200")
    replica = _replica(_section(doc, "replica", where), mode, len(disks.paths or disks.serials), where)
    return ControllerConfig(
        name=name, controller_id="ab".index(name), mode=mode, pair_id=bytes.fromhex(pair_hex),
        key_file=_take(c, "key_file", str, "", where), state_dir=_take(c, "state_dir", str, "", where),
        nvram=nvram, disks=disks, link=link, nbd=nbd, cache=cache, replica=replica, source=where,
        metrics=_metrics(_section(doc, "metrics", where), where))


def _metrics(m: dict, where: str) -> MetricsConfig:
    from hal.runtime.metrics import is_loopback, parse_listen
    if unknown := set(m) - {"listen", "allow_remote"}:
        raise ConfigError(f"{where}: [metrics] unknown key(s) {sorted(unknown)}")
    cfg = MetricsConfig(listen=_take(m, "listen", str, "", where),
                        allow_remote=_take(m, "allow_remote", bool, False, where))
    if not cfg.listen:
        return cfg
    try:
        host, _port = parse_listen(cfg.listen)
    except ValueError as exc:
        raise ConfigError(f"{where}: [metrics] listen = {exc}") from None
    if not is_loopback(host) and not cfg.allow_remote:
        raise ConfigError(f"{where}: [metrics] listen = {cfg.listen!r} is not a loopback address (127.0.0.1, "
                          f"::1, localhost); set allow_remote = true to serve metrics beyond this machine")
    return cfg


def _check_nbd_tls(nbd: NbdConfig, where: str) -> None:
    """TLS settings that cannot serve are refused here, not at the first client: the files are
    loaded into a server context once, so a missing file or a key that does not match says so."""
    if nbd.tls == "off":
        if nbd.tls_verify_client:
            raise ConfigError(f'{where}: [nbd] tls_verify_client = true needs tls = "allow" or "require"')
        return
    from hal.host.nbd_tls import TlsConfigError, server_context
    try:
        server_context(nbd.tls_cert, nbd.tls_key, nbd.tls_ca, nbd.tls_verify_client)
    except TlsConfigError as exc:
        raise ConfigError(f"{where}: [nbd] tls = {nbd.tls!r}: {exc}") from None


def _replica(r: dict, mode: str, disk_count: int, where: str) -> ReplicaConfig:
    known = {"variant", "primary", "ack", "range_size", "resync_rate", "resync_inflight_max",
             "auto_promote_after_ms", "role", "source_id", "cp_interval_ms", "sources"}
    if unknown := set(r) - known:
        raise ConfigError(f"{where}: [replica] unknown key(s) {sorted(unknown)}")
    if r and mode != "replica":
        raise ConfigError(f"{where}: [replica] needs [controller] mode = \"replica\"")
    rate = r.get("resync_rate", 0)
    cfg = ReplicaConfig(
        variant=_choice(_take(r, "variant", str, "bitmap", where), ("bitmap", "log"), f"{where}: [replica] variant"),
        primary=_choice(_take(r, "primary", str, "a", where), ("a", "b"), f"{where}: [replica] primary"),
        ack=_choice(_take(r, "ack", str, "cache", where), ("cache", "nvram", "disk"), f"{where}: [replica] ack"),
        range_size_bytes=parse_size(r.get("range_size", "64K"), f"{where}: [replica] range_size"),
        resync_rate_bytes_s=0 if rate == 0 else parse_size(rate, f"{where}: [replica] resync_rate"),
        resync_inflight_max=_take(r, "resync_inflight_max", int, 16, where),
        auto_promote_after_ms=_take(r, "auto_promote_after_ms", int, 0, where),
        role=_choice(_take(r, "role", str, "source", where), ("source", "destination"), f"{where}: [replica] role"),
        source_id=_take(r, "source_id", int, 0, where),
        cp_interval_ms=_take(r, "cp_interval_ms", int, 2000, where))
    size = cfg.range_size_bytes
    if size < 4096 or size & (size - 1) or size > 4 << 20:
        raise ConfigError(f"{where}: [replica] range_size must be a power of two from 4K to 4M")
    if not 0 < cfg.resync_inflight_max <= 1024 or cfg.auto_promote_after_ms < 0:
        raise ConfigError(f"{where}: [replica] resync_inflight_max 1..1024, auto_promote_after_ms >= 0")
    if cfg.cp_interval_ms <= 0:
        raise ConfigError(f"{where}: [replica] cp_interval_ms must be positive")
    sources = _take(r, "sources", list, [], where)
    if cfg.variant == "log" and cfg.role == "destination" and not sources:
        raise ConfigError(f"{where}: a log destination needs at least one [[replica.sources]] table")
    if sources and not (cfg.variant == "log" and cfg.role == "destination"):
        raise ConfigError(f"{where}: [[replica.sources]] belongs to a log-variant destination")
    used, names, ids = set(), set(), set()
    for k, s in enumerate(sources):
        at = f"{where}: [[replica.sources]] #{k + 1}"
        if not isinstance(s, dict):
            raise ConfigError(f"{at} must be a table")
        pair_hex = _take(s, "pair_id", str, "", at)
        if not re.fullmatch(r"[0-9a-fA-F]{32}", pair_hex):
            raise ConfigError(f"{at}: pair_id must be 32 hex digits")
        entry = SourceEntry(
            name=_take(s, "name", str, f"source{k}", at), source_id=_take(s, "source_id", int, k, at),
            pair_id=bytes.fromhex(pair_hex), key_file=_take(s, "key_file", str, "", at),
            link_path=_take(s, "link_path", str, "", at), link_address=_take(s, "link_address", str, "", at),
            images=list(_take(s, "images", list, [], at)), journal=_take(s, "journal", int, -1, at))
        if not entry.key_file or not (entry.link_path or entry.link_address):
            raise ConfigError(f"{at}: needs key_file and link_path (or link_address)")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", entry.name) or entry.name in names or entry.source_id in ids:
            raise ConfigError(f"{at}: name {entry.name!r} / source_id {entry.source_id} must be unique and simple")
        for d in entry.images + [entry.journal]:
            if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < disk_count or d in used:
                raise ConfigError(f"{at}: disk index {d!r} is not one of [disks] or is used twice")
            used.add(d)
        if not entry.images:
            raise ConfigError(f"{at}: images lists no disk")
        names.add(entry.name)
        ids.add(entry.source_id)
        cfg.sources.append(entry)
    return cfg


def dump(config: dict) -> str:
    """Render a config dict (sections of scalars and lists) as TOML."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot render {value!r} as TOML")
