"""The one pure-ASGI middleware in front of every route. In order, before any body byte is
read: request id, API key, Content-Length cap, admission control. While the body streams in,
it counts bytes (chunked bodies have no Content-Length); a request counts as in flight only
once its whole body is in, so clients that send a body slowly (bounded by the connection
limits of ``http_guard``) never hold admission slots. On the way out it stamps the server
index and request id on the response and counts the status; unexpected exceptions are logged
and answered with an OpenAI-style 500. A client that leaves before its answer is complete
counts as 499 and is logged at info, without a traceback: client behaviour must not look like
a server fault to alerts on 5xx."""

from __future__ import annotations

import hmac
import logging
import re
import uuid
from collections.abc import MutableMapping
from typing import Any

from apiserver import metrics
from apiserver.admission import Admission
from apiserver.errors import ApiError
from apiserver.http_guard import BODY_TIMED_OUT

log = logging.getLogger(__name__)

#: Routes that start work in the engine: they pass admission control and count as in flight.
ADMITTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
KNOWN_PATHS = ADMITTED_PATHS | {
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/health",
    "/ready",
    "/metrics",
    "/version",
}
#: Liveness alone answers without the key. Readiness says whether the engine is up, so it
#: needs the key like everything else; load balancers send it (deploy/haproxy.cfg).
_OPEN_PATHS = frozenset({"/health"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

Scope = dict[str, Any]


class FaninMiddleware:
    """See the module docstring; ``api_key`` None disables the key check."""

    def __init__(
        self,
        app: Any,
        *,
        index: int,
        api_key: str | None,
        max_body_bytes: int,
        admission: Admission,
    ) -> None:
        self._app = app
        self._index = str(index)
        self._api_key = api_key.encode() if api_key else None
        self._max_body = max_body_bytes
        self._admission = admission

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        path = scope["path"]
        status = 500
        started = completed = client_left = False

        async def send_stamped(message: MutableMapping[str, Any]) -> None:
            nonlocal status, started, completed
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-fanin-server", self._index.encode()),
                    (b"x-request-id", rid.encode()),
                ]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                completed = True
            await send(message)

        received = 0
        admitted = False
        to_admit = path in ADMITTED_PATHS and scope["method"] == "POST"

        async def receive_counted() -> dict[str, Any]:
            nonlocal received, admitted, client_left
            message: dict[str, Any] = await receive()
            if message["type"] == "http.disconnect" and not completed:
                client_left = True
            elif message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max_body:
                    raise self._too_large()
                if to_admit and not admitted and not message.get("more_body", False):
                    self._admission.enter()
                    admitted = True
                    metrics.INFLIGHT.labels(self._index).inc()
            return message

        try:
            self._check_key(path, headers)
            length = headers.get(b"content-length", b"0")
            if not length.isdigit() or int(length) > self._max_body:
                raise self._too_large() if length.isdigit() else ApiError(400, "bad Content-Length")
            if to_admit:
                self._admission.check()  # a full server says so before reading the body
            await self._app(scope, receive_counted, send_stamped)
        except ApiError as err:
            if not started:
                await err.response()(scope, receive, send_stamped)
        except Exception:
            log.exception("unhandled error on %s %s (request %s)", scope["method"], path, rid)
            if not started:
                await ApiError(500, "internal server error").response()(
                    scope, receive, send_stamped
                )
        finally:
            if admitted:
                self._admission.leave()
                metrics.INFLIGHT.labels(self._index).dec()
            if scope["state"].get(BODY_TIMED_OUT):
                status = 408  # http_guard answered it and told the app the client was gone
            elif client_left:
                status = 499
                log.info(
                    "%s %s: the client left before its answer was complete (request %s)",
                    scope["method"],
                    path,
                    rid,
                )
            endpoint = path if path in KNOWN_PATHS else "other"
            metrics.REQUESTS.labels(endpoint, str(status)).inc()

    def _check_key(self, path: str, headers: dict[bytes, bytes]) -> None:
        if self._api_key is None or path in _OPEN_PATHS:
            return
        auth = headers.get(b"authorization", b"")
        scheme, _, key = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self._api_key):
            raise ApiError(
                401,
                "missing or invalid API key (send 'Authorization: Bearer <key>')",
                code="invalid_api_key",
            )

    def _too_large(self) -> ApiError:
        return ApiError(
            413, f"request body larger than {self._max_body} bytes", code="body_too_large"
        )
