"""The CPU budget end to end: `fanin serve` confined to one CPU (as `taskset` or a cpuset
would) sizes everything from that one core, and a thread count the user exported is kept
and said so; the GIL switch interval asked for is each API server's; the plan shows in the
launcher's log and in every API server's, and start-up state is frozen out of the garbage
collector's reach."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from fanin_proc import cmdline, descendants, start_fanin

pytestmark = pytest.mark.slow


def test_one_cpu_means_one_server_one_thread_and_a_user_setting_is_kept(
    default_model_dir: Path, tmp_path: Path
) -> None:
    cpu = min(os.sched_getaffinity(0))
    fanin = start_fanin(
        tmp_path,
        default_model_dir,
        "--gil-switch-interval",
        "0.5",
        env={"OPENBLAS_NUM_THREADS": "3"},
        cpus={cpu},
    )
    try:
        log = fanin.log()
        assert (
            "cpu budget: 1 usable core(s), 0 left to the engine core; 1 API server(s), each "
            "with 1 render worker(s) and 1 math thread(s)" in log
        ), log[-3000:]
        assert "OPENBLAS_NUM_THREADS=3 is set in the environment: API servers keep it" in log
        assert re.search(
            r"api-server-0 apiserver: 1 render worker\(s\), 1 math thread\(s\), "
            r"GIL switch interval 0.5 ms; "
            r"OPENBLAS_NUM_THREADS=3 kept from the environment",
            log,
        ), log[-3000:]
        # Start-up state is frozen out of the garbage collector's reach (a full collection of
        # it took most of a second) in the launcher before it forks, in each server once its
        # tokenizer is loaded, and in the engine before it serves.
        for who in ("fanin.launcher: imported", "api-server-0 apiserver:", "engine_core: serving"):
            found = re.search(who + r".* (\d+) objects frozen out of the garbage collector", log)
            assert found and int(found.group(1)) > 100_000, (who, log[-3000:])
        servers = [p for p in descendants(fanin.proc.pid) if "api-server" in cmdline(p)]
        assert len(servers) == 1
        assert os.sched_getaffinity(servers[0]) == {cpu}
        # The engine's math libraries are capped at its cores too (at least one thread).
        assert re.search(r"engine_core: serving .* \(1 CPU math thread\(s\),", log), log[-3000:]
        reply = fanin.client(timeout=120).completions.create(
            model=fanin.client().models.list().data[0].id, prompt="hello", max_tokens=2
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 2
    finally:
        fanin.kill_tree()
