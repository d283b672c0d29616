"""The log destination's records: one source as the destination sees it (FeedParams), its state
there (Feed), and a consistency point in progress with its steps (ConsistencyPoint, CP_NEXT,
CP_ENTER). firmware/logship/destination.py moves them."""
import collections

from ..formats import logfile as LF


class ConsistencyPoint:
    """Applying a source's filed records through `through` to its image volume: read them from
    the file, write them in waves (no overlap inside one), flush the images, write the file
    header past them, flush the file. `stage` is the step whose I/O is in flight; `left` counts
    that I/O; the first error ends the attempt (the records stay filed; the next signal retries)."""
    __slots__ = ("records", "data", "left", "waves", "through", "error", "stage")

    def __init__(self, records):
        self.records = records
        self.data = {}                    # seq -> the record's data, read from the file
        self.left = len(records)
        self.waves = []
        self.through = records[-1].seq
        self.error = 0
        self.stage = "read"


# A consistency point's steps, in order. Each step starts its I/O (True) or has none to do
# (False: the next one starts at once); "write" repeats once per wave.
CP_NEXT = {"read": "write", "write": "flush", "flush": "header", "header": "header_flush",
           "header_flush": "done"}
CP_ENTER = {"write": "_cp_write_images", "flush": "_cp_flush_images", "header": "_cp_write_header",
            "header_flush": "_cp_flush_header"}


class FeedParams:
    """One source as the destination sees it: its pairing, partition, file and image disks."""

    def __init__(self, source_id, pair_id, key, lun_sizes, image_disks, journal_disk, journal_bytes,
                 partition, name=None):
        assert len(image_disks) == len(lun_sizes)
        self.source_id = source_id
        self.pair_id = pair_id
        self.key = key
        self.lun_sizes = list(lun_sizes)
        self.image_disks = list(image_disks)      # destination disk index of each image LUN
        self.journal_disk = journal_disk          # destination disk index of the file
        self.journal_bytes = journal_bytes
        self.partition = partition                # destination NVRAM log partition staging its entries
        self.name = name or f"source{source_id}"


SCAN_CHUNK_BYTES = 1 << 20


class Feed:
    """The destination's state for one source."""

    def __init__(self, fp, part, link):
        self.p = fp
        self.part = part
        self.link = link
        self.ready = False
        self.held = collections.deque()           # messages that came before the recovery scan ended
        self.expected = 1                         # the next sequence number to store
        self.early = {}                           # seq -> (lun, offset, bytes): arrived ahead of a gap
        self.staged = collections.deque()         # stored in NVRAM, not yet filed (Entry, NVRAM data_off)
        self.filing = 0                           # records written to the file, not yet flushed
        self.records = collections.deque()        # in the file, not yet applied (Entry, file data_off)
        self.filed_seq = 0
        self.applied_seq = 0
        self.cp_count = 0
        self.tail = LF.DATA_START
        self.cp_target = 0
        self.cp = None                            # the running consistency point (ConsistencyPoint)
        self.scan_at = LF.DATA_START
        self.scan_wrapped = False
        self.recovered_nvram = None               # entries the NVRAM scan found, until the file scan ends
        self.filing_batch = []                    # the entries of the records in flight
        self.file_error = 0
