"""Fixtures of the hostile-client tests: the servers under attack (the stand-in engine stack of
tests/apiserver, and a real `fanin serve` with its real engine), and the hooks that order and
end their lives. Everything else the tests share is in hostile_kit.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile_kit import LIMITS, Fanin, stacks, start_fanin

HERE = Path(__file__).parent
#: The test that drains the shared real server with SIGHUP: it runs after this folder's others.
DRAINS_REAL = "test_sighup_drains_like_sigterm"
#: Stop functions of the servers started here: called once this folder's tests are done, so
#: that they do not idle through the rest of the session (each is safe to call twice).
_servers: list[Callable[[], object]] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    ours = [i for i in items if HERE in i.path.parents]
    drain = [i for i in ours if i.name == DRAINS_REAL]
    if drain and ours[-1] is not drain[0]:
        items.remove(drain[0])
        items.insert(items.index(ours[-1]) + 1, drain[0])


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if HERE in item.path.parents and (nextitem is None or HERE not in nextitem.path.parents):
        while _servers:
            _servers.pop()()


#: Real photos (scikit-image) in a folder, session-scoped: tests/apiserver's own fixture.
media_dir = stacks.media_dir


@pytest.fixture(scope="session")
def fake(
    tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path, media_dir: Path
) -> Iterator[Any]:
    """The stand-in engine and one API server, with the short limits, image URLs allowed
    from loopback (the tests' own image server) and from ``media_dir``."""
    stack = stacks.start_stack(
        tmp_path_factory.mktemp("hostile-fake"),
        default_model_dir,
        step_s=0.01,
        allowed_local_media_path=str(media_dir),
        allow_private_media_urls=True,
        max_image_pixels=4_000_000,
        media_fetch_timeout=2.0,
        **LIMITS,
    )
    _servers.append(stack.stop)
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def real(
    tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path, media_dir: Path
) -> Iterator[Fanin]:
    """A real `fanin serve` of the default model with 2 API servers and the short limits,
    file:// images allowed from ``media_dir``."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in LIMITS.items()]
    running = start_fanin(
        tmp_path_factory.mktemp("hostile-real"),
        default_model_dir,
        *("--api-server-count", "2", "--served-model-name", "default"),
        *("--allowed-local-media-path", str(media_dir)),
        *flags,
    )
    _servers.append(running.kill_tree)
    yield running
    running.kill_tree()


@pytest.fixture
def fake_url(fake: Any) -> str:
    return str(fake.url)


@pytest.fixture
def real_url(real: Fanin) -> str:
    return real.base_url
