"""The server-side stage means and the event loops' late share, read from /metrics text as
prometheus_client writes it (labelled per API server, as the servers' loop-lag histogram is)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bench.server_stages import means_ms, parse

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025)


def _scrape(lags: dict[str, list[float]], renders: list[float]) -> str:
    registry = CollectorRegistry()
    lag = Histogram(
        "fanin_event_loop_lag_distribution_seconds", "lag", ["server"],
        buckets=BUCKETS, registry=registry,
    )  # fmt: skip
    render = Histogram("fanin_render_seconds", "render", buckets=BUCKETS, registry=registry)
    for server, values in lags.items():
        for v in values:
            lag.labels(server).observe(v)
    for v in renders:
        render.observe(v)
    return generate_latest(registry).decode()


def test_lag_is_summed_over_servers_and_late_ticks_counted() -> None:
    before = parse(_scrape({"0": [0.001], "1": [0.002]}, [0.010]))
    # Since then: server 0 two more ticks (one 8 ms late), server 1 two more (one 20 ms late).
    after = parse(_scrape({"0": [0.001, 0.0, 0.008], "1": [0.002, 0.0, 0.020]}, [0.010, 0.030]))
    got = means_ms(before, after)
    assert got["render"] == 30.0
    assert got["loop_lag"] == 7.0  # (0 + 8 + 0 + 20) / 4 ticks
    assert got["loop_late_pct"] == 50.0  # 2 of the 4 new ticks over 5 ms


def test_no_lag_histogram_no_lag_figures() -> None:
    text = _scrape({}, [0.004])
    got = means_ms(parse(text), parse(_scrape({}, [0.004, 0.006])))
    assert got == {"render": 6.0}
