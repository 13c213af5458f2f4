"""Single flight: one execution per key, shared results, sane cancellation."""

from __future__ import annotations

import asyncio

import pytest

from nydus_vfs.storage._singleflight import SingleFlight
from tests.unit.storage.storage_helpers import run


def test_concurrent_callers_share_one_execution():
    async def main():
        flights: SingleFlight[int] = SingleFlight()
        gate = asyncio.Event()
        calls = 0

        async def work():
            nonlocal calls
            calls += 1
            await gate.wait()
            return 42

        tasks = [asyncio.ensure_future(flights.run("k", work)) for _ in range(10)]
        await asyncio.sleep(0)
        assert "k" in flights and len(flights) == 1
        gate.set()
        assert await asyncio.gather(*tasks) == [42] * 10
        assert calls == 1 and len(flights) == 0

    run(main())


def test_different_keys_run_independently():
    async def main():
        flights: SingleFlight[str] = SingleFlight()

        async def work(v):
            await asyncio.sleep(0)
            return v

        assert await asyncio.gather(flights.run(1, lambda: work("a")), flights.run(2, lambda: work("b"))) == ["a", "b"]

    run(main())


def test_errors_reach_every_waiter_and_the_key_is_freed():
    async def main():
        flights: SingleFlight[int] = SingleFlight()
        gate = asyncio.Event()

        async def failing():
            await gate.wait()
            raise KeyError("boom")

        tasks = [asyncio.ensure_future(flights.run("k", failing)) for _ in range(3)]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, KeyError) for r in results)

        async def ok():
            return 1

        assert await flights.run("k", ok) == 1

    run(main())


def test_cancelled_leader_hands_over_to_a_follower():
    async def main():
        flights: SingleFlight[str] = SingleFlight()
        gate = asyncio.Event()
        calls = []

        async def work(name):
            calls.append(name)
            await gate.wait()
            return name

        leader = asyncio.ensure_future(flights.run("k", lambda: work("leader")))
        await asyncio.sleep(0)
        follower = asyncio.ensure_future(flights.run("k", lambda: work("follower")))
        await asyncio.sleep(0)
        leader.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        gate.set()
        assert await follower == "follower"
        assert calls == ["leader", "follower"]
        with pytest.raises(asyncio.CancelledError):
            await leader

    run(main())


def test_cancelled_follower_does_not_disturb_the_others():
    async def main():
        flights: SingleFlight[int] = SingleFlight()
        gate = asyncio.Event()

        async def work():
            await gate.wait()
            return 7

        leader = asyncio.ensure_future(flights.run("k", work))
        await asyncio.sleep(0)
        f1 = asyncio.ensure_future(flights.run("k", work))
        f2 = asyncio.ensure_future(flights.run("k", work))
        await asyncio.sleep(0)
        f1.cancel()
        gate.set()
        assert await leader == 7 and await f2 == 7
        assert f1.cancelled()

    run(main())


def test_a_leader_that_never_suspends_needs_no_event_loop():
    flights: SingleFlight[int] = SingleFlight()

    async def work():
        return 5

    coro = flights.run("k", work)
    with pytest.raises(StopIteration) as info:
        coro.send(None)  # no running loop at all
    assert info.value.value == 5 and len(flights) == 0
