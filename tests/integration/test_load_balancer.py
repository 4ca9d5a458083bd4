"""HAProxy, configured by deploy/haproxy.cfg (its addresses replaced by loopback ones), in front
of two real `fanin serve` instances, under steady load from official OpenAI clients: requests
spread over both; SIGTERM takes an instance out of rotation (its /ready turns 503) before its
drain ends; a rolling restart loses no request; SIGKILL costs only the requests in flight on
the killed instance. ``make install-lb`` installs HAProxy from the distribution's packages."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from fanin_proc import Fanin, free_port, start_fanin

HAPROXY = shutil.which("haproxy")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        HAPROXY is None,
        reason="haproxy is not installed (`make install-lb` installs it from the distribution)",
    ),
]

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy.cfg"
API_KEY = "lb-test-key"
NAME = "lb"
#: Above haproxy.cfg's check interval times its fall count (1 s * 2), as deploy/README.md says.
SHUTDOWN_DELAY_S = 4.0
CLIENTS = 3
#: Every load loop ends by itself after this long, whatever the test does.
LOAD_LIMIT_S = 240.0


class Balancer:
    """One HAProxy process and its admin socket."""

    def __init__(self, tmp_path: Path, backends: list[int]) -> None:
        self.port = free_port()
        self._socket = tmp_path / "haproxy.sock"
        text = CONFIG.read_text(encoding="utf-8")
        text = text.replace("global\n", f"global\n    stats socket {self._socket} mode 600\n", 1)
        text = text.replace("bind :80", f"bind 127.0.0.1:{self.port}")
        servers = re.findall(r"^    server (\S+) (\S+) check$", text, flags=re.M)
        assert len(servers) == len(backends), servers
        self.names = [name for name, _ in servers]
        for (name, address), port in zip(servers, backends, strict=True):
            text = text.replace(f"server {name} {address} ", f"server {name} 127.0.0.1:{port} ")
        config = tmp_path / "haproxy.cfg"
        config.write_text(text, encoding="utf-8")
        self.log_path = tmp_path / "haproxy.log"
        with self.log_path.open("wb") as log:
            assert HAPROXY is not None
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "FANIN_API_KEY": API_KEY},
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def states(self) -> dict[str, str]:
        """Each server's check status (UP, DOWN, ...), from ``show stat``."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self._socket))
            s.sendall(b"show stat\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        rows = csv.DictReader(io.StringIO(b"".join(chunks).decode().lstrip("# ")))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "fanin"}

    def wait_state(self, name: str, wanted: str, timeout: float) -> float:
        """Poll until server ``name`` has status ``wanted`` (prefix match); returns when."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"haproxy exited; log:\n{self.log()}"
            with contextlib.suppress(OSError):
                if self.states().get(name, "").startswith(wanted):
                    return time.monotonic()
            time.sleep(0.05)
        raise AssertionError(f"{name} never {wanted}; log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@dataclass
class Load:
    """``CLIENTS`` threads sending small completions through the balancer until stopped."""

    url: str
    ok: int = 0
    in_flight: int = 0
    started: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for _ in range(CLIENTS):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self) -> None:
        client = openai.OpenAI(
            base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30
        )
        deadline = time.monotonic() + LOAD_LIMIT_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                self.in_flight += 1
                self.started += 1
            try:
                client.completions.create(model=NAME, prompt="Hello there", max_tokens=8)
                with self._lock:
                    self.ok += 1
            except openai.OpenAIError as exc:
                with self._lock:
                    self.failures.append((time.monotonic(), repr(exc)))
            finally:
                with self._lock:
                    self.in_flight -= 1

    def wait_ok(self, more: int, timeout: float = 30.0) -> None:
        """Block until ``more`` further requests succeeded."""
        target, deadline = self.ok + more, time.monotonic() + timeout
        while self.ok < target:
            assert time.monotonic() < deadline, f"load stalled: {self.failures[-3:]}"
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(35)


def start_instance(tmp_path: Path, model: Path, port: int) -> Fanin:
    return start_fanin(
        tmp_path,
        model,
        *("--served-model-name", NAME, "--api-key", API_KEY),
        *("--shutdown-delay", str(SHUTDOWN_DELAY_S)),
        port=port,
    )


@dataclass
class Pool:
    """Two fanin instances behind one balancer, restartable on their ports."""

    tmp_path: Path
    model: Path
    instances: list[Fanin]
    balancer: Balancer

    def restart(self, i: int) -> None:
        self.instances[i] = start_instance(self.tmp_path, self.model, self.instances[i].port)

    def completions_served(self, i: int) -> int:
        """Successful completions instance ``i`` answered (its /metrics, all its servers)."""
        text = httpx.get(
            self.instances[i].base_url + "/metrics",
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=10,
        ).text
        pattern = r'^fanin_requests_total\{endpoint="/v1/completions",status="200"\} (\S+)$'
        return sum(int(float(v)) for v in re.findall(pattern, text, flags=re.M))


@pytest.fixture(scope="module")
def pool(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    tmp_path = tmp_path_factory.mktemp("lb")
    instances: list[Fanin] = []
    balancer: Balancer | None = None
    try:
        with ThreadPoolExecutor(2) as starts:  # in parallel: each takes seconds to load
            futures = [
                starts.submit(start_instance, tmp_path, default_model_dir, free_port())
                for _ in range(2)
            ]
            instances.extend(f.result() for f in futures)
        balancer = Balancer(tmp_path, [f.port for f in instances])
        for name in balancer.names:
            balancer.wait_state(name, "UP", 30)
        yield Pool(tmp_path, default_model_dir, instances, balancer)
    finally:
        if balancer is not None:
            balancer.stop()
        for instance in instances:
            instance.kill_tree()


@contextlib.contextmanager
def steady_load(pool: Pool) -> Iterator[Load]:
    load = Load(pool.balancer.url)
    load.start()
    try:
        load.wait_ok(CLIENTS * 5)
        yield load
    finally:
        load.stop()


def test_requests_spread_over_both_and_a_wrong_check_key_disturbs_nothing(pool: Pool) -> None:
    before = [pool.completions_served(i) for i in range(2)]
    with steady_load(pool) as load:
        load.wait_ok(60)
        # A misconfigured health check (wrong key) is refused alone; traffic is untouched.
        with httpx.Client(base_url=pool.instances[0].base_url, timeout=10) as http:
            for _ in range(30):
                response = http.get("/ready", headers={"Authorization": "Bearer wrong"})
                assert response.status_code == 401
                assert response.json()["error"]["code"] == "invalid_api_key"
        load.wait_ok(20)
    served = [pool.completions_served(i) - before[i] for i in range(2)]
    assert load.failures == []
    assert sum(served) >= load.ok
    assert min(served) >= 0.2 * sum(served), served


def test_rolling_restart_under_steady_load_fails_no_request(pool: Pool) -> None:
    balancer = pool.balancer
    with steady_load(pool) as load:
        for i, name in enumerate(balancer.names):
            instance = pool.instances[i]
            instance.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            out_at = balancer.wait_state(name, "DOWN", SHUTDOWN_DELAY_S + 5)
            # Out of rotation while it still serves: its drain has not ended.
            assert instance.proc.poll() is None
            assert out_at - signalled < SHUTDOWN_DELAY_S
            health = httpx.get(instance.base_url + "/health", timeout=5)
            assert health.status_code == 200
            ready = httpx.get(
                instance.base_url + "/ready",
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=5,
            )
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            assert instance.proc.wait(60) == 0
            instance.kill_tree()
            load.wait_ok(10)  # the other instance carries everything meanwhile
            pool.restart(i)
            balancer.wait_state(name, "UP", 30)
            load.wait_ok(10)
    assert load.failures == []


def test_sigkill_costs_only_the_requests_in_flight_on_the_killed_instance(pool: Pool) -> None:
    balancer = pool.balancer
    victim, name = 0, balancer.names[0]
    with steady_load(pool) as load:
        in_flight, started = load.in_flight, load.started
        killed_at = time.monotonic()
        pool.instances[victim].kill_tree()
        # Requests sent while its processes were being killed (a few ms: the listening
        # socket lives until the last of them is gone) were in flight on it too.
        sent_meanwhile = load.started - started
        down_at = balancer.wait_state(name, "DOWN", 10)
        load.wait_ok(30)
    # Only the requests in flight when it died are lost, and nothing fails once the balancer
    # has taken the dead instance out.
    assert len(load.failures) <= max(in_flight + sent_meanwhile, 1), load.failures
    assert all(killed_at <= t <= down_at for t, _ in load.failures), load.failures
    pool.restart(victim)
    balancer.wait_state(name, "UP", 30)
