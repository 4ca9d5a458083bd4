"""Everything a route needs, built once per process in ``server.py`` and handed to the route
classes' constructors (typed, instead of the untyped ``app.state`` bag)."""

from __future__ import annotations

from dataclasses import dataclass

from apiserver.admission import Admission
from apiserver.config import ServerConfig
from apiserver.engine_client import EngineClient
from apiserver.media import MediaFetcher
from apiserver.renderer import Renderer
from ipc.messages import Ready


@dataclass(slots=True)
class ServerContext:
    """The long-lived objects of one API-server process."""

    config: ServerConfig
    index: int
    model_name: str
    ready: Ready
    client: EngineClient
    renderer: Renderer
    fetcher: MediaFetcher
    admission: Admission
    #: Set on SIGTERM when ``shutdown_delay`` is on: /ready answers 503 from then on.
    draining: bool = False
