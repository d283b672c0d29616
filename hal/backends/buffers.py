"""Output buffer lists: what the event loops hand to sendmsg, and what a partial send leaves.

Owns one helper shared by the runtime's link and NBD paths (hal/runtime/loop.py,
hal/host/tls_port.py, hal/runtime/logship.py): buffers are bytes, bytearrays or
memoryviews, never copied; a partial send leaves a memoryview of the rest.
"""


def consume(buffers, sent):
    """Drop `sent` bytes from the front of a list of buffers (one slice, not a pop per buffer)."""
    k = 0
    n = len(buffers)
    while sent and k < n:
        first = buffers[k]
        size = first.nbytes if first.__class__ is memoryview else len(first)
        if sent >= size:
            sent -= size
            k += 1
        else:
            buffers[k] = memoryview(first)[sent:]
            sent = 0
    if k:
        del buffers[:k]
