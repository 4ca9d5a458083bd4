"""`fanin bench` against a real `fanin serve` of the default model: every dataset, photos as
data URLs and as http URLs from the bench's own server, results as JSON and markdown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fanin_cli import run_fanin

from bench.serve import ServedFanin

pytestmark = pytest.mark.slow

SMALL = ["--image-size", "128x96", "--output-len", "4", "--ignore-eos", "--duration", "120"]


def _bench(server: ServedFanin, tmp_path: Path, *flags: str) -> tuple[dict[str, Any], str]:
    """`fanin bench` against ``server`` with ``flags``: (the JSON result, stdout)."""
    out = tmp_path / "out"
    done = run_fanin(
        "bench", "--base-url", server.target.origin, *SMALL, *flags, "--result-dir", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("bench-*.json")
    assert path.with_suffix(".md").read_text().count("| request throughput (req/s) |") == 1
    result: dict[str, Any] = json.loads(path.read_text())
    return result, done.stdout


def test_every_dataset_against_the_real_server(fanin_server: ServedFanin, tmp_path: Path) -> None:
    result, stdout = _bench(
        fanin_server, tmp_path, "--num-prompts", "16", "--max-concurrency", "4",
        "--dataset", "image:0.5,sharegpt:0.25,random:0.25", "--random-input-len", "32",
        "--goodput", "ttft:600000", "e2e:600000",
    )  # fmt: skip
    m = result["metrics"]
    assert (m["completed"], m["failed"]) == (16, 0), result["first_errors"]
    assert m["total_output_tokens"] == 16 * 4  # ignore_eos: exactly the asked length
    assert m["total_input_tokens"] > 16 * 8 and m["mean_ttft_ms"] > 0 and m["mean_itl_ms"] > 0
    assert m["request_goodput"] == m["request_throughput"]  # SLOs of ten minutes: all met
    kinds = result["requests_by_kind"]
    assert set(kinds) == {"image", "sharegpt", "random"} and sum(kinds.values()) == 16
    assert result["images_sent"] == kinds["image"]
    assert sum(result["servers"].values()) == 16 and set(result["servers"]) <= {"0", "1"}
    assert result["health"]["count"] > 0 and result["health"]["failed"] == 0
    # The server's process tree was found from its listening socket; CPU went to the engine.
    cpu = result["cpu"]
    assert cpu["server_cores_busy"] > 0 and cpu["server_by_process"]["fanin-engine-core"] > 0
    assert "generator_cores_busy" in cpu
    assert "| completed per API server |" in stdout


def test_photos_as_http_urls_are_fetched_from_the_bench(
    fanin_server: ServedFanin, tmp_path: Path
) -> None:
    result, _ = _bench(
        fanin_server, tmp_path, "--num-prompts", "6", "--max-concurrency", "2",
        "--image-transport", "http", "--images-per-request", "2",
    )  # fmt: skip
    assert result["metrics"]["completed"] == 6 and result["metrics"]["failed"] == 0
    assert result["images_sent"] == result["images_fetched"] == 12


def test_completions_endpoint_with_random_prompts(
    fanin_server: ServedFanin, tmp_path: Path
) -> None:
    result, _ = _bench(
        fanin_server, tmp_path, "--num-prompts", "4", "--endpoint-type", "completions",
        "--dataset", "random", "--random-input-len", "64", "--no-keep-alive",
    )  # fmt: skip
    assert result["metrics"]["completed"] == 4 and result["metrics"]["total_output_tokens"] == 16
    assert result["connections_opened"] == 4  # one per request without keep-alive
    # Random token ids decode to text that tokenizes back to about as many tokens.
    assert 4 * 32 < result["metrics"]["total_input_tokens"] < 4 * 256


def test_unknown_model_and_unreachable_server_fail_clearly(
    fanin_server: ServedFanin, tmp_path: Path
) -> None:
    done = run_fanin("bench", "--base-url", fanin_server.target.origin, "--model", "nope",
                     cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1 and "no model 'nope'" in done.stderr
    done = run_fanin("bench", "--base-url", "http://127.0.0.1:9", cwd=tmp_path)
    assert done.returncode == 1 and "cannot reach the server" in done.stderr
