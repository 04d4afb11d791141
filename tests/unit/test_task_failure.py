"""task_failure: how the runtime learns that a component's background loop died."""

from __future__ import annotations

import asyncio

from agent.errors import cancel_and_wait, task_failure


async def test_only_a_task_that_raised_reports_a_failure() -> None:
    async def boom() -> None:
        raise ValueError("broken")

    async def fine() -> None:
        return None

    running = asyncio.create_task(asyncio.sleep(60))
    failed, ended = asyncio.create_task(boom()), asyncio.create_task(fine())
    await asyncio.sleep(0.01)
    assert task_failure(None) is None
    assert task_failure(running) is None
    assert task_failure(ended) is None
    err = task_failure(failed)
    assert isinstance(err, ValueError) and str(err) == "broken"
    assert task_failure(running, None, ended, failed) is err, "the first that died, of many"
    assert task_failure(running, ended) is None
    assert task_failure() is None
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    assert task_failure(running) is None


async def test_cancel_and_wait_ends_every_task_without_raising_a_dead_ones_error() -> None:
    async def boom() -> None:
        raise ValueError("broken")

    failed = asyncio.create_task(boom())
    await asyncio.sleep(0.01)
    first, last = asyncio.create_task(asyncio.sleep(60)), asyncio.create_task(asyncio.sleep(60))
    await cancel_and_wait(first, None, failed, last)  # the dead one sits between the others
    assert first.cancelled() and last.cancelled()
    assert isinstance(task_failure(failed), ValueError), "still reported, not raised"
    await cancel_and_wait()  # nothing to stop
