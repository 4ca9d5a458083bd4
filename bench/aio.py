"""The bench's event loop, and its one way to bound an await in time."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout: float) -> T:
    """``await aw``; ``asyncio.TimeoutError`` after ``timeout`` seconds.

    Not ``asyncio.wait_for``: before Python 3.12 it returns the result when ``aw`` completes
    in the same loop iteration as a cancel of the caller, and the cancel is lost (CPython
    gh-86296). A SIGTERM to ``fanin bench sweep`` went unheeded that way on CI (Python 3.11):
    the run's send loop waits on a concurrency slot that a finished request had just freed.
    """
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout):
            return await aw
    return await asyncio.wait_for(aw, timeout)  # 3.10 has no asyncio.timeout; the race stays


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (as fanin's servers do), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
