"""Runtimes for replica mode's NVRAM-log variant (firmware/logship/).

The source is an ordinary runtime whose firmware is a LogSource: one link (it
connects to the destination), its own disks, NBD exports lun0, lun1, ...

The destination serves several sources (fan-in): one link port per source
(hal/runtime/linkport.py; it listens on each), one link session each in the
firmware, and NBD exports of the image volumes, read-only, named after the
source: a-lun0, a-lun1, ... The loop drives its ports as it drives a pair's
one; Transmit and LinkReset actions name the port they belong to.
"""
from __future__ import annotations

from firmware.logship.common import LogParams
from firmware.logship.destination import LogDestination
from firmware.logship.feed import FeedParams
from firmware.logship.source import LogSource

import hal.host.nbd as NBD
from hal.backends.keyfile import load_pair_key
from hal.runtime.config import LinkConfig
from hal.runtime.linkport import LinkPort
from hal.runtime.loop import Runtime, open_link_endpoint


def log_params(cfg, disks, reliable, pair_id=None):
    c = cfg.cache
    return LogParams(pair_id or cfg.pair_id, [d.data_size for d in disks], source_id=cfg.replica.source_id,
                     cp_interval_ms=cfg.replica.cp_interval_ms, heartbeat_interval_ms=c.heartbeat_interval_ms,
                     heartbeat_timeout_ms=c.heartbeat_timeout_ms, reliable_transport=reliable)


class LogSourceRuntime(Runtime):
    def make_firmware(self, params, nv, key):
        return LogSource(log_params(self.cfg, self.disks, params.reliable_transport), nv, key,
                         self.clock.monotonic_ms())


class _LinkOnly:
    def __init__(self, link):
        self.link = link


class LogDestinationRuntime(Runtime):
    def open_ports(self, cfg):
        """One link port per source, each listening on the source's own endpoint."""
        ports, reliable = [], True
        for k, e in enumerate(cfg.replica.sources):
            link = LinkConfig(transport="unix" if e.link_path else "tcp", listen=True, path=e.link_path,
                              address=e.link_address)
            endpoint, framer_cls, port_reliable = open_link_endpoint(_LinkOnly(link))
            ports.append(LinkPort(k, endpoint, framer_cls, name=e.name))
            reliable = reliable and port_reliable
        return ports, reliable

    def make_firmware(self, params, nv, key):
        feeds = []
        for k, e in enumerate(self.cfg.replica.sources):
            feeds.append(FeedParams(e.source_id, e.pair_id, load_pair_key(e.key_file),
                                    [self.disks[i].data_size for i in e.images], e.images, e.journal,
                                    self.disks[e.journal].data_size, partition=k, name=e.name))
        return LogDestination(log_params(self.cfg, self.disks, params.reliable_transport), feeds, nv,
                              self.clock.monotonic_ms())

    def make_exports(self, cfg):
        return [NBD.Export(name=f"{e.name}-lun{k}", size_bytes=self.disks[d].data_size, index=d, read_only=True,
                           description=f"twincache {cfg.name}: image of {e.name} LUN {k}")
                for e in cfg.replica.sources for k, d in enumerate(e.images)]


def make_runtime(cfg):
    """The runtime for a configuration: ha, or one end of the log variant."""
    if cfg.mode == "replica" and cfg.replica.variant == "log":
        return (LogDestinationRuntime if cfg.replica.role == "destination" else LogSourceRuntime)(cfg)
    return Runtime(cfg)


__all__ = ["LogSourceRuntime", "LogDestinationRuntime", "make_runtime"]
