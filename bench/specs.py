"""A sweep's server configurations: the ``[inline:|pool:|process:]NxW`` grammar, the ``frontend``
preset and ``--env`` items, each turned into the ``fanin serve`` flags and environment they
mean. Both counts are always passed; ``auto`` for either is fanin's default (its CPU budget
picks it), and so is a mode left out (no ``--preprocess-mode``), which is how "default flags"
configurations are written (``8xauto``)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from bench.config import SweepConfig

_SPEC = re.compile(r"^(?:(inline|pool|process):)?(\d{1,3}|auto)x(\d{1,3}|auto)$")


@dataclass(frozen=True)
class ServerSpec:
    """One server configuration of a sweep."""

    mode: str | None  # None: fanin's default (no flag passed)
    servers: int | str  # a count, or "auto"
    workers: int | str

    @property
    def label(self) -> str:
        counts = f"{self.servers}x{self.workers}"
        return counts if self.mode is None else f"{self.mode} {counts}"

    @property
    def slug(self) -> str:
        counts = f"{self.servers}x{self.workers}"
        return counts if self.mode is None else f"{self.mode}-{counts}"

    def flags(self) -> list[str]:
        counts = [
            "--api-server-count", str(self.servers),
            "--renderer-num-workers", str(self.workers),
        ]  # fmt: skip
        return counts if self.mode is None else [*counts, "--preprocess-mode", self.mode]


def parse_spec(text: str) -> ServerSpec:
    """``inline:1x1``, ``pool:1x4``, ``4x2``, ``8xauto`` -> a ServerSpec; ``ValueError``
    otherwise."""
    match = _SPEC.match(text.strip())
    counts = [g if g == "auto" else int(g) for g in (match.groups()[1:] if match else ())]
    if not match or 0 in counts:
        raise ValueError(
            f"--configs: {text!r} is not [inline:|pool:|process:]NxW (e.g. pool:4x2, 8xauto)"
        )
    return ServerSpec(match.group(1), counts[0], counts[1])


def frontend_preset(cores: int) -> list[ServerSpec]:
    """Issue 9's list: the one-process baselines (inline; a pool of 1, 4 and ``cores``
    threads), then 1, 2, 4, 8, ... API servers up to ``cores``, with 1 and 2 threads each."""
    specs = [ServerSpec("inline", 1, 1)] + [ServerSpec("pool", 1, w) for w in (1, 4, cores)]
    n = 1
    while n <= cores:
        specs += [ServerSpec("pool", n, 1), ServerSpec("pool", n, 2)]
        n *= 2
    return list(dict.fromkeys(specs))


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_specs(sweep: SweepConfig) -> list[ServerSpec]:
    if (sweep.configs is None) == (sweep.preset is None):
        raise ValueError("give exactly one of --configs and --preset")
    if sweep.preset == "frontend":
        return frontend_preset(usable_cores())
    specs = [parse_spec(part) for item in sweep.configs or [] for part in item.split(",") if part]
    return list(dict.fromkeys(specs))


def parse_env(items: list[str] | None) -> dict[str, str]:
    env = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"--env: {item!r} is not KEY=VALUE")
        env[key] = value
    return env
