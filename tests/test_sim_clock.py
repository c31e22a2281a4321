"""The virtual clock: simulated time passes without waiting, in a deterministic order."""

from __future__ import annotations

import asyncio
import time

import pytest

from simulator.clock import VirtualClockLoop, new_virtual_loop


def _run(coro_fn):  # type: ignore[no-untyped-def]
    with asyncio.Runner(loop_factory=new_virtual_loop) as runner:
        return runner.run(coro_fn())


def test_an_hour_of_sleep_passes_instantly_in_virtual_time() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualClockLoop)
        t0 = loop.time()
        await asyncio.sleep(3600)
        return t0, loop.time()

    wall0 = time.perf_counter()
    t0, t1 = _run(main)
    wall = time.perf_counter() - wall0
    assert t1 - t0 == pytest.approx(3600)
    # Not a timing assertion on our code's speed: an hour must not be slept for real.
    assert wall < 600


def test_timers_fire_in_due_order_and_deterministically() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        seen: list[tuple[str, float]] = []

        async def worker(name: str, delays: list[float]) -> None:
            for d in delays:
                await asyncio.sleep(d)
                seen.append((name, loop.time()))

        await asyncio.gather(worker("a", [1.0, 1.0, 1.0]), worker("b", [0.5, 2.0]))
        return seen

    first = _run(main)
    assert first == [("b", 0.5), ("a", 1.0), ("a", 2.0), ("b", 2.5), ("a", 3.0)]
    assert _run(main) == first


def test_wait_for_times_out_in_virtual_time() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fut, timeout=30)
        return loop.time()

    assert _run(main) == pytest.approx(30)


def test_executor_work_still_completes() -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, sum, range(1000))

    assert _run(main) == sum(range(1000))


def test_clock_never_goes_backward() -> None:
    loop = VirtualClockLoop()
    try:
        with pytest.raises(ValueError, match="backward"):
            loop.advance(-1)
    finally:
        loop.close()


def test_the_clock_lands_exactly_on_a_timer_whatever_came_before() -> None:
    # A clock that added up its jumps would reach a timer due at 0.459 at 0.45899999999999996
    # after stops at 0.136 and 0.204 (0.136 + 0.068 + 0.255 in floating point).
    async def main(stops: list[float]) -> float:
        loop = asyncio.get_running_loop()
        for when in stops:
            loop.call_at(when, lambda: None)
        reached = loop.create_future()
        loop.call_at(0.459, lambda: reached.set_result(loop.time()))
        return await reached

    with asyncio.Runner(loop_factory=new_virtual_loop) as runner:
        direct = runner.run(main([]))
    with asyncio.Runner(loop_factory=new_virtual_loop) as runner:
        stepped = runner.run(main([0.136, 0.204]))
    assert direct == stepped == 0.459
