"""``python -m engine_core --config PATH --model DIR --engine-address ADDR [--ready-fd FD]
[--parent-pid PID]``: the engine-core process. ``--config`` holds the user's settings; the
rest is the launcher's wiring. It writes one byte to ``--ready-fd`` once it takes HELLOs.

Exit status: 0 after SHUTDOWN or SIGTERM/SIGINT, 1 after a fatal error (every connected API
server is sent ENGINE_DEAD first), 2 for a bad command line or config.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import logging
import os
import signal
import sys
import traceback
from types import FrameType

import msgspec

from engine_core.batch import RunnerFacts
from engine_core.core import EngineCore
from engine_core.io_thread import EngineIO
from engine_core.sampler import Sampler
from ipc import messages
from ipc.config import EngineConfig
from ipc.lifecycle import die_with_parent, name_process, signal_ready

logger = logging.getLogger("engine_core")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine_core", description=__doc__)
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    parser.add_argument("--model", required=True, help="model directory (Hugging Face layout)")
    parser.add_argument("--engine-address", required=True, help="ZeroMQ address to bind")
    parser.add_argument("--ready-fd", type=int, help="write one byte here once serving")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when it dies")
    return parser.parse_args(argv)


def _load_config(path: str) -> EngineConfig:
    with open(path, "rb") as f:
        data = f.read()
    return msgspec.json.decode(data, type=EngineConfig)


def ready_message(config: EngineConfig, facts: RunnerFacts) -> messages.Ready:
    """READY facts for API servers, from what the runner learned at load time."""
    return messages.Ready(
        protocol_version=messages.PROTOCOL_VERSION,
        model=facts.model_dir,
        max_model_len=facts.max_model_len,
        vocab_size=facts.vocab_size,
        kv_capacity_tokens=facts.kv_capacity_tokens,
        max_num_seqs=facts.max_num_seqs,
        supports_images=facts.supports_images,
        supports_embeddings=facts.supports_embeddings,
        supports_generation=facts.supports_generation,
        eos_token_ids=list(facts.eos_token_ids),
        engine_pid=os.getpid(),
        pixel_dtype=facts.pixel_dtype,
        uint8_one_frame=facts.image_frame_dim > 0,
        image_token_id=facts.image_token_id,
        scheduling_policy=config.scheduling_policy,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the engine until SHUTDOWN, a signal, or a fatal error; return the exit status."""
    args = _parse_args(argv)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    name_process("fanin-engine-core")
    # A fatal signal in native code (CUDA, compiled kernels) shows where; fd 2, as the
    # launcher does, in case sys.stderr is a stand-in without a descriptor.
    faulthandler.enable(file=2)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s engine-core %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = _load_config(args.config)
    except (OSError, ValueError, TypeError, msgspec.DecodeError) as exc:
        logger.error("bad engine config %s: %s", args.config, exc)
        return 2

    # Until the IO thread runs, a signal ends the process at once (the handler runs in the main
    # thread, busy loading the model). Afterwards the handler does nothing: the IO thread reads
    # the signal from the wakeup fd and queues a SHUTDOWN, so the loop stops between steps.
    io_started = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not io_started:
            raise SystemExit(0)

    signal_r, signal_w = os.pipe()
    for fd in (signal_r, signal_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(signal_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    import torch

    # heavy imports: after the fast checks
    from engine_core.model.host import PixelPinner
    from engine_core.model.runner_factory import load_runner

    try:
        runner = load_runner(config, args.model)
        ready = ready_message(config, runner.facts)
        io = EngineIO(
            args.engine_address,
            ready,
            signal_fd=signal_r,
            prepare=PixelPinner() if runner.device.type == "cuda" else None,
        )
    except Exception:  # no client is connected yet: the launcher sees the exit status
        logger.error("engine startup failed:\n%s", traceback.format_exc())
        return 1
    core = EngineCore(config, runner, Sampler(config.seed, runner.device), io)
    # What lives now (torch, transformers, the model, compiled kernels: over 400,000 objects)
    # lives as long as the engine. A full collection walks all of it holding the GIL, the IO
    # thread's heartbeats included (600-750 ms on the 2-core CI machine, more with inductor's
    # compiled kernels); frozen, it is skipped (``apiserver.launch.preload.freeze_heap``).
    gc.freeze()
    io.start()
    io_started = True
    signal_ready(args.ready_fd)
    logger.info(
        "serving %s at %s (%d CPU math thread(s), %d objects frozen out of the garbage "
        "collector's reach)",
        runner.facts.model_dir,
        args.engine_address,
        torch.get_num_threads(),
        gc.get_freeze_count(),
    )
    try:
        core.run()
    except Exception as exc:
        logger.error("fatal engine error:\n%s", traceback.format_exc())
        io.close(messages.EngineDead(f"engine core failed: {exc!r}"))
        return 1
    io.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
