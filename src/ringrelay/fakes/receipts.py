"""Receipt log of a fake provider: (call id, CLOCK_MONOTONIC time) of each accepted push, for
the benchmarks' latency and completeness checks.

Kept as a list of strings and an array of floats rather than a list of tuples: a tuple per push
is an object the garbage collector walks, and after a benchmark's peak (tens of thousands of
receipts) the fake's full collections took 12-22 ms each, stalls that showed as p99 latency
that was not the relay's."""

from __future__ import annotations

from array import array
from collections.abc import Iterator


class Receipts:
    def __init__(self) -> None:
        self._ids: list[str] = []
        self._times = array("d")

    def append(self, call_id: str, received: float) -> None:
        self._ids.append(call_id)
        self._times.append(received)

    def clear(self) -> None:
        self._ids.clear()
        del self._times[:]

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[tuple[str, float]]:
        return zip(self._ids, self._times, strict=True)

    def as_json(self) -> list[list[str | float]]:
        return [[call_id, received] for call_id, received in self]
