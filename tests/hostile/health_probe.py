"""The side probe of the hostile tests: ``python health_probe.py HOST PORT MODE``.

Sends ``GET /health`` every ``INTERVAL_S`` until its stdin closes, then prints one JSON object:
the latency of every probe in seconds and the failures (status, or the error). It runs as a
process of its own so that the attack threads of the test, which share the test process's GIL,
cannot slow it down and blame the server. MODE ``keep`` uses one keep-alive connection (opened
before the attack, so a connection cap does not refuse it; should the server move it with
``Connection: close``, as the spread over API servers does, the cap's refusals of the new one
are not failures until a probe succeeds again); ``fresh`` opens a new connection
for each probe, so the kernel spreads them over every API server of a `fanin serve`.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time

INTERVAL_S = 0.02
TIMEOUT_S = 5.0


def main() -> None:
    host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    latencies: list[float] = []
    failures: list[str] = []
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    conn.request("GET", "/health")  # served before "ready": no cap refuses this connection
    conn.getresponse().read()
    print("ready", flush=True)
    # The server closed our keep-alive connection after a response (the spread moving a
    # connection to a less loaded server); until a probe succeeds again, the connections we
    # open instead are new ones, which a full connection cap refuses with 503 by design.
    moved = False
    while not done.wait(INTERVAL_S):
        if mode == "fresh":
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
        start = time.perf_counter()
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            body = response.read()
            latencies.append(time.perf_counter() - start)
            if response.status == 200:
                moved = response.will_close
            elif not (moved and response.status == 503 and b"too_many_connections" in body):
                failures.append(f"status {response.status}")
        except (OSError, http.client.HTTPException) as exc:
            failures.append(repr(exc))
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    conn.close()
    print(json.dumps({"latencies": latencies, "failures": failures}), flush=True)


if __name__ == "__main__":
    main()
