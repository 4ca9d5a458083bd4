"""OpenAI-style error objects: one exception type for every client-visible failure, and the
JSON body the ``openai`` client parses (``{"error": {message, type, param, code}}``); the client
picks its exception class (BadRequestError, NotFoundError, ...) from the status alone."""

from __future__ import annotations

import re

import msgspec
from starlette.responses import Response

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """A request failed in a way the client should hear about, with this HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        """The OpenAI error object (also the payload of an SSE error event)."""
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        return Response(
            msgspec.json.encode(self.body()),
            status_code=self.status,
            headers=self.headers,
            media_type="application/json",
        )


_PATH = re.compile(r"at `\$\.?([^`]*)`")


def from_validation(exc: msgspec.ValidationError | msgspec.DecodeError) -> ApiError:
    """A msgspec decode failure as a 400 naming the offending field (``messages[0].content``)."""
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        match = _PATH.search(text)
        return ApiError(400, f"invalid request: {text}", param=match.group(1) if match else None)
    return ApiError(400, f"invalid JSON body: {text}", code="invalid_json")


def engine_unavailable(reason: str) -> ApiError:
    """The engine core is gone: every request fails fast with this (never hangs)."""
    return ApiError(
        503,
        f"engine unavailable: {reason}",
        code="engine_unavailable",
        headers={"Retry-After": "1"},
    )
