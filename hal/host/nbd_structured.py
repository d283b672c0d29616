"""NBD structured replies (NBD_OPT_STRUCTURED_REPLY), mixed into NbdConnection.

Owns how a connection that negotiated structured replies answers: a READ with
one NBD_REPLY_TYPE_OFFSET_DATA chunk flagged DONE (so NBD_CMD_FLAG_DF always
holds: there is never more than one content chunk), an error with one
NBD_REPLY_TYPE_ERROR chunk flagged DONE, NBD_CMD_BLOCK_STATUS with one
NBD_REPLY_TYPE_BLOCK_STATUS chunk for `base:allocation`, and every other
successful reply as a simple reply, which the spec allows for any request
but READ when the reply carries no payload. The layouts are the construct
declarations of firmware/formats/nbd.py, packed here by their struct twins.

Rules:
- Connections that never negotiate pay nothing: negotiation rebinds `reply`
  and `_queue_reply` on the instance, so the simple path runs unchanged code.
- A block status answer is a list of (length_bytes, status) runs from the
  request's offset. It is trimmed here to what the spec allows: one
  descriptor with NBD_CMD_FLAG_REQ_ONE, at most BLOCK_STATUS_DESCRIPTORS_MAX
  otherwise (the client asks again for the rest), neighbours of equal status
  joined, never more than the request's length.
- NBD_OPT_STARTTLS starts option haggling over: what was negotiated in the
  clear is forgotten.
"""
from __future__ import annotations

import struct

from firmware.formats import nbd as W

from hal.host.nbd_const import (BASE_ALLOCATION_ID, NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FUA,
                        NBD_CMD_FLAG_REQ_ONE, NBD_CMD_READ, NBD_SIMPLE_REPLY_MAGIC, _SIMPLE_REPLY)

BLOCK_STATUS_DESCRIPTORS_MAX = 1024       # 8 KiB of descriptors per reply at most

_MAGIC, _DONE = W.STRUCTURED_REPLY_MAGIC, W.REPLY_FLAG_DONE
_HEAD = W.STRUCTURED_REPLY_HEAD_STRUCT
_DATA_HEAD = W.OFFSET_DATA_CHUNK_HEAD_STRUCT
_ERROR = W.ERROR_CHUNK_STRUCT
_NONE_SIZE = _HEAD.size


class StructuredReplies:
    """Mixin for NbdConnection: the structured half of replying."""

    structured = False                    # NBD_OPT_STRUCTURED_REPLY was acknowledged
    meta_export = None                    # the export base:allocation was selected for, if any

    def _use_structured_replies(self) -> None:
        self.structured = True
        self.reply = self._reply_structured
        self._queue_reply = self._queue_reply_structured

    def _forget_structured_replies(self) -> None:
        self.structured = False
        self.meta_export = None
        self.__dict__.pop("reply", None)
        self.__dict__.pop("_queue_reply", None)

    def _structured_command_flags(self, export, flags: dict) -> dict:
        """The command flags valid once structured replies (and maybe base:allocation) are on."""
        if self.structured:
            flags[NBD_CMD_READ] |= NBD_CMD_FLAG_DF
            if self.meta_export is export:
                fua = flags[NBD_CMD_READ] & NBD_CMD_FLAG_FUA
                flags[NBD_CMD_BLOCK_STATUS] = fua | NBD_CMD_FLAG_REQ_ONE
        return flags

    def _reply_structured(self, request_or_cookie, error: int = 0, data=None) -> None:
        """reply() once structured replies are negotiated (same contract)."""
        if isinstance(request_or_cookie, int):
            assert data is None, "a reply with data needs its request"
            cookie, op, request = request_or_cookie, None, None
        else:
            request = request_or_cookie
            cookie, op = request.cookie, request.op
            if op == NBD_CMD_READ:
                self.read_bytes_owed -= request.length
                assert error or len(data) == request.length
        assert self.inflight > 0, "reply without a request in flight"
        self.inflight -= 1
        if self.closed:
            return                          # hung up: nobody to send it to
        if error:
            self._queue_error_chunk(cookie, error)
        elif op == NBD_CMD_READ:
            self._out.append(_DATA_HEAD.pack(_MAGIC, _DONE, W.REPLY_TYPE_OFFSET_DATA, cookie,
                                             8 + len(data), request.offset))
            self._out.append(data)
            self.unsent_bytes += _DATA_HEAD.size + len(data)
        elif op == NBD_CMD_BLOCK_STATUS:
            chunk = block_status_chunk(cookie, request, data)
            self._out.append(chunk)
            self.unsent_bytes += len(chunk)
        elif op is None:
            self._queue_none_chunk(cookie)  # the request is unknown here: NONE suits any
        else:
            self._out.append(_SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie))
            self.unsent_bytes += _SIMPLE_REPLY.size
        if self._draining and not self.inflight:
            self._close("client sent NBD_CMD_DISC")

    def _queue_reply_structured(self, cookie, error) -> None:
        """The engine's own answers (refusals, empty requests) once structured replies are on."""
        if error:
            self._queue_error_chunk(cookie, error)
        else:
            self._queue_none_chunk(cookie)

    def _queue_error_chunk(self, cookie, error) -> None:
        self._out.append(_ERROR.pack(_MAGIC, _DONE, W.REPLY_TYPE_ERROR, cookie, 6, error, 0))
        self.unsent_bytes += _ERROR.size

    def _queue_none_chunk(self, cookie) -> None:
        self._out.append(_HEAD.pack(_MAGIC, _DONE, W.REPLY_TYPE_NONE, cookie, 0))
        self.unsent_bytes += _NONE_SIZE


def block_status_runs(request, runs) -> list:
    """(length, status) runs -> descriptors the spec allows for this request (see the rules)."""
    limit = 1 if request.flags & NBD_CMD_FLAG_REQ_ONE else BLOCK_STATUS_DESCRIPTORS_MAX
    out, total = [], 0
    for length, status in runs:
        assert length > 0, "a descriptor covers at least one byte"
        length = min(length, request.length - total)
        if length <= 0:
            break
        total += length
        if out and out[-1][1] == status:
            out[-1][0] += length
        elif len(out) == limit:
            break
        else:
            out.append([length, status])
    assert out, "block status answers at least one descriptor"
    return out


def block_status_chunk(cookie, request, runs) -> bytes:
    descriptors = block_status_runs(request, runs)
    payload = struct.pack(f">I{2 * len(descriptors)}I", BASE_ALLOCATION_ID,
                          *[v for pair in descriptors for v in pair])
    return _HEAD.pack(_MAGIC, _DONE, W.REPLY_TYPE_BLOCK_STATUS, cookie, len(payload)) + payload
