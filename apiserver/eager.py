"""Tasks whose first step runs at once, inside the callback that starts them (Python 3.12's
eager tasks), not on the event loop's next iteration.

Under load each iteration of an API server's loop runs many callbacks (reads, streamed
chunks, engine outputs), so every hop to a next iteration is a long wait. A health check on a
fresh connection took four: accept, the connection's set-up, the head's read, the handler;
at two saturated servers that made a /health p99 of 24 ms. Setting up an accepted connection
and starting a request's handler eagerly leaves two. A handler that completes without
waiting (/health, a refusal before the body) answers inside the read of its head.

Before 3.12 the task starts on the next iteration, as asyncio's own tasks do.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def start_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """``loop.create_task(coro)``, eager where the interpreter can (``Task(eager_start=)``
    needs no support from the loop: uvloop's ``create_task`` has none)."""
    if sys.version_info >= (3, 12):
        return asyncio.Task(coro, loop=loop, eager_start=True)
    return loop.create_task(coro)
