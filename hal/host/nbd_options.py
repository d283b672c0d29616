"""NBD option haggling: the handlers of the fixed newstyle options, mixed into NbdConnection.

Owns the options: EXPORT_NAME, ABORT, LIST, INFO and GO (with NBD_INFO_EXPORT,
NAME, DESCRIPTION and BLOCK_SIZE), STARTTLS, STRUCTURED_REPLY, and the metadata
contexts (SET_META_CONTEXT, LIST_META_CONTEXT with `base:allocation`). Each
handler gets the option's data, whole and bounded, and queues its replies;
the connection state it changes is the engine's (hal/host/nbd.py).

Rules:
- Malformed option data gets NBD_REP_ERR_INVALID and the haggling goes on;
  only NBD_OPT_EXPORT_NAME, which cannot be errored, hangs up.
- Metadata contexts need structured replies first (NBD_REP_ERR_INVALID
  otherwise, as the spec says); NBD_OPT_SET_META_CONTEXT replaces the
  selection, and the selection holds only for the export it named: entering
  another export drops it.
- Extended headers are not offered (NBD_REP_ERR_UNSUP).
"""
from __future__ import annotations

import struct

from firmware.formats import FormatError
from firmware.formats import nbd as W

from hal.host.nbd_const import *  # noqa: F403 (the protocol's numbers)
from hal.host.nbd_const import _EXPORT_NAME_REPLY, _INFO_EXPORT, _OPTION, _OPTION_REPLY, _U16, _U32, _ZEROES_124

_INFO_BLOCK_SIZE = W.INFO_BLOCK_SIZE_STRUCT


class NbdOptionError(ValueError):
    """Malformed option data from the client (answered NBD_REP_ERR_INVALID)."""


def parse_info_request_untrusted(data) -> tuple[str, tuple]:
    """NBD_OPT_INFO / NBD_OPT_GO data -> (export name, requested info types)."""
    if len(data) < 6:
        raise NbdOptionError("option data shorter than 6 bytes")
    (name_len,) = _U32.unpack_from(data, 0)
    if name_len > NBD_STRING_MAX_BYTES or len(data) < 6 + name_len:
        raise NbdOptionError(f"export name length {name_len} does not fit the option")
    name = _decode_name_untrusted(data[4:4 + name_len])
    (count,) = _U16.unpack_from(data, 4 + name_len)
    if len(data) != 6 + name_len + 2 * count:
        raise NbdOptionError(f"{count} info requests do not match the option length")
    return name, struct.unpack_from(f">{count}H", data, 6 + name_len)


def _decode_name_untrusted(raw) -> str:
    try:
        name = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NbdOptionError("export name is not UTF-8") from exc
    if "\0" in name:
        raise NbdOptionError("export name contains NUL")
    return name


class OptionHaggling:
    """Mixin for NbdConnection: one method per option, called with (option, data)."""

    def _opt_export_name(self, option, data) -> None:
        try:
            export = self._lookup(_decode_name_untrusted(data))
        except NbdOptionError:
            export = None
        if export is None:                      # this option cannot be errored: hang up
            self._fatal(f"NBD_OPT_EXPORT_NAME for unknown export {bytes(data)[:64]!r}")
            return
        self._out.append(_EXPORT_NAME_REPLY.pack(export.size_bytes, self._transmission_flags(export)))
        self.unsent_bytes += _EXPORT_NAME_REPLY.size
        if not self.no_zeroes:
            self._out.append(_ZEROES_124)
            self.unsent_bytes += len(_ZEROES_124)
        self._enter_state(export)

    def _opt_abort(self, option, data) -> None:
        self._option_reply(option, NBD_REP_ACK)
        self._close("client sent NBD_OPT_ABORT")

    def _opt_list(self, option, data) -> None:
        if data:
            self._option_reply(option, NBD_REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
            return
        for export in self.exports:
            name = export.name.encode()
            self._option_reply(option, NBD_REP_SERVER,
                               _U32.pack(len(name)) + name + export.description.encode())
        self._option_reply(option, NBD_REP_ACK)

    def _opt_info_go(self, option, data) -> None:
        try:
            name, infos = parse_info_request_untrusted(data)
        except NbdOptionError as exc:
            self._option_reply(option, NBD_REP_ERR_INVALID, str(exc).encode())
            return
        export = self._lookup(name)
        if export is None:
            self._option_reply(option, NBD_REP_ERR_UNKNOWN, f"no export {name[:64]!r}".encode())
            return
        for info in self._info_replies(export, infos):
            self._option_reply(option, NBD_REP_INFO, info)
        self._option_reply(option, NBD_REP_ACK)
        if option == NBD_OPT_GO:
            self._enter_state(export)

    def _info_replies(self, export, infos) -> list:
        """NBD_INFO_EXPORT always; the others only when asked for."""
        replies = [_INFO_EXPORT.pack(NBD_INFO_EXPORT, export.size_bytes, self._transmission_flags(export))]
        if NBD_INFO_NAME in infos:
            replies.append(_U16.pack(NBD_INFO_NAME) + export.name.encode())
        if NBD_INFO_DESCRIPTION in infos and export.description:
            replies.append(_U16.pack(NBD_INFO_DESCRIPTION) + export.description.encode())
        if NBD_INFO_BLOCK_SIZE in infos:
            replies.append(_INFO_BLOCK_SIZE.pack(
                NBD_INFO_BLOCK_SIZE, export.min_block_bytes, export.preferred_block_bytes,
                self._payload_limit(export)))
        return replies

    def _opt_starttls(self, option, data) -> None:
        if self.tls == "off":
            self._opt_unsupported(option, data)
        elif self.tls_active:
            self._option_reply(option, NBD_REP_ERR_INVALID, b"TLS is already on")
        elif data:
            self._option_reply(option, NBD_REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
        else:
            self._option_reply(option, NBD_REP_ACK)
            self.starttls = True
            self._phase = self._phase_tls_wait

    def _refuse_without_tls(self, option) -> bool:
        if option == NBD_OPT_EXPORT_NAME:       # cannot be errored: hang up
            return self._fatal("NBD_OPT_EXPORT_NAME without TLS, which this server requires")
        self._option_reply(option, NBD_REP_ERR_TLS_REQD, b"this server requires TLS (NBD_OPT_STARTTLS)")
        return True

    def _opt_unsupported(self, option, data) -> None:
        # Extended headers, STARTTLS with TLS off and anything unknown.
        self._option_reply(option, NBD_REP_ERR_UNSUP, f"option {option} is not supported".encode())

    def _refuse_big_option(self, option, length) -> bool:
        if option == NBD_OPT_EXPORT_NAME or length > OPTION_DISCARD_MAX_BYTES:
            return self._fatal(f"option {option} with {length} bytes of data is too large")
        reply = NBD_REP_ERR_TOO_BIG if option in OPTION_HANDLERS else NBD_REP_ERR_UNSUP
        self._start += _OPTION.size
        return self._discard(length, self._phase_option,
                             lambda: self._option_reply(option, reply, b"option data too large"))

    def _option_reply(self, option, reply_type, data=b"") -> None:
        self._out.append(_OPTION_REPLY.pack(NBD_REP_MAGIC, option, reply_type, len(data)) + data)
        self.unsent_bytes += _OPTION_REPLY.size + len(data)

    def _opt_structured_reply(self, option, data) -> None:
        if data:
            self._option_reply(option, NBD_REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
            return
        self._option_reply(option, NBD_REP_ACK)
        self._use_structured_replies()

    def _opt_meta_context(self, option, data) -> None:
        """LIST answers what a query would select; SET selects it (only base:allocation exists)."""
        if not self.structured:
            self._option_reply(option, NBD_REP_ERR_INVALID, b"negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        try:
            name, queries = W.parse_meta_context_request_untrusted(data)
        except FormatError as exc:
            self._option_reply(option, NBD_REP_ERR_INVALID, str(exc).encode()[:NBD_STRING_MAX_BYTES])
            return
        export = self._lookup(name)
        if export is None:
            self._option_reply(option, NBD_REP_ERR_UNKNOWN, f"no export {name[:64]!r}".encode())
            return
        if option == NBD_OPT_LIST_META_CONTEXT:
            # No query lists every context; "base:" lists the namespace.
            found = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
            context_id = 0                      # the spec: reserved in LIST replies
        else:
            found = BASE_ALLOCATION in queries
            context_id = BASE_ALLOCATION_ID
            self.meta_export = export if found else None    # SET replaces the selection
        if found:
            self._option_reply(option, NBD_REP_META_CONTEXT, W.META_CONTEXT_REPLY.build(
                dict(context_id=context_id, name=BASE_ALLOCATION)))
        self._option_reply(option, NBD_REP_ACK)

    def _transmission_flags(self, export) -> int:
        # DF only once structured replies are on (the spec: MUST be clear otherwise).
        return export.transmission_flags | (NBD_FLAG_SEND_DF if self.structured else 0)


OPTION_HANDLERS = {
    NBD_OPT_EXPORT_NAME: OptionHaggling._opt_export_name,
    NBD_OPT_ABORT: OptionHaggling._opt_abort,
    NBD_OPT_LIST: OptionHaggling._opt_list,
    NBD_OPT_INFO: OptionHaggling._opt_info_go,
    NBD_OPT_GO: OptionHaggling._opt_info_go,
    NBD_OPT_STARTTLS: OptionHaggling._opt_starttls,
    NBD_OPT_STRUCTURED_REPLY: OptionHaggling._opt_structured_reply,
    NBD_OPT_LIST_META_CONTEXT: OptionHaggling._opt_meta_context,
    NBD_OPT_SET_META_CONTEXT: OptionHaggling._opt_meta_context,
}
OPTIONS_BEFORE_TLS = frozenset((NBD_OPT_STARTTLS, NBD_OPT_ABORT))
