"""A controller's settings (Params, from its configuration file through the runtime) and the
layout of a blank NVRAM for them."""
from .formats import nvram as N


class Params:
    """Everything the firmware needs to know that is not in NVRAM. No I/O here either."""

    def __init__(self, controller_id, pair_id, lun_sizes, *, mode="ha", block_size_bytes=4096,
                 high_watermark=0.5, low_watermark=0.25, idle_flush_ms=500,
                 destage_inflight_max=64, max_write_bytes=4 << 20, heartbeat_interval_ms=100,
                 heartbeat_timeout_ms=1000, reliable_transport=True, data_window_bytes=1 << 20,
                 waiting_max=4096, buggify=None, renew_interval_ms=100,
                 lease_ms=400, takeover_wait_ms=900, held_max=1024, auto_balance=True, replica=None,
                 mirror_message_bytes_max=1 << 20, destage_extent_bytes_max=1 << 20,
                 batch_link_output=False, destage_flush_batch_bytes=8 << 20, degraded_after_ms=30_000,
                 disk_retry_initial_ms=200, disk_retry_max_ms=5_000, disk_report_interval_ms=1_000,
                 forward_inflight_max=64, forward_inflight_bytes_max=8 << 20, zero_pieces_inflight_max=4,
                 on_serve=None):
        self.controller_id = controller_id
        self.pair_id = pair_id
        self.lun_sizes = list(lun_sizes)
        self.mode = mode
        self.block_size_bytes = block_size_bytes
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.idle_flush_ms = idle_flush_ms
        self.destage_inflight_max = destage_inflight_max
        self.max_write_bytes = max_write_bytes
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.reliable_transport = reliable_transport
        self.data_window_bytes = data_window_bytes
        self.waiting_max = waiting_max
        self.buggify = buggify or (lambda site: False)
        self.buggify_on = buggify is not None
        # A checker's view of every serving act (the simulator's split-brain judge): called as
        # on_serve(kind, req, lun) when the controller takes on a host request itself, kind
        # "write", "write_through" or "read", before it acts. Like buggify, a test hook: None in
        # production, and it must not change anything.
        self.on_serve = on_serve
        # Ownership (firmware/owners.py) is the controller class's: ha mode moves it through the
        # reservation records on shared disks (firmware/ha/controller.py).
        self.renew_interval_ms = renew_interval_ms
        self.lease_ms = lease_ms
        self.takeover_wait_ms = takeover_wait_ms
        self.held_max = held_max
        self.auto_balance = auto_balance
        # Replica mode settings (firmware/replica/controller.py: ReplicaSettings); None in ha mode.
        self.replica = replica
        # A host write goes to the partner in MIRROR_WRITE messages of at most this much block
        # data (one message for writes up to it); the partner commits the group when all are in.
        self.mirror_message_bytes_max = mirror_message_bytes_max
        self.destage_extent_bytes_max = destage_extent_bytes_max   # adjacent lines in one disk write
        # Destaged lines wait for a disk flush before their NVRAM copies are freed; while more
        # destage writes of the LUN are going out, one flush waits for this much of them.
        self.destage_flush_batch_bytes = destage_flush_batch_bytes
        # True: entry points leave link output queued until flush_link() (the runtime calls it
        # once per loop turn); False: every entry point returns its frames (unit tests).
        self.batch_link_output = batch_link_output
        # A LUN's disk failing writes (firmware/diskhealth.py): retries back off from the initial
        # delay to the max; one report per LUN per interval; degraded after this long.
        self.degraded_after_ms = degraded_after_ms
        self.disk_retry_initial_ms = disk_retry_initial_ms
        self.disk_retry_max_ms = disk_retry_max_ms
        self.disk_report_interval_ms = disk_report_interval_ms
        # Host I/O forwarded to the owner: at most this many requests, and this much data
        # (written, or to be read), in flight on the link; the rest wait in order (as many as
        # waiting_max), so forwarded work never crowds out the heartbeats.
        self.forward_inflight_max = forward_inflight_max
        self.forward_inflight_bytes_max = forward_inflight_bytes_max
        # WRITE_ZEROES go into the cache in pieces of at most 1 MiB, this many at a time in all.
        self.zero_pieces_inflight_max = zero_pieces_inflight_max
        assert forward_inflight_max > 0 and forward_inflight_bytes_max >= max_write_bytes
        assert zero_pieces_inflight_max > 0
        assert takeover_wait_ms > lease_ms + renew_interval_ms, "the fencing argument needs this margin"


def nvram_is_blank(nv) -> bool:
    return not any(nv[:N.SB_SLOT_BYTES * N.SB_SLOTS])


def format_nvram(nv, params: Params):
    """Lay out a blank NVRAM; return the ranges to persist."""
    fields = N.plan_layout(len(nv), params.block_size_bytes, params.controller_id, params.pair_id)
    nv[N.COMMIT_AREA_OFFSET:N.COMMIT_AREA_OFFSET + 4 * N.COMMIT_SLOT_BYTES] = bytes(4 * N.COMMIT_SLOT_BYTES)
    for name in ("primary_desc_offset", "mirror_desc_offset"):
        start = fields[name]
        nv[start:start + fields["primary_blocks"] * N.DESC_SIZE_BYTES] = bytes(
            fields["primary_blocks"] * N.DESC_SIZE_BYTES)
    sb = N.build_superblock(fields)
    nv[0:len(sb)] = sb
    nv[N.SB_SLOT_BYTES:N.SB_SLOT_BYTES + len(sb)] = bytes(len(sb))
    return [(0, N.HEADER_AREA_BYTES), (fields["primary_desc_offset"],
                                      fields["primary_data_offset"] - fields["primary_desc_offset"])]
