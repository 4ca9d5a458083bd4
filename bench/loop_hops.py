"""How many event-loop iterations a health check on a fresh connection waits: an API server's
acceptor and HTTP protocol (``apiserver.acceptor``, ``apiserver.http_guard``) serve a plain
200 on uvloop, while a callback burns ``--burn-ms`` of CPU in every iteration of the loop, as
a loop busy with many requests spends each iteration. A second process (so that it shares no
GIL with the burning loop) opens a fresh loopback connection per probe, as a load balancer's
check does; a probe's latency over the burn is the iterations it waited.

Usage: python -m bench.loop_hops [--burn-ms 4] [--probes 60] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import sys
import time
from typing import Any

import uvicorn
import uvloop
from uvicorn.server import ServerState

from apiserver.acceptor import Acceptor, counted_protocol
from apiserver.http_guard import HttpLimits, guarded_protocol
from apiserver.load_table import LoadTable
from apiserver.spread import Balancer

_LIMITS = HttpLimits(
    max_header_bytes=8192, header_timeout_s=10, body_timeout_s=10, max_connections=64
)
#: The probing process: one fresh connection per probe, spaced so that probes do not overlap.
_PROBE = """
import http.client, json, sys, time
port, probes = int(sys.argv[1]), int(sys.argv[2])
latencies = []
for _ in range(probes):
    time.sleep(0.013)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    start = time.perf_counter()
    conn.request("GET", "/health")
    conn.getresponse().read()
    latencies.append(time.perf_counter() - start)
    conn.close()
print(json.dumps(latencies))
"""


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def serve_accepting(
    listener: socket.socket,
    app: Any,
    limits: HttpLimits,
    acceptor_class: type[Acceptor] = Acceptor,
) -> tuple[Acceptor, ServerState]:
    """An API server's accept path alone, on the running loop: ``app`` behind the guarded
    protocol, counted for the spread and accepted from ``listener`` as ``apiserver.server``
    wires them (no lifespan); returns the acceptor and the server state that holds the
    open connections."""
    config = uvicorn.Config(app, http=guarded_protocol(limits), lifespan="off", log_config=None)
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)  # as Server._serve sets it
    balancer = Balancer(LoadTable.private(), 0, limits.max_connections)
    acceptor = acceptor_class(listener, counted_protocol(config, server, balancer), balancer)
    acceptor.start()
    return acceptor, server.server_state


async def _measure(burn_s: float, probes: int) -> list[float]:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    acceptor, state = serve_accepting(listener, _ok, _LIMITS)
    burning = True

    def burn() -> None:
        until = time.perf_counter() + burn_s
        while time.perf_counter() < until:
            pass
        if burning:
            loop.call_soon(burn)

    burn()
    probe = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PROBE, str(port), str(probes), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(probe.communicate(), 60 + probes)
    burning = False
    acceptor.close()
    for protocol in list(state.connections):
        protocol.transport.close()
    await asyncio.sleep(0.05)
    return [float(x) for x in json.loads(out)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--burn-ms", type=float, default=4.0, help="CPU burnt in every iteration")
    p.add_argument("--probes", type=int, default=60)
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_args()
    if args.burn_ms <= 0 or not 1 <= args.probes <= 1000:
        p.error("--burn-ms must be positive and --probes within 1..1000")
    latencies = uvloop.run(_measure(args.burn_ms / 1000, args.probes))
    median = statistics.median(latencies) * 1000
    p90 = sorted(latencies)[int(0.9 * (len(latencies) - 1))] * 1000
    result = {
        "python": platform.python_version(),
        "burn_ms": args.burn_ms,
        "probes": len(latencies),
        "median_ms": round(median, 2),
        "p90_ms": round(p90, 2),
        "median_iterations": round(median / args.burn_ms, 2),
    }
    print(
        f"Python {result['python']}, {args.burn_ms:g} ms burnt per iteration: probe median "
        f"{median:.1f} ms ({result['median_iterations']:.2f} iterations), p90 {p90:.1f} ms"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
