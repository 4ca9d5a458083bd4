"""Build the Starlette app of one API server from its ``ServerContext``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from apiserver.context import ServerContext
from apiserver.errors import ApiError
from apiserver.loop_lag import LoopLagMonitor
from apiserver.middleware import FaninMiddleware
from apiserver.routes_embeddings import EmbeddingRoutes
from apiserver.routes_misc import MiscRoutes
from apiserver.routes_openai import GenerationRoutes

log = logging.getLogger(__name__)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return ApiError(exc.status_code, exc.detail, headers=dict(exc.headers or {})).response()


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Starlette answers with this, then re-raises: FaninMiddleware logs the traceback.
    return ApiError(500, "internal server error").response()


#: Every error inside the app becomes an OpenAI error object, Starlette's own included.
EXCEPTION_HANDLERS = {ApiError: _api_error, HTTPException: _http_error, Exception: _unexpected}


def build_app(ctx: ServerContext) -> FaninMiddleware:
    """The ASGI app: routes behind the fanin middleware. Its lifespan starts the loop-lag
    monitor; its shutdown (after uvicorn's graceful drain) aborts what is still running in the
    engine and closes sockets."""

    loop_lag = LoopLagMonitor(ctx.index)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop_lag.start()
        yield
        loop_lag.stop()
        ctx.client.abort_all()
        await ctx.fetcher.aclose()
        await ctx.client.close()
        ctx.renderer.close()

    routes = [
        *GenerationRoutes(ctx).routes(),
        *EmbeddingRoutes(ctx).routes(),
        *MiscRoutes(ctx).routes(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    return FaninMiddleware(
        app,
        index=ctx.index,
        api_key=ctx.config.api_key,
        max_body_bytes=ctx.config.max_request_body_bytes,
        admission=ctx.admission,
    )
