"""Auto-pipelining of Lua scripts on one Redis node, for RedisStore.

Every script submitted in one event-loop tick is queued and sent on the next tick as ONE
non-transactional pipeline: one write on the store's own connection (pipe.py). The scripts stay
separate atomic units; only their round trips are shared, which is what keeps admission and
settlement cheap on the hot path. Each caller still gets its own answer or its own error: a
script error, a NOSCRIPT (reloaded per script) or an argument that cannot be encoded is that
call's alone. The store keeps the boundary: it guards each batch (probe, connection slot,
deadline) and turns every failure into the caller's StoreError; this module only queues, packs
the commands and settles futures.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, NamedTuple

from redis.exceptions import DataError, NoScriptError

from gateway.store.pipe import Pipe, pack

# guard(op, send, deadline) runs send() under the store's probe/slot rules until deadline (loop
# time) and raises only its failure
Guard = Callable[[str, Callable[[], Awaitable[list[Any]]], float], Awaitable[list[Any]]]
# error(op, failure) -> the StoreError that caller gets (counted once, by the store)
ToError = Callable[[str, Exception], Exception]


class Call(NamedTuple):
    op: str  # script name, for errors and metrics
    command: tuple  # ("EVALSHA", sha, nkeys, *keys, *args)
    future: asyncio.Future
    source: str  # the script, for EVAL when the node lacks it
    deadline: float  # loop time its caller waits until


class Batcher:
    """The same-tick queue of one store and the pipelines it has in flight."""

    def __init__(self, pipe: Pipe, *, guard: Guard, error: ToError) -> None:
        self.pipe = pipe
        self._guard = guard
        self._error = error
        self._queue: list[Call] = []
        self._batches: set[asyncio.Task] = set()

    def submit(self, op: str, command: tuple, source: str, deadline: float) -> asyncio.Future:
        """Queue one command for this tick's pipeline; the future settles with its answer. Its
        caller may give up before (cancelling the future): the batch goes on for the others."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append(Call(op, command, future, source, deadline))
        return future

    async def drain(self) -> None:
        """Send what is queued and let the pipelines in flight answer (each is bounded)."""
        if self._queue:  # queued this tick: send them rather than leave their callers waiting
            self._flush()
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)

    def _flush(self) -> None:
        # callers cancelled in the meantime (client gone) are not sent at all
        batch = [c for c in self._queue if not c.future.done()]
        self._queue = []
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _run(self, batch: list[Call]) -> None:
        """Send one batch; settle every caller's future, each exactly once. Never raises."""
        try:
            # the batch lasts as long as its most patient caller
            deadline = max(call.deadline for call in batch)
            results: list[Any] = await self._guard(batch[0].op, lambda: self._pipeline(batch), deadline)
        except Exception as e:  # the whole pipeline failed (or never left): so did every call in it
            results = [e] * len(batch)
        except BaseException:  # this task itself cancelled (the loop is closing): so are its callers
            for call in batch:
                call.future.cancel()
            raise
        for call, result in zip(batch, results):
            if call.future.done():  # its caller gave up or left: nothing to tell, nothing to count
                continue
            if isinstance(result, Exception):  # the batch's failure, or this call's own error
                call.future.set_exception(self._error(call.op, result))
            else:
                call.future.set_result(result)

    async def _pipeline(self, batch: list[Call]) -> list[Any]:
        """The batch's commands written at once, then every answer read: a result or that
        command's own error each. A failure of the connection raises."""
        results = await self._exchange([call.command for call in batch])
        again = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if again:  # first use on this node: EVAL sends the scripts and caches them
            evals = [("EVAL", batch[i].source, *batch[i].command[2:]) for i in again]
            for i, r in zip(again, await self._exchange(evals)):
                results[i] = r
        return results

    async def _exchange(self, commands: list[tuple]) -> list[Any]:
        """``commands`` written in one go and one answer each, in order. A command that cannot
        even be encoded is not sent: its result is its DataError."""
        packed: list[bytes] = []
        unsent: dict[int, Exception] = {}
        for i, command in enumerate(commands):
            try:
                packed.append(pack(command))
            except DataError as e:  # a caller's bad argument: its own error, not the batch's
                unsent[i] = e
        replies = iter(await self.pipe.exchange(packed) if packed else ())
        return [unsent[i] if i in unsent else next(replies) for i in range(len(commands))]
