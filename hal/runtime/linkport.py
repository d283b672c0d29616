"""One link endpoint of a controller and the connection on it.

A pair's controller and a log source have one; a log destination one per
source. The runtime (hal/runtime/loop.py) drives every port the same way:
connect or accept with a backoff, read frames, queue and send output, close.
Transmit and LinkReset actions name their port by index.
"""
from hal.backends.framing import StreamFramer
from hal.runtime.backoff import Backoff


class LinkPort:
    def __init__(self, index, endpoint, framer_cls, name="link"):
        self.index = index
        self.endpoint = endpoint
        self.framer_cls = framer_cls
        self.name = name                  # for events: "link", or the source a destination's port serves
        self.transport = None             # the connection, when there is one
        self.framer = None
        self.out = []                     # buffers waiting to be sent, in order
        self.writing = False              # the selector watches for room to send
        self.backoff = Backoff(initial_ms=20, max_ms=500)
        self.next_connect_ms = 0

    def open(self, transport):
        self.transport = transport
        self.framer = self.framer_cls(transport.name)
        self.out = []

    def queue(self, buffers):
        """Whole frames to send: as they are on a stream, COBS-encoded one chunk each otherwise."""
        if self.framer_cls is StreamFramer:
            self.out.extend(buffers)
        else:
            encode = self.framer.encode
            for frame in buffers:
                self.out.extend(encode([frame]))

    def shut(self, now_ms):
        """Close the connection; the next attempt waits out the backoff."""
        self.transport.close()
        self.transport = None
        self.out = []
        self.writing = False
        self.next_connect_ms = now_ms + self.backoff.next_delay_ms()
