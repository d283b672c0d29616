"""What the firmware asks the world to do: the actions its handlers return.

Every place the firmware runs (the runtime, the simulator, the in-memory rigs)
carries them out in order through one interpreter, hal/interpret.py, and feeds
the results back as calls into the controller (disk_done, ...). Every
action is a small __slots__ class: they are made on the hot path.
"""


class Action:
    __slots__ = ()

    def __repr__(self):
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__ if k != "data")
        return f"{type(self).__name__}({fields})"


class Persist(Action):
    """Make NVRAM [offset, offset+length) durable before carrying out later actions."""
    __slots__ = ("offset", "length")

    def __init__(self, offset, length):
        self.offset = offset
        self.length = length


class Transmit(Action):
    """Send link frames to the partner: each buffer is one whole frame, in order.

    `link` names the link when a controller has several (a log-shipping destination
    serving several sources); 0 is the only link of a pair."""
    __slots__ = ("buffers", "link")

    def __init__(self, buffers, link=0):
        self.buffers = buffers
        self.link = link


class HostReply(Action):
    """Complete a host request; `error` is an NBD error number (0 = success)."""
    __slots__ = ("req", "error", "data")

    def __init__(self, req, error=0, data=None):
        self.req = req
        self.error = error
        self.data = data


class DiskRead(Action):
    """Read `length` bytes of LUN `lun` at `offset`; answer with controller.disk_done(op, err, data)."""
    __slots__ = ("op", "lun", "offset", "length")

    def __init__(self, op, lun, offset, length):
        self.op = op
        self.lun = lun
        self.offset = offset
        self.length = length


class DiskWrite(Action):
    """Write `data` to LUN `lun` at `offset`; answer with controller.disk_done(op, err, None)."""
    __slots__ = ("op", "lun", "offset", "data")

    def __init__(self, op, lun, offset, data):
        self.op = op
        self.lun = lun
        self.offset = offset
        self.data = data


class DiskFlush(Action):
    """Make earlier disk writes of LUN `lun` durable; answer with disk_done(op, err, None)."""
    __slots__ = ("op", "lun")

    def __init__(self, op, lun):
        self.op = op
        self.lun = lun


class RecordRead(Action):
    """Read LUN `lun`'s reservation record (512 B); answer with disk_done(op, err, data)."""
    __slots__ = ("op", "lun")

    def __init__(self, op, lun):
        self.op = op
        self.lun = lun


class RecordWrite(Action):
    """Write LUN `lun`'s reservation record; answer with disk_done(op, err, None)."""
    __slots__ = ("op", "lun", "data")

    def __init__(self, op, lun, data):
        self.op = op
        self.lun = lun
        self.data = data


class LinkReset(Action):
    """Drop the link connection (protocol error, failed authentication, dead peer)."""
    __slots__ = ("reason", "link")

    def __init__(self, reason, link=0):
        self.reason = reason
        self.link = link


class Notify(Action):
    """Something an operator or a test may wait for: role change, link up/down, ..."""
    __slots__ = ("kind", "fields")

    def __init__(self, kind, **fields):
        self.kind = kind
        self.fields = fields

    def __repr__(self):
        return f"Notify({self.kind!r}, {self.fields!r})"


class DiskExtents(Action):
    """Which byte ranges of LUN `lun`'s [offset, offset + length) may hold data on disk;
    answer with disk_done(op, err, [(start, end), ...]) (ranges outside were never written)."""
    __slots__ = ("op", "lun", "offset", "length")

    def __init__(self, op, lun, offset, length):
        self.op = op
        self.lun = lun
        self.offset = offset
        self.length = length
