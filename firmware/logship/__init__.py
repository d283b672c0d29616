"""Replica mode, NVRAM-log variant: log shipping with consistency points (claims 4).

The source logs each host write in a partition of its NVRAM log with a
sequence number, persists it, and ships it to the destination. The
destination writes it into its own NVRAM, acknowledges, and moves it into a
file that belongs to that source on its own disks; once a request is in the
file (written and flushed) it is removed from the destination's NVRAM.
Sequence numbers keep the file ordered: an entry that arrives early waits
in memory, unacknowledged, until the gap before it is filled.

Consistency point: when the active partition fills, or `cp_interval_ms`
passes with entries in it, the source starts the next partition, applies the
full one to its volume (disk writes, then a flush), and sends a
CONSISTENCY_POINT through its last sequence number; the destination applies
its file's requests up to there to the image volume, then records that in
the file header. A partition is reused only once it is applied locally and
every entry in it is acknowledged by the destination.

The host is acknowledged once the destination acknowledged the request
(it is in two NVRAMs). While the destination is unreachable the source
serves on alone: a write is acknowledged from its own NVRAM, and its
partitions keep every entry the destination has not acknowledged; when the
link returns the destination says how far it got and the source resends the
rest in order. If every partition holds unshipped entries, host writes wait
(bounded) until the destination takes some.

Reads at the source see the volume plus every logged request not yet applied.
The destination serves its image volumes read-only (the state of the last
consistency point); after a disaster at the source, `recover` applies every
request in the file, and the image holds every acknowledged write.

One destination serves several sources (fan-in): each has its own link
session, NVRAM log partition, file and image volume.

Modules: common.py (settings, the NVRAM log and its partitions), session.py
(the link entry points both ends share), source.py (LogSource) and
destination.py (LogDestination) with feed.py (its feeds and consistency points).
"""
