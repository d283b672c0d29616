"""A controller's restart: its cache and its mirror of the partner's, rebuilt from NVRAM alone.

`recover` scans both segments (firmware/segment.py), refuses an NVRAM whose dirty lines lie
outside the configured LUNs, installs the newest version of every line (older versions and
blocks a torn write left are freed), and rebuilds the free list and the mirror's view. It
returns the next write sequence number and the actions the recovery produced.
"""
from . import actions as A
from .cache import SECTOR_BYTES, Line, line_key
from .formats import FormatError

SEQ_MAX = (1 << 64) - 1                 # a descriptor's and a commit record's sequence field


def recover(params, primary, cache, mirror, generation):
    """-> (next sequence number, actions)."""
    out = []
    block_size = primary.block_size
    scan = primary.scan()
    mscan = mirror.segment.scan()
    refuse_lines_outside_the_luns(params, block_size, scan, "primary")
    refuse_lines_outside_the_luns(params, block_size, mscan, "mirror")
    taken = set()
    for rb in sorted(scan.blocks, key=lambda b: b.seq):
        key = line_key(rb.lun, rb.lba * SECTOR_BYTES // block_size)
        line = Line(rb.index, key, rb.lun, rb.lba, rb.seq, rb.bitmap, mirrored=False, generation=rb.generation)
        old = cache.install(line)
        taken.add(rb.index)
        if old is not None:
            taken.discard(old.block)
            cache.by_block[old.block] = None
            out.append(A.Persist(*primary.store_free(old.block)))
    cache.free = [i for i in range(cache.capacity - 1, -1, -1) if i not in taken]
    for index, reason in scan.dropped:
        if index >= 0:
            out.append(A.Persist(*primary.store_free(index)))
        out.append(A.Notify("nvram_dropped", segment="primary", block=index, reason=reason))
    next_seq = scan.max_seq + 1
    if next_seq > SEQ_MAX:
        # Intact checksums around a sequence number no controller reaches (2^64 writes): the
        # next write could not be numbered above it, and numbered below, recovery would take
        # it for older than this one.
        raise FormatError(f"the NVRAM's newest write sequence number is {scan.max_seq}, the largest there "
                          f"is: no write can follow it; not an NVRAM this firmware wrote")
    for r in mirror.recover(mscan):
        out.append(A.Persist(*r))
    for index, reason in mscan.dropped:
        out.append(A.Notify("nvram_dropped", segment="mirror", block=index, reason=reason))
    out.append(A.Notify("recovered", dirty_lines=cache.dirty_lines, free_blocks=len(cache.free),
                        mirror_blocks=mirror.used_blocks, next_seq=next_seq,
                        generation=generation, dropped=len(scan.dropped) + len(mscan.dropped)))
    return next_seq, out


def refuse_lines_outside_the_luns(params, block_size, scan, segment):
    """A dirty line of a LUN (or past the end of one) the configuration does not have is
    acknowledged data of another configuration: never dropped, never destaged elsewhere."""
    sizes = params.lun_sizes
    bad = [rb for rb in scan.blocks
           if rb.lun >= len(sizes) or rb.lba * SECTOR_BYTES + block_size > sizes[rb.lun]]
    if bad:
        rb = bad[0]
        raise FormatError(f"the NVRAM's {segment} segment holds {len(bad)} dirty line(s) outside the "
                          f"configured LUNs (the first: lun{rb.lun} sector {rb.lba}; the configuration has "
                          f"{len(sizes)} LUNs): start with the configuration that wrote them")
