"""bench.aio.within: a bounded await that never loses its caller's cancel."""

from __future__ import annotations

import asyncio
import sys

import pytest

from bench.aio import within


@pytest.mark.skipif(sys.version_info < (3, 11), reason="3.10: no asyncio.timeout, the race stays")
def test_a_cancel_landing_as_the_awaited_thing_completes_is_kept() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        waiter = asyncio.create_task(within(done, 10))
        await asyncio.sleep(0)  # the waiter now awaits ``done``
        done.set_result(1)
        waiter.cancel()  # the same loop iteration: asyncio.wait_for (3.11) returned 1 here
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())


def test_the_timeout_raises_and_a_result_in_time_is_returned() -> None:
    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await within(asyncio.sleep(5), 0.05)
        assert await within(asyncio.sleep(0, result=7), 5) == 7

    asyncio.run(main())
