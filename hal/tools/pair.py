"""A local controller pair: two controller processes, file NVRAM and file disks under one DIR.

    DIR/pair.json        what the pair is (pair id, LUNs, sizes, link)
    DIR/pair.key         the pre-shared pairing key (0600)
    DIR/disks/diskN.img  the shared disk array, one disk per LUN (mode ha)
    DIR/a/disks/, DIR/b/disks/  each controller's own disk array (mode replica)
    DIR/a/, DIR/b/       per controller: config.toml, nvram.img, nbd.sock,
                         control.sock, events.jsonl, controller.log, pid
    DIR/tls/client/, DIR/tls/server/  with --tls: a throwaway CA, the controllers'
                         certificate and a client certificate (hal/host/tls_certs.py)

`up` creates what is missing and starts every controller that is not
running, on its existing NVRAM and disks; `down` stops them. Used by the
CLI, the invoke tasks and the test fixtures.
"""
from __future__ import annotations

import json
import os
import pathlib
import secrets
import signal
import socket
import subprocess
import sys
import time

import hal.runtime.config as C
from hal.runtime.control import request
from hal.backends.disk_array import DiskArray
from hal.backends.keyfile import create_pair_key

NAMES = ("a", "b")


class PairError(RuntimeError):
    """The pair cannot be set up or reached; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n) -> list:
    """n different free loopback ports: all held open while picking, so none is picked twice."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalPair:
    # The tree the controllers run from (`python -m hal.cli` there); hal/tools/bench_linkauth.py points
    # one pair at an older commit's tree to measure against the code before a change.
    code_root = pathlib.Path(__file__).resolve().parents[2]

    def __init__(self, directory):
        self.dir = pathlib.Path(directory).resolve()
        self._procs = {}

    # -- layout ---------------------------------------------------------------

    @property
    def meta_path(self):
        return self.dir / "pair.json"

    def meta(self) -> dict:
        try:
            return json.loads(self.meta_path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            raise PairError(f"{self.dir}: no pair here (run `twincache pair up --dir {self.dir}`)") from None
        except (OSError, ValueError) as exc:
            raise PairError(f"{self.meta_path}: not a readable pair description ({exc})") from None

    def config_path(self, name) -> pathlib.Path:
        return self.dir / name / "config.toml"

    def control_path(self, name) -> str:
        return str(self.dir / name / "control.sock")

    def create(self, luns=2, lun_size_bytes=256 << 20, link="unix", nvram_size_bytes=64 << 20,
               durability="controller", block_size_bytes=4096, mode="ha", cache=None, link_proxy=False,
               replica=None, replica_variant="bitmap", cp_interval_ms=2000, disks=None, tls=False, metrics=False):
        if self.meta_path.exists():
            meta = self.meta()
            if tls and not meta.get("tls"):
                raise PairError(f"{self.dir}: this pair was made without --tls; use another --dir")
            return meta
        if luns < 1 or luns > 64:
            raise PairError(f"--luns {luns}: choose 1 to 64")
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = dict(pair_id=secrets.token_hex(16), luns=luns, lun_size_bytes=lun_size_bytes,
                    link=link, nvram_size_bytes=nvram_size_bytes, durability=durability,
                    block_size_bytes=block_size_bytes, mode=mode, cache=cache or {},
                    link_port=_free_port() if link == "tcp" else 0, link_proxy=link_proxy,
                    replica=replica or {}, disks=disks or {},
                    tls="require" if tls is True else (tls or ""),
                    # metrics: a free loopback port each, picked now and kept in the configs
                    metrics_ports=_free_ports(len(NAMES)) if metrics else [])
        if mode == "replica":
            meta.update(replica_variant=replica_variant, cp_interval_ms=cp_interval_ms)
        create_pair_key(self.dir / "pair.key")
        if tls:
            from hal.host.tls_certs import create_tls_dir
            create_tls_dir(self.dir / "tls")
        (self.dir / "disks").mkdir(exist_ok=True)
        for name in NAMES:
            (self.dir / name).mkdir(exist_ok=True)
            self.config_path(name).write_text(C.dump(self._config(meta, name)))
        for name in NAMES if mode == "replica" else NAMES[:1]:     # replica: each has its own disks
            (self.dir / name / "disks").mkdir(exist_ok=True)
            cfg = C.load(self.config_path(name))
            DiskArray.open(cfg.disks, cfg.pair_id, create=True).close()
        self.meta_path.write_text(json.dumps(meta, indent=1))
        return meta

    def _config(self, meta, name) -> dict:
        if meta.get("replica_variant") == "log":
            return self._log_config(meta, name)
        d, cdir = self.dir, self.dir / name
        link = {"transport": meta["link"], "listen": name == "a"}
        if meta["link"] == "tcp":
            link["address"] = f"127.0.0.1:{meta['link_port']}"
        elif meta.get("link_proxy") and name == "b":
            link["path"] = str(d / "link-proxy.sock")     # a test relay in between (fixtures/linkproxy.py)
        else:
            link["path"] = str(d / "link.sock")
        disks = d / name / "disks" if meta["mode"] == "replica" else d / "disks"
        config = {
            "controller": {"name": name, "mode": meta["mode"], "pair_id": meta["pair_id"],
                           "key_file": str(d / "pair.key"), "state_dir": str(cdir)},
            "nvram": {"backend": "file", "path": str(cdir / "nvram.img"),
                      "size": meta["nvram_size_bytes"], "durability": meta["durability"],
                      "block_size": meta["block_size_bytes"]},
            "disks": {"backend": "file", "lun_size": meta["lun_size_bytes"],
                      "paths": [str(disks / f"disk{i}.img") for i in range(meta["luns"])],
                      **meta.get("disks", {})},
            "link": link,
            "nbd": self._nbd_config(meta, cdir),
            "cache": dict(meta.get("cache", {})),
        }
        if meta["mode"] == "replica":
            config["replica"] = dict(meta.get("replica", {}))
        return self._with_metrics(meta, name, config)

    @staticmethod
    def _with_metrics(meta, name, config) -> dict:
        ports = meta.get("metrics_ports")
        if ports:
            config["metrics"] = {"listen": f"127.0.0.1:{ports[NAMES.index(name)]}"}
        return config

    def _log_config(self, meta, name) -> dict:
        """Log variant: a is the source (its own disks), b the destination (image disks + a journal)."""
        d, cdir = self.dir, self.dir / name
        tcp = f"127.0.0.1:{meta['link_port']}" if meta["link"] == "tcp" else ""
        link_path = str(d / ("link-proxy.sock" if meta.get("link_proxy") else "link.sock"))
        n = meta["luns"]
        if name == "a":
            paths = [str(cdir / "disks" / f"disk{i}.img") for i in range(n)]
            link = {"transport": meta["link"], "listen": False, **({"address": tcp} if tcp else {"path": link_path})}
            replica = {"variant": "log", "role": "source", "source_id": 0, "cp_interval_ms": meta["cp_interval_ms"]}
        else:
            paths = [str(cdir / "disks" / f"image{i}.img") for i in range(n)] + [str(cdir / "disks" / "journal.img")]
            link = {"transport": meta["link"], "listen": True, "path": str(d / "link.sock")}
            source = {"name": "a", "source_id": 0, "pair_id": meta["pair_id"], "key_file": str(d / "pair.key"),
                      "images": list(range(n)), "journal": n}
            source.update({"link_address": tcp} if tcp else {"link_path": str(d / "link.sock")})
            replica = {"variant": "log", "role": "destination", "sources": [source]}
        return self._with_metrics(meta, name, {
            "controller": {"name": name, "mode": "replica", "pair_id": meta["pair_id"],
                           "key_file": str(d / "pair.key"), "state_dir": str(cdir)},
            "nvram": {"backend": "file", "path": str(cdir / "nvram.img"), "size": meta["nvram_size_bytes"],
                      "durability": meta["durability"], "block_size": meta["block_size_bytes"]},
            "disks": {"backend": "file", "lun_size": meta["lun_size_bytes"], "paths": paths},
            "link": link,
            "nbd": self._nbd_config(meta, cdir),
            "cache": dict(meta.get("cache", {})),
            "replica": replica,
        })

    def _nbd_config(self, meta, cdir) -> dict:
        nbd = {"unix": str(cdir / "nbd.sock")}
        if meta.get("tls"):
            from hal.host.tls_certs import tls_paths
            p = tls_paths(self.dir / "tls")
            # "require" (pair up --tls) checks client certificates; "allow" (the benchmark's
            # same-pair comparison) serves clients with and without TLS and checks none.
            mode = "require" if meta["tls"] is True else meta["tls"]
            nbd.update(tls=mode, tls_cert=p["cert"], tls_key=p["key"], tls_ca=p["ca"],
                       tls_verify_client=mode == "require")
        return nbd

    def tls_client_dir(self) -> str | None:
        """The directory to hand qemu (tls-creds-x509 dir=) and libnbd (tls-certificates=), if TLS."""
        return str(self.dir / "tls" / "client") if self.meta().get("tls") else None

    # -- processes ------------------------------------------------------------

    def pid(self, name) -> int | None:
        try:
            pid = int((self.dir / name / "pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        proc = self._procs.get(name)
        if proc is not None and proc.pid == pid:      # our child: it may not have exec'd yet
            return pid if proc.poll() is None else None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        try:
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if str(self.config_path(name)).encode() in cmdline else None

    def start(self, name, extra_env=None) -> int:
        log = open(self.dir / name / "controller.log", "ab")
        env = dict(os.environ, **(extra_env or {}))
        proc = subprocess.Popen(
            [sys.executable, "-m", "hal.cli", "controller", "run", "--config", str(self.config_path(name))],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=env,
            cwd=str(self.code_root))
        log.close()
        (self.dir / name / "pid").write_text(str(proc.pid))
        self._procs[name] = proc
        return proc.pid

    def status(self, name, timeout_s=2.0) -> dict:
        try:
            return request(self.control_path(name), {"cmd": "status"}, timeout_s)
        except (OSError, ValueError) as exc:
            return {"controller": name, "state": "stopped" if self.pid(name) is None else "unreachable",
                    "error": str(exc)}

    def wait_serving(self, names=NAMES, timeout_s=30.0, mirrored=True):
        deadline = time.monotonic() + timeout_s
        pending = set(names)
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                st = self.status(name, 1.0)
                if "pid" in st and (not mirrored or st.get("link") in ("mirrored", "shipping")):
                    pending.discard(name)
                elif self.pid(name) is None:
                    log = (self.dir / name / "controller.log").read_text(errors="replace")[-2000:]
                    raise PairError(f"controller {name} exited; the end of its log:\n{log}")
            time.sleep(0.05)
        if pending:
            raise PairError(f"controller(s) {', '.join(sorted(pending))} not serving after {timeout_s} s")

    def up(self, wait_mirrored=True, timeout_s=30.0, **create_args) -> dict:
        self.create(**create_args)
        started = []
        for name in NAMES:
            if self.pid(name) is None:
                self.start(name)
                started.append(name)
        self.wait_serving(timeout_s=timeout_s, mirrored=wait_mirrored)
        return {"controllers": [self.describe(n) for n in NAMES], "started": started}

    def describe(self, name) -> dict:
        st = self.status(name)
        return {"name": name, "pid": st.get("pid") or self.pid(name), "exports": st.get("exports", {}),
                "metrics": st.get("metrics_url")}

    def kill(self, name, sig=signal.SIGKILL):
        pid = self.pid(name)
        if pid is None:
            raise PairError(f"controller {name} is not running")
        os.kill(pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self._reap(name, pid)
        return pid

    def _reap(self, name, pid, timeout_s=10.0):
        proc = self._procs.get(name)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.pid == pid:
                if proc.poll() is not None:
                    return
            else:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                if pathlib.Path(f"/proc/{pid}/stat").exists():
                    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
                    if stat.rsplit(")", 1)[1].split()[0] == "Z":
                        return
            time.sleep(0.02)
        raise PairError(f"controller {name} (pid {pid}) did not exit")

    def down(self, timeout_s=10.0) -> list:
        stopped = []
        for name in NAMES:
            pid = self.pid(name)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            try:
                self._reap(name, pid, timeout_s)
            except PairError:
                os.kill(pid, signal.SIGKILL)
                self._reap(name, pid, timeout_s)
            stopped.append(name)
        return stopped
