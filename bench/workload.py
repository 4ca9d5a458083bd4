"""What each request of a run asks for: its kind (ShareGPT text, random text or photos), its
body bytes and its requested output length, fixed before the clock starts.

Text bodies are encoded up front. Photo bodies are joined when sent (a few microseconds, see
bench/images.py), each with photos no other request of the run carries: request ``i`` of kind
``image`` holds images ``k*j .. k*j+k-1`` where ``j`` counts the image requests before it.
Lengths follow vLLM's ``benchmark_serving``: random prompts are random token ids decoded by the
model's tokenizer, ShareGPT requests ask for as many tokens as the dataset's reply had (unless
``--output-len``), and ShareGPT pairs with fewer than 4 tokens on either side, a prompt over
1,024 tokens or more than 2,048 together are skipped. Prompt token counts in the results come
from the server's ``usage`` (chat template and image tokens included), not from here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bench.config import BenchConfig
from bench.images import DistinctImages

KINDS = ("sharegpt", "random", "image")
DEFAULT_OUTPUT_LEN = 128
_IMAGE_SLOT = "@@fanin-bench-image@@"
_DATA_URL_PREFIX = b"data:image/jpeg;base64,"


class WorkloadError(ValueError):
    """The workload cannot be built as asked (bad mix, missing tokenizer, ...)."""


def parse_mix(spec: str) -> dict[str, float]:
    """``image`` or ``image:0.6,sharegpt:0.4`` -> normalised weights per kind."""
    weights: dict[str, float] = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in KINDS:
            raise WorkloadError(f"--dataset: unknown dataset {name!r} (known: {', '.join(KINDS)})")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise WorkloadError(f"--dataset: bad weight {weight!r} for {name}") from None
        if not value > 0 or not math.isfinite(value):
            raise WorkloadError(f"--dataset: the weight of {name} must be positive")
        weights[name] = weights.get(name, 0.0) + value
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


@dataclass(frozen=True)
class Model:
    """The served model, as ``/v1/models`` described it."""

    name: str
    root: str = ""
    max_model_len: int = 0


@dataclass(frozen=True)
class Request:
    """One request of the run, before its images are filled in."""

    kind: str
    output_len: int
    body: tuple[bytes, ...]  # for images: the JSON around each image slot
    first_image: int = 0


class Workload:
    """Every request of a run, in sending order."""

    def __init__(
        self,
        config: BenchConfig,
        model: Model,
        images: DistinctImages | None = None,
        image_url_base: str | None = None,
    ) -> None:
        self._images = images
        self._image_url_base = image_url_base
        self.requests = _build(config, model)
        num_images = sum(1 for r in self.requests if r.kind == "image") * config.images_per_request
        if num_images and (images is None or images.capacity < num_images):
            raise WorkloadError(f"the run needs {num_images} distinct photos; too few were made")

    def __len__(self) -> int:
        return len(self.requests)

    def body(self, i: int) -> list[bytes]:
        """Request ``i``'s JSON body, in pieces."""
        req = self.requests[i]
        if req.kind != "image":
            return list(req.body)
        parts = [req.body[0]]
        for k, around in enumerate(req.body[1:]):
            parts += self._image_url(req.first_image + k)
            parts.append(around)
        return parts

    def _image_url(self, index: int) -> list[bytes]:
        assert self._images is not None
        if self._image_url_base is not None:
            return [f"{self._image_url_base}/img/{index}.jpg".encode()]
        return [_DATA_URL_PREFIX, *self._images.base64(index)]


def images_needed(config: BenchConfig, num_requests: int) -> int:
    """An upper bound of the photos a run of ``num_requests`` sends (for sizing the source)."""
    share = parse_mix(config.dataset).get("image", 0.0)
    return 0 if share == 0 else num_requests * config.images_per_request


def _build(config: BenchConfig, model: Model) -> list[Request]:
    mix = parse_mix(config.dataset)
    if "image" in mix and config.endpoint_type != "chat":
        raise WorkloadError("photos need --endpoint-type chat")
    rng = np.random.default_rng(config.seed)
    n = config.num_prompts
    names = list(mix)
    kinds = [names[k] for k in rng.choice(len(names), size=n, p=[mix[k] for k in names])]
    texts: dict[str, list[tuple[str, int]]] = {}
    if "sharegpt" in mix or "random" in mix:
        tokenizer = load_tokenizer(config, model)
        if "sharegpt" in mix:
            texts["sharegpt"] = _sharegpt(config, tokenizer, kinds.count("sharegpt"), model)
        if "random" in mix:
            texts["random"] = _random(config, tokenizer, kinds.count("random"), rng)
    encode = _body_encoder(config, model)
    requests: list[Request] = []
    next_text = dict.fromkeys(texts, 0)
    next_image = 0
    image_len = config.output_len or DEFAULT_OUTPUT_LEN
    for kind in kinds:
        if kind == "image":
            content: list[dict[str, Any]] = [{"type": "text", "text": config.image_prompt}]
            content += [
                {"type": "image_url", "image_url": {"url": _IMAGE_SLOT}}
                for _ in range(config.images_per_request)
            ]
            pieces = tuple(encode(content, image_len).split(_IMAGE_SLOT.encode()))
            requests.append(Request(kind, image_len, pieces, next_image))
            next_image += config.images_per_request
            continue
        prompt, output_len = texts[kind][next_text[kind]]
        next_text[kind] += 1
        requests.append(Request(kind, output_len, (encode(prompt, output_len),)))
    return requests


def _body_encoder(config: BenchConfig, model: Model) -> Callable[[Any, int], bytes]:
    """The request JSON of vLLM's OpenAI backends (chat or completions), streaming with usage."""
    encoder = msgspec.json.Encoder()

    def encode(prompt: Any, output_len: int) -> bytes:
        body: dict[str, Any] = {"model": model.name}
        if config.endpoint_type == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
            body["max_completion_tokens"] = output_len
        else:
            body["prompt"] = prompt
            body["max_tokens"] = output_len
        body.update(
            temperature=config.temperature,
            stream=True,
            stream_options={"include_usage": True},
        )
        if config.ignore_eos:
            body["ignore_eos"] = True
        return encoder.encode(body)

    return encode


def load_tokenizer(config: BenchConfig, model: Model) -> Any:
    """The tokenizer of ``--tokenizer``, else of the model directory the server reports (it
    runs on this machine)."""
    path = config.tokenizer or model.root
    if not path or not Path(path).is_dir():
        raise WorkloadError(
            "text datasets need the model's tokenizer: pass --tokenizer DIR (the server reported "
            f"{model.root or 'no model directory'})"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _sharegpt(
    config: BenchConfig, tokenizer: Any, count: int, model: Model
) -> list[tuple[str, int]]:
    from bench.datasets import sharegpt_pairs

    limit = min(2048, model.max_model_len or 2048)
    out: list[tuple[str, int]] = []
    pairs = sharegpt_pairs(None)
    while len(out) < count:
        batch = list(itertools.islice(pairs, 256))
        if not batch:
            raise WorkloadError(f"ShareGPT has only {len(out)} usable prompts, {count} asked")
        prompts = tokenizer([p for p, _ in batch]).input_ids
        replies = tokenizer([r for _, r in batch]).input_ids
        for (prompt, _), p_ids, r_ids in zip(batch, prompts, replies, strict=True):
            output_len = config.output_len or len(r_ids)
            if len(p_ids) < 4 or (output_len < 4 and not config.output_len):
                continue
            if len(p_ids) > 1024 or len(p_ids) + output_len > limit:
                continue
            out.append((prompt, output_len))
            if len(out) == count:
                break
    return out


def _random(
    config: BenchConfig, tokenizer: Any, count: int, rng: np.random.Generator
) -> list[tuple[str, int]]:
    """Prompts of random token ids (special tokens left out), decoded to text."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    vocab = np.array([i for i in range(len(tokenizer)) if i not in special])
    ratio = config.random_range_ratio
    low = max(1, math.floor(config.random_input_len * (1 - ratio)))
    high = max(low, math.ceil(config.random_input_len * (1 + ratio)))
    output_len = config.output_len or DEFAULT_OUTPUT_LEN
    out = []
    for length in rng.integers(low, high + 1, size=count):
        ids = rng.choice(vocab, size=int(length))
        out.append((tokenizer.decode(ids.tolist()), output_len))
    return out
