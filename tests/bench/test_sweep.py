"""`fanin bench sweep` against real `fanin serve` processes: a configuration that cannot start
is reported and the sweep goes on; the others run the same workload, stop cleanly on SIGTERM
and leave nothing behind; the table, ratios and plot are written. Also the configuration
grammar and the frontend preset."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fanin_cli import run_fanin

from bench import proc
from bench.specs import ServerSpec, frontend_preset, parse_spec
from bench.sweep import strict_problems


def test_config_grammar() -> None:
    assert parse_spec("inline:1x1") == ServerSpec("inline", 1, 1)
    assert parse_spec("4x2") == ServerSpec(None, 4, 2)  # fanin's default mode: no flag
    assert parse_spec("4x2").flags() == ["--api-server-count", "4", "--renderer-num-workers", "2"]
    assert parse_spec(" pool:16x1 ").flags() == [
        "--api-server-count", "16", "--renderer-num-workers", "1", "--preprocess-mode", "pool",
    ]  # fmt: skip
    # "auto": fanin's own default for that count (its CPU budget), passed through as such.
    assert parse_spec("process:8xauto").flags() == [
        "--api-server-count", "8", "--renderer-num-workers", "auto", "--preprocess-mode",
        "process",
    ]  # fmt: skip
    assert parse_spec("autoxauto").label == "autoxauto"
    assert parse_spec("pool:autoxauto").label == "pool autoxauto"
    for bad in ("4", "x2", "threads:1x1", "0x1", "1x0", "4x2x1", "1 x 2", "8xAUTO", "axb"):
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_frontend_preset_follows_the_issue_up_to_the_cores() -> None:
    labels = [s.label for s in frontend_preset(16)]
    assert labels == [
        "inline 1x1", "pool 1x1", "pool 1x4", "pool 1x16", "pool 1x2", "pool 2x1", "pool 2x2",
        "pool 4x1", "pool 4x2", "pool 8x1", "pool 8x2", "pool 16x1", "pool 16x2",
    ]  # fmt: skip
    assert [s.label for s in frontend_preset(2)] == [
        "inline 1x1", "pool 1x1", "pool 1x4", "pool 1x2", "pool 2x1", "pool 2x2",
    ]  # fmt: skip


def test_configurations_past_the_time_budget_are_skipped_not_started(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    done = run_fanin(
        "bench", "sweep", "--configs", "1x1", "2x1", "--duration", "5", "--time-budget", "2",
        "--result-dir", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1  # nothing ran
    doc = json.loads((out / "sweep.json").read_text())
    assert [(e["label"], e["status"]) for e in doc["entries"]] == [
        ("1x1", "skipped"),
        ("2x1", "skipped"),
    ]
    assert all("pid" not in e for e in doc["entries"])
    assert "- 2x1: skipped: --time-budget" in (out / "sweep.md").read_text()


@pytest.mark.slow
def test_sweep_of_two_configurations_and_one_that_cannot_start(
    default_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    done = run_fanin(
        "bench", "sweep", str(default_model_dir),
        "--configs", "pool:1x99", "inline:1x1", "pool:2x1",
        "--max-concurrency", "3", "--num-prompts", "200", "--image-size", "96x64",
        "--output-len", "3", "--ignore-eos", "--duration", "3",
        "--server-start-timeout", "240", "--result-dir", str(out),
        "--", "--served-model-name", "sweep-model",
        cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "sweep.json").read_text())
    first, *ran = doc["entries"]
    # --renderer-num-workers 99 is past the flag's bound: that server exits at once.
    assert first["label"] == "pool 1x99" and first["status"] == "failed to start"
    assert "exited with code 2" in first["error"] and "renderer-num-workers" in first["log_tail"]
    assert [e["label"] for e in ran] == ["inline 1x1", "pool 2x1"]
    for entry in ran:
        assert entry["status"] == "ok", entry.get("error")
        assert entry["model"] == "sweep-model"  # the flags after -- reached every server
        m = entry["metrics"]
        assert m["completed"] > 0 and m["failed"] == 0
        assert m["total_output_tokens"] == 3 * m["completed"]
        assert entry["stop"]["exit_code"] == 0 and entry["stop"]["killed"] == []
        assert entry["cpu"]["server_cores_busy"] > 0 and entry["health"]["count"] > 0
        assert not proc.is_alive(entry["pid"])
        assert proc.session_members({entry["pid"]}) == []  # nothing of that server is left
    markdown = (out / "sweep.md").read_text()
    assert "| inline 1x1 |" in markdown and "| pool 2x1 |" in markdown
    assert "against inline 1x1" in markdown and "| 1.00x |" in markdown
    assert "- pool 1x99: failed to start" in markdown
    # The command shows MODEL and OUT instead of this machine's paths.
    assert str(default_model_dir) not in markdown and str(out) not in markdown
    assert "`fanin bench sweep MODEL --configs" in markdown and "--result-dir OUT" in markdown
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert strict_problems(doc, plotted=True) == [
        f"pool 1x99: failed to start: {first['error']}",
        "pool 1x99: exit code 2, killed []",
    ]


@pytest.mark.slow
def test_sigterm_stops_the_sweep_and_its_server(default_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    with (tmp_path / "sweep.err").open("w") as err:
        sweep = subprocess.Popen(
            [sys.executable, "-m", "apiserver.launch.cli", "bench", "sweep", str(default_model_dir),
             "--configs", "1x1", "--duration", "600", "--max-concurrency", "1",
             "--image-size", "64x48", "--output-len", "2", "--result-dir", str(out)],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    descendants: list[int] = []
    try:
        log = out / "serve-1x1.log"
        deadline = time.monotonic() + 240
        while "ready:" not in (log.read_text() if log.exists() else ""):
            assert sweep.poll() is None and time.monotonic() < deadline, sweep.returncode
            time.sleep(0.2)
        descendants = proc.descendants(sweep.pid)
        (launcher,) = [p for p in descendants if proc.process_name(p) == "fanin-launcher"]
        sweep.send_signal(signal.SIGTERM)
        assert sweep.wait(120) == 130
        assert proc.wait_gone(descendants, 10) == []
    finally:
        sweep.kill()
        sweep.wait()
        for pid in proc.descendants(sweep.pid) + descendants:  # a failed test leaves no server
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert "stopped; what ran is in" in (tmp_path / "sweep.err").read_text()
    assert not (out / "sweep.json").exists()  # nothing finished, and nothing pretends to have


def test_rate_multiples_need_the_closed_loop_run(tmp_path: Path) -> None:
    done = run_fanin(
        "bench", "sweep", "--configs", "1x1", "--rate-multiples", "1", "2", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "--rate-multiples needs --max-concurrency" in done.stderr


@pytest.mark.slow
def test_overload_runs_pace_arrivals_at_multiples_of_the_saturating_rate(
    default_model_dir: Path, tmp_path: Path
) -> None:
    # 200 prompts and 2 s bound each of the three runs (1, 2 and 0.5 s on the 2-core machine,
    # 2, 3 and 1 s at 400 and 3 s): what is checked is the pacing, not the figures.
    out = tmp_path / "overload"
    done = run_fanin(
        "bench", "sweep", str(default_model_dir), "--configs", "1x1",
        "--max-concurrency", "3", "--rate-multiples", "0.5", "2", "--num-prompts", "200",
        "--image-size", "96x64", "--output-len", "2", "--ignore-eos", "--duration", "2",
        "--request-timeout", "20", "--server-start-timeout", "240", "--result-dir", str(out),
        cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    closed, half, double = json.loads((out / "sweep.json").read_text())["entries"]
    assert [e["label"] for e in (closed, half, double)] == [
        "1x1 closed loop", "1x1 at 0.5x", "1x1 at 2x",
    ]  # fmt: skip
    assert closed["pid"] == half["pid"] == double["pid"]  # one server for the three runs
    saturation = closed["metrics"]["window_request_throughput"]
    assert "offered_rate" not in closed and saturation > 0
    assert half["offered_rate"] == pytest.approx(0.5 * saturation)
    assert double["offered_rate"] == pytest.approx(2 * saturation)
    assert half["config"]["max_concurrency"] is None  # open loop: arrivals, not clients
    markdown = (out / "sweep.md").read_text()
    assert "| config | offered req/s | completed req/s | 429 (%) | client timeouts |" in markdown
    assert "| 1x1 at 2x |" in markdown


def test_a_run_during_which_an_api_server_died_fails_a_strict_sweep() -> None:
    """The sweep records the launcher's respawn lines of each run (``bench.serve.respawns_in``,
    checked against a real launcher's log in tests/integration/test_serve_spread.py)."""
    death = "api server 1 (pid 7) exited with code -11; respawning in 0.5 s"
    entry = {
        "label": "pool 2x1",
        "status": "ok",
        "metrics": {"failed": 0},
        "respawns": [death],
        "stop": {"exit_code": 0, "killed": []},
    }
    assert strict_problems({"entries": [entry]}, plotted=True) == [
        f"pool 2x1: API servers died during the run: {[death]}"
    ]
    assert strict_problems({"entries": [{**entry, "respawns": []}]}, plotted=True) == []
