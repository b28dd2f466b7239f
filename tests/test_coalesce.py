"""The group-commit helper on its own: no database wire is involved in its decisions, so a plain
coroutine stands in for the statement."""

from __future__ import annotations

import asyncio

import pytest

from ringrelay.store.coalesce import Coalescer


class Recorder:
    def __init__(self, fail_with: Exception | None = None) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.release = asyncio.Event()
        self.fail_with = fail_with

    async def run(self, batch: list[tuple[str, int]]) -> list[int]:
        self.batches.append(batch)
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return [n * 10 for _, n in batch]


async def test_writes_arriving_while_one_runs_leave_together() -> None:
    rec = Recorder()
    co: Coalescer[tuple[str, int], int] = Coalescer(rec.run, key=lambda r: r[0], max_in_flight=1)
    first = asyncio.create_task(co.submit(("a", 1)))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(co.submit((f"k{n}", n))) for n in range(2, 12)]
    await asyncio.sleep(0)
    rec.release.set()
    assert await first == 10
    assert [await t for t in rest] == [n * 10 for n in range(2, 12)]
    assert [len(b) for b in rec.batches] == [1, 10]  # the lone first write did not wait


async def test_the_same_key_never_shares_a_statement() -> None:
    rec = Recorder()
    rec.release.set()
    co: Coalescer[tuple[str, int], int] = Coalescer(rec.run, key=lambda r: r[0], max_in_flight=1)
    results = await asyncio.gather(*(co.submit(("same", n)) for n in range(3)), co.submit(("o", 9)))
    assert results == [0, 10, 20, 90]
    assert all(len({k for k, _ in b}) == len(b) for b in rec.batches)
    assert sum(len(b) for b in rec.batches) == 4 and len(rec.batches) == 3


async def test_a_failed_statement_fails_every_caller_in_it() -> None:
    rec = Recorder(fail_with=ConnectionResetError("db went away"))
    co: Coalescer[tuple[str, int], int] = Coalescer(rec.run, key=lambda r: r[0])
    calls = [asyncio.create_task(co.submit((f"k{n}", n))) for n in range(4)]
    await asyncio.sleep(0)
    rec.release.set()
    for call in calls:
        with pytest.raises(ConnectionResetError):
            await call


async def test_a_cancelled_caller_still_has_its_write_done() -> None:
    rec = Recorder()
    co: Coalescer[tuple[str, int], int] = Coalescer(rec.run, key=lambda r: r[0])
    call = asyncio.create_task(co.submit(("a", 1)))
    await asyncio.sleep(0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    rec.release.set()
    await co.drain()
    assert rec.batches == [[("a", 1)]] and co.requests == 1


async def test_batches_are_bounded() -> None:
    rec = Recorder()
    rec.release.set()
    co: Coalescer[tuple[str, int], int] = Coalescer(
        rec.run, key=lambda r: r[0], max_batch=4, max_in_flight=1
    )
    await asyncio.gather(*(co.submit((f"k{n}", n)) for n in range(10)))
    assert max(len(b) for b in rec.batches) == 4
    assert sorted(n for b in rec.batches for _, n in b) == list(range(10))
