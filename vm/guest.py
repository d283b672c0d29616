"""What a controller guest runs: its controller config and its command line.

The guest sees the host's root read-only, so the host writes each
controller's TOML under the pair's run directory and the guest command is
`twincache controller run --config <that file>`, run from the repository's
virtualenv. The config selects the guest HAL backends:

- NVRAM: backend "dax" on /dev/dax0.0 (the nvdimm; its first 2 MiB hold the
  devdax info block, so the usable size is the nvdimm size less 2 MiB);
- disks: backend "serial", the shared virtio-scsi disks by serial, O_DIRECT
  (the two guests' page caches are not coherent); each LUN is the disk less
  its label area (DATA_OFFSET_BYTES);
- link: transport "virtio" on /dev/virtio-ports/ctl.link (fd I/O, not a tty);
- NBD: TCP on the guest's port 10809, which the host reaches at
  127.0.0.1:<nbd_host_ports[i]> through the user-mode network forward;
- state_dir: /run/twincache/<name> on the guest's tmpfs, because a unix
  socket (the control socket) cannot be bound on 9p; its events.jsonl is a
  symlink into /var/lib/twincache/<name>, the writable 9p share of
  <run_dir>/<name>/state, so the host reads the events as they happen.

Rules: files are written before the guest boots (9p caches what it read).
"""
from __future__ import annotations

import base64
import pathlib
import secrets

from firmware.formats.disklabel import DATA_OFFSET_BYTES
from hal.runtime import config as hal_config
from vm.assets import REPO
from vm.domain import GUEST_NBD_PORT, LINK_PORT_NAME

DEVDAX_RESERVED_MIB = 2
GUEST_STATE_DIR = "/run/twincache"        # guest tmpfs: unix sockets work here
GUEST_SHARE_DIR = "/var/lib/twincache"    # 9p share of <run_dir>/<name>/state
# A TCG guest runs Python several times slower and stalls now and then (9p, timer
# catch-up): a first boot saw "peer silent for 1004 ms" with the local-process
# timeout of 1 s. The interval stays 100 ms: an idle owner's link lease (lease_ms,
# 400 ms) is renewed by the ack of each heartbeat.
GUEST_CACHE_TIMING = {"heartbeat_interval_ms": 100, "heartbeat_timeout_ms": 3000}


def pair_id(run_dir: pathlib.Path) -> str:
    """The pair's id, made once and kept in <run_dir>/pair_id."""
    path = run_dir / "pair_id"
    if not path.exists():
        path.write_text(secrets.token_hex(16) + "\n")
    return path.read_text().strip()


def pair_key(run_dir: pathlib.Path) -> pathlib.Path:
    from hal.backends.keyfile import create_pair_key
    path = run_dir / "pair.key"
    if not path.exists():
        create_pair_key(path)
    return path


def controller_config(pair, name: str) -> dict:
    """The controller TOML (as a dict) for guest `name` of a `vm.pair.VmPair`."""
    cfg = pair.config
    return {
        "controller": {"name": name, "mode": "ha", "pair_id": pair_id(pair.run_dir),
                       "key_file": str(pair_key(pair.run_dir)), "state_dir": f"{GUEST_STATE_DIR}/{name}"},
        "nvram": {"backend": "dax", "path": "/dev/dax0.0",
                  "size": f"{cfg.nvram_size_mib - DEVDAX_RESERVED_MIB}M"},
        "disks": {"backend": "serial", "serials": [d.serial for d in pair.disks()],
                  "lun_size": (cfg.disk_size_mib << 20) - DATA_OFFSET_BYTES, "direct": True},
        "link": {"transport": "virtio", "device": f"/dev/virtio-ports/{LINK_PORT_NAME}", "listen": name == "a"},
        "nbd": {"tcp": f"0.0.0.0:{GUEST_NBD_PORT}"},
        "cache": dict(GUEST_CACHE_TIMING),
    }


def write_controller_config(pair, name: str) -> pathlib.Path:
    """Write and validate <run_dir>/<name>/controller.toml; returns its path."""
    path = pair.run_dir / name / "controller.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(hal_config.dump(controller_config(pair, name)))
    hal_config.load(path)      # a bad config fails here, on the host, not in a guest
    return path


def provision(pair) -> None:
    """Before a first boot: the pair key, and a label on every blank shared disk (on the host side)."""
    from hal.backends.disk_array import DiskArray
    pair_key(pair.run_dir)
    cfg = hal_config.from_dict(controller_config(pair, "a"), "vm provisioning")
    files = hal_config.DiskConfig(backend="file", paths=[d.path for d in pair.disks()],
                                  lun_size_bytes=cfg.disks.lun_size_bytes)
    DiskArray.open(files, cfg.pair_id, create=True).close()


def controller_command(config_path, name: str) -> str:
    """The guest command: link the events log into the share, then run the controller."""
    state, share = f"{GUEST_STATE_DIR}/{name}", f"{GUEST_SHARE_DIR}/{name}"
    return (f"mkdir -p {state} && if [ -d {GUEST_SHARE_DIR} ]; then mkdir -p {share} && "
            f"ln -sf {share}/events.jsonl {state}/events.jsonl; fi && "
            f"exec {REPO}/.venv/bin/twincache controller run --config {config_path}")


def self_contained_command(pair, name: str) -> str:
    """For a guest booted from a vm/image.py image, which cannot see the host's files:
    the config and the pair key travel in the command itself (on the kernel command line)."""
    config = controller_config(pair, name)
    key_path, config_path = f"{GUEST_STATE_DIR}/pair.key", f"{GUEST_STATE_DIR}/{name}.toml"
    config["controller"]["key_file"] = key_path
    hal_config.from_dict(config, "vm self-contained config")
    toml64 = base64.b64encode(hal_config.dump(config).encode()).decode()
    key = pair_key(pair.run_dir).read_text().strip()
    state, share = f"{GUEST_STATE_DIR}/{name}", f"{GUEST_SHARE_DIR}/{name}"
    return (f"mkdir -p {state} && (umask 077; echo {key} > {key_path}) && "
            f"echo {toml64} | base64 -d > {config_path} && "
            f"if [ -d {GUEST_SHARE_DIR} ]; then mkdir -p {share} && "
            f"ln -sf {share}/events.jsonl {state}/events.jsonl; fi && "
            f"exec twincache controller run --config {config_path}")
