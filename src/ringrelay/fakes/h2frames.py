"""HTTP/2 frame and HPACK encoding for the lean fake server (`h2lean.py`) and nothing else.

It exists only to make the benchmark's fake APNs/FCM cheap enough to share the load core with
the load generator (h2lean.py says why). The relay's client is pyreqwest (providers/http2.py),
and the tests judge it against h2's server side, an independent implementation; this code was
the framing half of the relay's former own client (issue 20 retired it), kept here for the fake.

RFC 9113 §3.4 (connection preface), §6 (frame types and flags), §6.5.2 (settings), §7 (errors);
RFC 7541 (HPACK) for the answers' header blocks, encoded without touching the dynamic table.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from hpack.table import HeaderTable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 1, 2, 3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 4, 5
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0, 1, 3, 6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 7, 8, 9
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1

_FRAME_HEADER = struct.Struct(">HBBBL")  # length (24 bits as 16 + 8), type, flags, stream id
_STATIC_FIELDS = {pair: i for i, pair in enumerate(HeaderTable.STATIC_TABLE, start=1)}
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_NAMES.setdefault(_name, _index)


class ProtocolViolation(Exception):
    """The peer broke RFC 9113: the connection ends with GOAWAY carrying `code`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- HPACK, request side (RFC 7541) ----------------------------------------------------------


def _integer(value: int, prefix_bits: int, first_byte: int) -> bytes:
    """RFC 7541 §5.1: an integer in an N-bit prefix, then 7-bit groups."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first_byte | value,))
    out = bytearray((first_byte | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(value: bytes) -> bytes:
    """RFC 7541 §5.2, without Huffman coding (in Python it costs more CPU than the bytes save)."""
    return _integer(len(value), 7, 0) + value


def header_field(name: bytes, value: bytes, *, sensitive: bool = False) -> bytes:
    """One header field, encoded without touching the dynamic table: an indexed field when the
    static table has the pair, else a literal "without indexing", or "never indexed" when
    `sensitive` (RFC 7541 §6.2.3: intermediaries must not compress it either; for credentials
    and per-request values). Names must be lowercase (RFC 9113 §8.2.1)."""
    if not sensitive and (index := _STATIC_FIELDS.get((name, value))):
        return _integer(index, 7, 0x80)
    first = 0x10 if sensitive else 0x00
    name_index = _STATIC_NAMES.get(name, 0)
    if name_index:
        return _integer(name_index, 4, first) + _string(value)
    return bytes((first,)) + _string(name) + _string(value)


def encode_frame(kind: int, flags: int, stream_id: int, payload: bytes | memoryview = b"") -> bytes:
    length = len(payload)
    return _FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id) + payload


def read_frames(inbox: bytearray) -> Iterator[tuple[int, int, int, bytes]]:
    """The complete frames at the start of `inbox` as (type, flags, stream id, payload); what
    they took is removed from `inbox` when the iteration ends, however it ends. Frames over
    the default SETTINGS_MAX_FRAME_SIZE are refused (neither side here raises it)."""
    position = 0
    try:
        while len(inbox) - position >= 9:
            high, low, kind, flags, stream_id = _FRAME_HEADER.unpack_from(inbox, position)
            length = (high << 8) | low
            if length > DEFAULT_MAX_FRAME:
                raise ProtocolViolation(FRAME_SIZE_ERROR, f"{length}-byte frame")
            end = position + 9 + length
            if end > len(inbox):
                break
            payload = bytes(inbox[position + 9 : end])
            position = end
            yield kind, flags, stream_id & MAX_STREAM_ID, payload
    finally:
        del inbox[:position]


class HeaderBlocks:
    """Joins a header block sent as HEADERS and CONTINUATION frames (RFC 9113 §6.2, §6.10): the
    HEADERS or CONTINUATION that ends it returns (stream id, the HEADERS frame's flags, block)."""

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open: tuple[int, int, list[bytes]] | None = None

    @property
    def open(self) -> bool:
        """A block is incomplete: any frame but its CONTINUATION is a protocol error."""
        return self._open is not None

    def headers(self, stream_id: int, flags: int, payload: bytes) -> tuple[int, int, bytes] | None:
        if flags & PADDED:
            payload = unpad(payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if flags & END_HEADERS:
            return stream_id, flags, payload
        self._open = (stream_id, flags, [payload])
        return None

    def continuation(
        self, stream_id: int, flags: int, payload: bytes
    ) -> tuple[int, int, bytes] | None:
        if self._open is None or self._open[0] != stream_id:
            raise ProtocolViolation(PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._open[2].append(payload)
        if not flags & END_HEADERS:
            return None
        stream_id, first_flags, fragments = self._open
        self._open = None
        return stream_id, first_flags, b"".join(fragments)


def unpad(payload: bytes) -> bytes:
    """RFC 9113 §6.1/§6.2: the first byte is the padding length."""
    if not payload or payload[0] >= len(payload):
        raise ProtocolViolation(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - payload[0]]
