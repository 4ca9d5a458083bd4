"""The engine core's configuration: what a user sets for it, built once by the launcher from
the CLI, passed to the engine process as JSON, frozen. It lives in ``ipc`` because it is part
of the contract between the launcher (``apiserver``) and the engine (``engine_core``), which
never import each other. The wiring of one run (the resolved model directory, the socket
address) is not configuration: the launcher passes it on the engine's command line.

Each field's ``Meta(description=...)`` is its ``--flag`` help text: the CLI is built from
these fields, so a setting is defined once.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    dtype: Annotated[
        Literal["auto", "float32", "bfloat16", "float16"],
        Meta(description="weight and activation dtype; auto = bfloat16 on CUDA, float32 on CPU"),
    ] = "auto"
    device: Annotated[Literal["auto", "cpu", "cuda"], Meta(description="where the model runs")] = (
        "auto"
    )
    max_model_len: (
        Annotated[
            int, Meta(ge=16, description="longest prompt + output in tokens; default: the model's")
        ]
        | None
    ) = None
    max_num_seqs: Annotated[
        int, Meta(ge=1, description="most sequences running at once in the engine")
    ] = 64
    max_num_batched_tokens: (
        Annotated[
            int,
            Meta(
                ge=16,
                description="token budget of one engine step (prefill chunks + decodes); "
                "default: 8192 on a GPU of 70 GiB or more, else 2048 (vLLM's serving defaults)",
            ),
        ]
        | None
    ) = None
    gpu_memory_utilization: Annotated[
        float, Meta(gt=0.0, le=1.0, description="fraction of GPU memory the engine may use")
    ] = 0.9
    cpu_kv_cache_bytes: Annotated[
        int, Meta(ge=1 << 20, description="KV cache size in bytes when running on CPU")
    ] = 1 << 30
    encoder_cache_bytes: Annotated[
        int, Meta(ge=0, description="byte budget of the image-encoder output cache")
    ] = 256 << 20
    seed: Annotated[int, Meta(description="seed of the engine's default random generator")] = 0
    enable_chunked_prefill: Annotated[
        bool, Meta(description="split long prompts over several engine steps")
    ] = True
    enforce_eager: Annotated[
        bool,
        Meta(description="run every step eagerly: no CUDA graphs, no compiled kernels"),
    ] = False
    decode_attention: Annotated[
        Literal["triton", "flash"],
        Meta(
            description="attention kernel of the CUDA-graph decode steps: triton (ours: each "
            "KV head read once for all the query heads that share it; FlashAttention-2 where "
            "it fails its start-up check) or flash (FlashAttention-2's split-KV kernel)"
        ),
    ] = "triton"
    scheduling_policy: Annotated[
        Literal["fcfs", "priority"],
        Meta(
            description="fcfs: arrival order, requests with a nonzero priority are refused; "
            "priority: lower priority values first, preempting running requests (vLLM's rule)"
        ),
    ] = "fcfs"
    pixel_transfer: Annotated[
        Literal["auto", "uint8", "normalized"],
        Meta(
            description="how API servers send image pixels: uint8 patches that the engine "
            "rescales and normalizes on its device, one frame of a still image where the tower's "
            "temporal patch repeats it (auto, where the model's image processor is "
            "transformers' torchvision one), or normalized in the vision tower's dtype"
        ),
    ] = "auto"
    max_num_encoder_patches: Annotated[
        int,
        Meta(
            ge=16,
            description="vision-encoder budget of one engine step, in image patches (a "
            "1920x1080 photo is about 4,900); a larger image is refused",
        ),
    ] = 16384
