"""The bench loads only this machine unless told otherwise, and decides that without sending
anything anywhere: no DNS lookup, no connection (both are made to fail loudly here)."""

from __future__ import annotations

import socket

import pytest

from bench import cli
from bench.target import TargetError, parse_target

REFUSED = [
    "http://10.0.0.1:8000",
    "http://192.168.1.20",
    "http://172.16.0.1:8000",
    "http://8.8.8.8",
    "http://0.0.0.0:8000",
    "http://[::ffff:10.1.2.3]:8000",
    "http://[fe80::1]:8000",
    "http://example.com",
    "http://localhost.example.com:8000",
    "http://127.0.0.1.example.com",
    "https://api.openai.com",
]
ACCEPTED = {
    "http://127.0.0.1:8000": ("127.0.0.1", 8000, ""),
    "http://127.1.2.3:9": ("127.1.2.3", 9, ""),
    "http://localhost:8000/": ("127.0.0.1", 8000, ""),
    "http://LOCALHOST": ("127.0.0.1", 80, ""),
    "http://[::1]:8000/prefix/": ("::1", 8000, "/prefix"),
    "http://[::ffff:127.0.0.1]:8000": ("::ffff:127.0.0.1", 8000, ""),
    "https://127.0.0.1": ("127.0.0.1", 443, ""),
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError(f"network used: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "gethostbyname", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.mark.parametrize("url", REFUSED)
def test_non_loopback_targets_are_refused(url: str) -> None:
    with pytest.raises(TargetError, match="--allow-remote"):
        parse_target(url)


@pytest.mark.parametrize("url", REFUSED)
def test_allow_remote_accepts_them(url: str) -> None:
    assert not parse_target(url, allow_remote=True).is_loopback


@pytest.mark.parametrize(("url", "expected"), ACCEPTED.items())
def test_loopback_targets(url: str, expected: tuple[str, int, str]) -> None:
    target = parse_target(url)
    assert (target.connect_host, target.port, target.base_path) == expected
    assert target.is_loopback


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1", "127.0.0.1:8000", "http://:80", "http://127.0.0.1:99999",
            "http://user:pw@127.0.0.1", "http://127.0.0.1/?q=1"],
)  # fmt: skip
def test_malformed_urls(url: str) -> None:
    with pytest.raises(TargetError):
        parse_target(url)


def test_the_command_refuses_before_sending_anything(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--base-url", "http://10.1.2.3:8000", "--num-prompts", "5"])
    assert exit_.value.code == 2
    assert "not this machine" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--configs", "1x1", "--base-url", "http://10.1.2.3"])  # no such flag
