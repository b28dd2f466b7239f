"""JSON values read one at a time from a file of any size: JSON lines (what `mongoexport` writes
by default) or one JSON array (`mongoexport --jsonArray`), with memory bounded by the read chunk
plus the largest single document. The standard library's C decoder parses each value
(`raw_decode`); only the framing between values is done here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Protocol

CHUNK = 1 << 20
_WHITESPACE = " \t\r\n\ufeff"  # and a byte order mark, as Windows tools write one


class TextSource(Protocol):
    def read(self, size: int, /) -> str: ...


class JsonStreamError(ValueError):
    def __init__(self, message: str, line: int) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


def iter_json_values(
    stream: TextSource, chunk: int = CHUNK, max_value_chars: int = 16 << 20
) -> Iterator[Any]:
    """Each top-level value of a JSON-lines file, or each element of a top-level array."""
    decoder = json.JSONDecoder()
    buf = ""
    pos = 0
    line = 1  # of buf[pos], for error messages
    eof = False
    in_array: bool | None = None  # unknown until the first value starts
    expect_comma = False

    def fill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        data = stream.read(chunk)
        if not data:
            eof = True
            return False
        buf = buf[pos:] + data
        pos = 0
        return True

    while True:
        # Skip whitespace (and, inside the array, the separating comma).
        while True:
            while pos < len(buf) and buf[pos] in _WHITESPACE:
                if buf[pos] == "\n":
                    line += 1
                pos += 1
            if pos < len(buf) or not fill():
                break
        if pos >= len(buf):
            if in_array:
                raise JsonStreamError("the JSON array is not closed with ']'", line)
            return
        ch = buf[pos]
        if in_array is None:
            in_array = ch == "["
            if in_array:
                pos += 1
                continue
        if in_array:
            if ch == "]":
                pos += 1
                while True:  # nothing may follow the array but whitespace
                    rest = buf[pos:].strip(_WHITESPACE)
                    if rest:
                        raise JsonStreamError("unexpected data after the JSON array", line)
                    pos = len(buf)
                    if not fill():
                        return
            if expect_comma:
                if ch != ",":
                    raise JsonStreamError("expected ',' between array elements", line)
                pos += 1
                expect_comma = False
                continue
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                # Maybe cut at the chunk's end (the error is near it, e.g. in `tru`, or a string
                # runs off it): read more and retry, up to the size limit. Otherwise bad JSON.
                cut = exc.pos >= len(buf) - 16 or exc.msg.startswith("Unterminated string")
                if cut and len(buf) - pos > max_value_chars:
                    raise JsonStreamError(
                        f"a document longer than {max_value_chars} characters", line
                    ) from None
                if cut and fill():
                    continue
                if cut:  # the end of the file came first
                    raise JsonStreamError("the file ends inside this document", line) from None
                where = line + buf.count("\n", pos, exc.pos)
                at = f" (line {where})" if where != line else ""
                raise JsonStreamError(f"this document is not JSON: {exc.msg}{at}", line) from None
            if end > len(buf) - 32 and not isinstance(value, dict | list | str):
                # A number near the buffer's end (`12` of `12.5`) may go on in the next chunk.
                if fill():
                    continue
            break
        line += buf.count("\n", pos, end)
        pos = end
        expect_comma = bool(in_array)
        yield value
