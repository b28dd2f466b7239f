"""Group commit for a network database: concurrent writes of the same kind go out as one statement.

Each write to PostgreSQL costs a round trip, a statement start-up and a commit (a WAL flush) no
matter how few rows it carries; under load that fixed cost, not the rows, is what the database
spends its time on. A `Coalescer` lets the first caller's write go at once; callers arriving
while `max_in_flight` writes are running queue up and leave together in the next one. Nothing
waits on a timer, so a lone write is as fast as before.

Two requests for the same key (an event id) never share a statement: `ON CONFLICT DO UPDATE`
cannot touch a row twice in one command, and a second claim of an event must see the first
one's result. The later one waits for the next statement.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")


class Coalescer(Generic[Request, Result]):
    def __init__(
        self,
        run: Callable[[list[Request]], Awaitable[list[Result]]],
        key: Callable[[Request], Hashable],
        *,
        max_batch: int = 256,
        max_in_flight: int = 2,
    ) -> None:
        """`run` writes a batch in one statement and returns one result per request, in order."""
        self._run = run
        self._key = key
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[tuple[Request, asyncio.Future[Result]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # statements run, for tests and metrics
        self.requests = 0

    async def submit(self, request: Request) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        self._start()
        # A caller cancelled while waiting leaves its write in the batch: a push already sent
        # must still be recorded, and the statement's other rows do not depend on it.
        return await asyncio.shield(future)

    def _start(self) -> None:
        while self._pending and self._in_flight < self._max_in_flight:
            batch = self._take()
            self._in_flight += 1
            task = asyncio.create_task(self._flush(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[tuple[Request, asyncio.Future[Result]]]:
        batch: list[tuple[Request, asyncio.Future[Result]]] = []
        keys: set[Hashable] = set()
        rest: list[tuple[Request, asyncio.Future[Result]]] = []
        for item in self._pending:
            key = self._key(item[0])
            if len(batch) < self._max_batch and key not in keys:
                keys.add(key)
                batch.append(item)
            else:
                rest.append(item)
        self._pending = rest
        return batch

    async def _flush(self, batch: list[tuple[Request, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._run([request for request, _ in batch])
        except Exception as exc:  # every caller in the batch sees the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # a cancelled caller must not leave it "never retrieved"
        except BaseException:  # the loop is shutting down
            for _, future in batch:
                future.cancel()
            raise
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self.batches += 1
            self.requests += len(batch)
            self._in_flight -= 1
            self._start()

    async def drain(self) -> None:
        """Wait for every write submitted so far (at shutdown, before the pool closes)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
