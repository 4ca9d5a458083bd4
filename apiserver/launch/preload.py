"""The API servers' heavy imports, done once in the launcher, which then forks every API server
(respawns included) from itself instead of starting a fresh interpreter for each.

Importing torch, torchvision and transformers' processors costs a fresh process about 12 s
of CPU on the 2-core CI machine (torch 4 s; torchvision 5 s, most of it torch._dynamo via
torchvision.ops; transformers' processing and tokenizer modules 3 s): N servers paid it N
times, at every start and every respawn, on the cores the engine's own start-up needed. The
engine core is still a fresh process (``spawn``): its imports overlap this one.

What must not be imported here: anything that reads per-server state at import time. fanin's
own metrics (``apiserver.metrics``: prometheus picks its multiprocess mode and files when a
metric is created) are created in each server, after the fork.

The math libraries start their thread pools at load time, and a process that forks must not
have threads (a lock one of them held stays locked in the child forever): they load here with
one thread each, and each server sizes torch's pools itself after the fork
(``cpu_budget.apply_torch_threads``). numpy's BLAS then keeps one thread in API servers,
which do no BLAS work.
"""

from __future__ import annotations

import gc
import importlib
import os
import time
from pathlib import Path

from apiserver.cpu_budget import THREAD_ENV_VARS

#: Imported in this order; transformers' lazy module imports its submodules on attribute
#: access, so the processor and tokenizer classes are named too.
MODULES = ("numpy", "PIL.Image", "torch", "torchvision", "transformers")
TRANSFORMERS_NAMES = ("AutoProcessor", "AutoTokenizer", "AutoImageProcessor")


def preload() -> float:
    """Import ``MODULES`` with every math library on one thread; returns the seconds it
    took. Blocking (seconds of CPU)."""
    started = time.monotonic()
    saved = {name: os.environ.get(name) for name in THREAD_ENV_VARS}
    os.environ.update({name: "1" for name in THREAD_ENV_VARS})
    try:
        for name in MODULES:
            module = importlib.import_module(name)
        for name in TRANSFORMERS_NAMES:
            getattr(module, name)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return time.monotonic() - started


def freeze_heap() -> int:
    """Move every object alive now out of the garbage collector's reach for good
    (``gc.freeze``); returns how many it holds. No collection first: one finds about 130
    unreachable objects after the imports, for a full walk of them (350-800 ms here).

    The imports leave about 413,000 tracked objects that live as long as the process; every
    full (oldest-generation) collection walks all of them while it holds the GIL: 750-820 ms
    on the 2-core CI machine, and the GPU host's API servers logged 300-370 ms event-loop
    stalls inside collections under load. Frozen, that collection takes 0.01 ms. Done in the
    launcher before it forks (the children inherit the frozen heap, and their collections no
    longer touch, and so copy, the pages of the launcher's objects), and again in each server
    once its tokenizer and processor are loaded."""
    gc.freeze()
    return gc.get_freeze_count()


def native_threads() -> list[str]:
    """The names of this process's threads, the libraries' own included (one, the main
    thread, is what ``fork`` wants; the names say which library started another)."""
    try:
        tids = sorted(os.listdir("/proc/self/task"), key=int)
    except OSError:
        return ["?"]
    names = []
    for tid in tids:
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:
            names.append(tid)  # ended meanwhile
    return names
