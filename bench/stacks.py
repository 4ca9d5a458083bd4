"""Where the CPU goes, per process and thread, from py-spy's raw (collapsed-stack) output.

    py-spy record --subprocesses --threads -f raw -o STACKS -- fanin serve ...
    python -m bench.stacks STACKS [--top 25] [--match engine_core] [--within EngineCore.run]

py-spy leaves idle samples out unless told otherwise, so a sample is a thread on a core (a CUDA
synchronisation spin-wait included: it shows as the Python line that waited). For each process
whose command line contains ``--match`` (all when unset) and each of its threads: samples, the
hottest leaf lines (self) and the hottest functions anywhere on the stack (inclusive).
``--within`` keeps the stacks that pass through a frame (the serving loop, say), leaving
start-up out. With py-spy's ``--idle``, a thread's samples are its wall time, busy or not.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

_PROCESS = re.compile(r'^process \d+:"(.*)"$')
_THREAD = re.compile(r"^thread \(\d+\)")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+):(?P<line>\d+)\)$")


def _label(command: str) -> str:
    """A short name for a process: its module (``-m X``) or its script."""
    parts = command.split()
    if "-m" in parts[:-1]:
        return parts[parts.index("-m") + 1]
    return parts[1] if len(parts) > 1 else command


def parse(lines) -> dict[tuple[str, str], collections.Counter]:
    """(process label, thread) -> Counter of stacks (tuples of frames, root first)."""
    stacks: dict[tuple[str, str], collections.Counter] = collections.defaultdict(
        collections.Counter
    )
    for raw in lines:
        raw = raw.rstrip("\n")
        if not raw:
            continue
        path, _, count = raw.rpartition(" ")
        if not count.isdigit():  # a frame name with a newline in it (a thread's name, say)
            continue
        process, thread, frames = "?", "?", []
        for frame in path.split(";"):
            if (m := _PROCESS.match(frame)) is not None:
                process, frames = _label(m.group(1)), []  # the innermost process wins
            elif _THREAD.match(frame):
                thread = frame
            else:
                frames.append(frame)
        stacks[(process, thread)][tuple(frames)] += int(count)
    return stacks


def _short(frame: str, with_line: bool) -> str:
    m = _FRAME.match(frame)
    if m is None:
        return frame
    where = m.group("file").rsplit("site-packages/", 1)[-1]
    line = f":{m.group('line')}" if with_line else ""
    return f"{m.group('func')} ({where}{line})"


def report(stacks, top: int, match: str | None, within: str | None) -> str:
    if within:
        stacks = {
            key: collections.Counter(
                {fs: c for fs, c in counter.items() if any(within in f for f in fs)}
            )
            for key, counter in stacks.items()
        }
    out = []
    by_process: dict[str, int] = collections.Counter()
    for (process, _), counter in stacks.items():
        by_process[process] += sum(counter.values())
    for process, total in sorted(by_process.items(), key=lambda kv: -kv[1]):
        if not total or (match and match not in process):
            continue
        out.append(f"## {process}: {total} samples")
        threads = [(t, c) for (p, t), c in stacks.items() if p == process]
        for thread, counter in sorted(threads, key=lambda tc: -sum(tc[1].values())):
            n = sum(counter.values())
            if not n:
                continue
            leaf: collections.Counter = collections.Counter()
            inclusive: collections.Counter = collections.Counter()
            for frames, count in counter.items():
                if frames:
                    leaf[_short(frames[-1], True)] += count
                for name in {_short(f, False) for f in frames}:
                    inclusive[name] += count
            out.append(f"### {thread}: {n} samples ({n / total:.0%} of the process)")
            out.append("self:")
            out += [f"  {c / n:6.1%}  {name}" for name, c in leaf.most_common(top)]
            out.append("inclusive:")
            out += [f"  {c / n:6.1%}  {name}" for name, c in inclusive.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stacks", help="py-spy raw output (-f raw)")
    parser.add_argument("--top", type=int, default=25, help="lines per list")
    parser.add_argument("--match", default=None, help="only processes whose command has this")
    parser.add_argument(
        "--within", default=None, help="only stacks with a frame that has this (e.g. a function)"
    )
    args = parser.parse_args(argv)
    with open(args.stacks, encoding="utf-8", errors="replace") as f:
        print(report(parse(f), args.top, args.match, args.within))


if __name__ == "__main__":
    sys.exit(main())
