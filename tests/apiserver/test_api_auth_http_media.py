"""An API server with an API key and http(s) images allowed from private addresses but only
from the domain ``localhost``; images come from a tiny HTTP server on 127.0.0.1."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

KEY = "test-key-123"


@pytest.fixture(scope="module")
def image_server(media_dir: Path) -> Iterator[int]:
    png = (media_dir / "astronaut.png").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            port = self.server.server_address[1]
            if self.path == "/astronaut.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
            elif self.path == "/hop":  # to an address outside the allowed domain
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{port}/astronaut.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stack(stack_factory: Any) -> Any:
    return stack_factory(
        api_key=KEY, allow_private_media_urls=True, allowed_media_domains=["localhost"]
    )


def chat_image(client: openai.OpenAI, url: str) -> Any:
    return client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
        max_tokens=2,
    )


def test_api_key_required_except_health(stack: Any) -> None:
    for key in ("wrong-key", "x"):
        with pytest.raises(openai.AuthenticationError):
            stack.client(api_key=key).models.list()
    with httpx.Client(base_url=stack.url) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 401
        ready = http.get("/ready", headers={"Authorization": f"Bearer {KEY}"})
        assert ready.status_code == 200
        assert http.get("/metrics").status_code == 401
        denied = http.post("/v1/chat/completions", json={"model": "default"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert [m.id for m in stack.client().models.list().data] == ["default"]


def test_http_image_from_allowed_domain(stack: Any, image_server: int) -> None:
    r = chat_image(stack.client(), f"http://localhost:{image_server}/astronaut.png")
    assert r.usage.prompt_tokens > 100


def test_http_image_outside_allowed_domains(stack: Any, image_server: int) -> None:
    with pytest.raises(openai.BadRequestError, match="not allowed"):
        chat_image(stack.client(), f"http://127.0.0.1:{image_server}/astronaut.png")


def test_redirect_out_of_allowed_domains_refused(stack: Any, image_server: int) -> None:
    with pytest.raises(openai.BadRequestError, match="not allowed"):
        chat_image(stack.client(), f"http://localhost:{image_server}/hop")
    with pytest.raises(openai.BadRequestError, match="HTTP 404"):
        chat_image(stack.client(), f"http://localhost:{image_server}/missing.png")
    assert chat_image(stack.client(), f"http://localhost:{image_server}/astronaut.png").choices
