"""Deduplicate concurrent work on the same key ("single flight").

Strategy: the first caller for a key (the *leader*) runs the work inline in its
own coroutine; later callers (*followers*) park on a future until the leader
finishes, then all get the same result or exception.

Why inline and not a task: a leader whose work never suspends (a local blob
read) must complete without touching the event loop, so that the FUSE server
can drive a cold read on a local blob to completion synchronously.  The
leader therefore creates no future; only a follower, which is about to
suspend anyway, creates one.

Batches: :meth:`SingleFlight.try_lead` / :meth:`SingleFlight.finish` /
:meth:`SingleFlight.abandon` let one coroutine lead several keys at once (one
backend request for a run of chunks); followers of any of those keys wait for
that request, exactly as for :meth:`SingleFlight.run`.

Cancellation: a cancelled follower just leaves.  A cancelled leader must not
fail its followers with *its* cancellation, so they wake up and retry, one of
them becoming the new leader.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

T = TypeVar("T")


class _LeaderGone(Exception):
    """The leader was cancelled before finishing; followers retry."""


class _Flight:
    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: list[asyncio.Future] = []


class SingleFlight(Generic[T]):
    """``await run(key, work)`` runs ``work()`` once per key at a time."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight] = {}

    def __len__(self) -> int:
        """Number of keys with work in flight."""
        return len(self._flights)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._flights

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        """Result of ``work()``, shared with every caller that asked for ``key`` meanwhile."""
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            waiter = asyncio.get_running_loop().create_future()
            flight.waiters.append(waiter)
            try:
                return await waiter
            except _LeaderGone:
                continue

        flight = _Flight()
        self._flights[key] = flight
        try:
            result = await work()
        except Exception as exc:
            self._finish(key, flight, exc=exc)
            raise
        except BaseException:  # cancellation (or interpreter exit): not the followers' failure
            self._finish(key, flight, exc=_LeaderGone())
            raise
        self._finish(key, flight, result=result)
        return result

    def try_lead(self, key: Hashable) -> _Flight | None:
        """Become the leader of ``key`` (a token for :meth:`finish`), or None if it is in flight.

        The caller must end every token it got with :meth:`finish` or
        :meth:`abandon`, also when cancelled, or followers wait forever.
        """
        if key in self._flights:
            return None
        flight = self._flights[key] = _Flight()
        return flight

    def finish(self, key: Hashable, flight: _Flight, *, result: object = None,
               exc: BaseException | None = None) -> None:
        """Hand ``result`` (or raise ``exc`` in) every follower of a flight led with :meth:`try_lead`."""
        self._finish(key, flight, result=result, exc=exc)

    def abandon(self, key: Hashable, flight: _Flight) -> None:
        """Give a flight up without a result (cancelled): its followers retry on their own."""
        self._finish(key, flight, exc=_LeaderGone())

    def _finish(self, key: Hashable, flight: _Flight, *, result: object = None,
                exc: BaseException | None = None) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        for waiter in flight.waiters:
            if waiter.done():  # that follower was cancelled
                continue
            if exc is None:
                waiter.set_result(result)
            else:
                waiter.set_exception(exc)
