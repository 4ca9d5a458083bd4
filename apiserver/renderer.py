"""HF preprocessing off the event loop: chat template, tokenization, image decode and the
model's own image processor, on a small bounded thread pool, or for chats with images in
``--preprocess-mode process`` on render worker processes (``apiserver.render_workers``).

Every tokenization goes to the pool, even for short texts. Measured on the 2-core CPU
machine with the default model's tokenizer: a short chat through the template and tokenizer
0.15 ms, a pool round trip 0.08 ms, a 1,000-token prompt 1.6 ms (NOTES.md). Inline would save
well under a tenth of a millisecond on short prompts and blow the loop's 1 ms budget on long
ones; one code path for all sizes is simpler to keep right. The torchvision image processor
and the tokenizers library release the GIL, so a few threads do overlap (NOTES.md: 2 threads
per process beat 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from transformers import AutoProcessor, AutoTokenizer

from apiserver import metrics
from apiserver.config import ServerConfig
from apiserver.errors import ApiError
from apiserver.media import MediaBytes, MediaFetcher, image_bytes, load_rgb, open_image
from apiserver.protocol import ChatMessage, ImagePart, TextPart
from apiserver.render_workers import RenderWorkers
from ipc.messages import MultiModalItem, Ready

T = TypeVar("T")

_TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "uint8": torch.uint8,
}
#: Processor arguments for uint8 pixels: the engine rescales and normalizes them itself.
_UINT8_PIXELS: dict[str, Any] = {"do_rescale": False, "do_normalize": False}
#: ... and, where the engine repeats a still image's frame itself (``Ready.uint8_one_frame``),
#: patches of one frame: half the processor's output, and half the bytes on every hop.
_UINT8_ONE_FRAME: dict[str, Any] = {**_UINT8_PIXELS, "temporal_patch_size": 1}


@dataclass(slots=True)
class Prompt:
    """A rendered prompt: int32 token ids and the images placed in them."""

    token_ids: np.ndarray
    mm_items: list[MultiModalItem] = field(default_factory=list)


class Renderer:
    """Owns the tokenizer, the processor and the render pool of one API server."""

    def __init__(
        self,
        tokenizer: Any,
        processor: Any,
        ready: Ready,
        config: ServerConfig,
        num_workers: int,
        workers: RenderWorkers | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        #: Where chats with images render, when not on the pool (``--preprocess-mode process``).
        self._workers = workers
        self._processor = processor
        self._ready = ready
        self._config = config
        # The pool's threads share one tokenizer. That is safe only while no call passes its
        # own truncation/padding: transformers then reconfigures the Rust tokenizer, a mutable
        # borrow that fails with "Already borrowed" while another thread encodes
        # (huggingface/transformers#47085). Calls here never set either.
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="render")
        self._num_workers = num_workers
        self._pending = 0  # renders waiting for a thread or running on one
        self._pixel_dtype = _TORCH_DTYPES[ready.pixel_dtype]
        self._pixel_kwargs = _pixel_kwargs(ready)
        self._image_hash = None if processor is None else _settings_hash(processor, ready)
        image_processor = getattr(processor, "image_processor", None)
        self._merge_size = int(getattr(image_processor, "merge_size", 2))
        backend = getattr(image_processor, "backend", None)
        if processor is not None and ready.pixel_dtype == "uint8" and backend != "torchvision":
            # The engine found the torchvision processor: this process sees another install.
            raise RuntimeError(
                "the engine expects uint8 pixels, which need transformers' torchvision image "
                f"processor; this API server's runs on {backend or 'PIL'}"
            )

    @classmethod
    def load(
        cls,
        model_dir: str,
        ready: Ready,
        config: ServerConfig,
        num_workers: int,
        workers: RenderWorkers | None = None,
    ) -> Renderer:
        """Load the model's tokenizer (and processor when it takes images and no ``workers``,
        started, render them), for a pool of ``num_workers`` render threads. Blocking."""
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        renders_images = ready.supports_images and workers is None
        processor = AutoProcessor.from_pretrained(model_dir) if renders_images else None
        return cls(tokenizer, processor, ready, config, num_workers, workers)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._workers is not None:
            self._workers.close()

    @property
    def is_full(self) -> bool:
        return self._pending >= self._config.max_pending_renders

    @property
    def queued(self) -> int:
        """Renders waiting for a thread (admission's queue wait)."""
        return max(0, self._pending - self._num_workers)

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        """One render waiting or running; 429 when too many already wait."""
        if self.is_full:
            raise ApiError(
                429, "preprocessing queue is full; retry later", headers={"Retry-After": "1"}
            )
        self._pending += 1
        try:
            yield
        finally:
            self._pending -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the pool (or, in ``inline`` preprocess mode, right here on the
        event loop); 429 when too many renders already wait."""
        submitted = time.perf_counter()

        def timed() -> T:
            started = time.perf_counter()
            metrics.RENDER_QUEUE.observe(started - submitted)
            try:
                return fn(*args)
            finally:
                metrics.RENDER.observe(time.perf_counter() - started)

        with self._slot():
            if self._config.preprocess_mode == "inline":
                return timed()
            return await asyncio.get_running_loop().run_in_executor(self._pool, timed)

    async def render_chat(
        self,
        messages: list[ChatMessage],
        fetcher: MediaFetcher,
        add_generation_prompt: bool = True,
        reserved_tokens: int = 0,
    ) -> Prompt:
        """Template, tokenize and process the images of a chat. ``reserved_tokens`` (the
        request's max_tokens) must fit beside the prompt: images are counted from their
        headers, and a chat that cannot fit is refused before any image is decoded."""
        conversation, urls = _to_hf_messages(messages)
        if len(urls) > self._config.max_images_per_request:
            raise ApiError(
                400,
                f"{len(urls)} images in one request; the limit is "
                f"{self._config.max_images_per_request}",
                param="messages",
            )
        if urls and self._processor is None and self._workers is None:
            raise ApiError(400, "this model does not accept images", param="messages")
        media = await asyncio.gather(*(fetcher.fetch(u) for u in urls))
        args = (conversation, media, add_generation_prompt, reserved_tokens)
        if not media or self._workers is None:
            return await self.run(self.chat_blocking, *args)
        with self._slot():
            prompt, waited, took = await self._workers.chat(*args)
        metrics.RENDER_QUEUE.observe(waited)
        metrics.RENDER.observe(took)
        return prompt  # type: ignore[no-any-return]

    async def render_text(self, text: str, add_special_tokens: bool = True) -> Prompt:
        ids = await self.run(self._encode_blocking, text, add_special_tokens)
        return Prompt(self._checked(ids, 0))

    def token_prompt(self, ids: list[int], param: str = "prompt") -> Prompt:
        """A client-supplied token-id prompt, checked against the vocabulary. Blocking for
        long lists: callers run it on the pool."""
        try:
            array = np.asarray(ids, dtype=np.int64)
        except OverflowError:  # JSON integers have no bound; past 64 bits is past the vocabulary
            raise self._outside_vocabulary(param) from None
        return Prompt(self._checked(array, 0, param))

    def prompts_blocking(self, items: list[str | list[int]], param: str) -> list[Prompt]:
        """Prompts of several texts or token lists at once (one pool job for a batch of
        embedding inputs). Blocking."""
        return [
            Prompt(self._checked(self._encode_blocking(x, True), 0, param))
            if isinstance(x, str)
            else self.token_prompt(x, param)
            for x in items
        ]

    def _encode_blocking(self, text: str, add_special_tokens: bool) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def chat_blocking(
        self,
        conversation: list[dict[str, Any]],
        media: list[MediaBytes],
        add_gen: bool,
        reserved_tokens: int,
    ) -> Prompt:
        try:
            if not media:
                ids = self.tokenizer.apply_chat_template(
                    conversation, tokenize=True, add_generation_prompt=add_gen, return_dict=False
                )
                return Prompt(self._checked(np.asarray(ids), 0, "messages"))
            config = self._config
            files = [image_bytes(m, config.max_media_bytes) for m in media]
            hashes = [self._content_hash(data) for data in files]
            images = [open_image(data, config.max_image_pixels) for data in files]
            text = self._processor.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_gen
            )
            # Tokenized once, with one placeholder per image, and expanded afterwards: the
            # processor would tokenize the text again with every placeholder repeated (about
            # 1,000 per 1024x768 photo). The placeholder is a special token, which the
            # tokenizer never merges with its neighbours, so both give the same ids (a test
            # compares them with the processor's).
            ids = np.asarray(self.tokenizer.encode(text))
            self._check_fits(ids, images, reserved_tokens)
            images = [load_rgb(image) for image in images]
            out = self._processor.image_processor(
                images=images, return_tensors="pt", **self._pixel_kwargs
            )
        except ApiError:
            raise
        except Exception as exc:  # template errors (e.g. role order) are the client's input
            raise ApiError(400, f"cannot render the chat: {exc}", param="messages") from None
        return self._with_images(ids, out["pixel_values"], out["image_grid_thw"], hashes)

    def _check_fits(self, ids: np.ndarray, images: list[Any], reserved_tokens: int) -> None:
        """context_length_exceeded for a chat whose text, images (counted from their
        headers, before decoding) and reserved output cannot fit the model. ``ids``: the
        chat's tokens, one placeholder per image."""
        count = getattr(self._processor.image_processor, "get_number_of_image_patches", None)
        if count is None:  # a processor that cannot say: its output is checked instead
            return
        merge = self._merge_size
        num_tokens = len(ids) - len(images)
        num_tokens += sum(count(im.height, im.width, {}) // (merge * merge) for im in images)
        max_len = self._ready.max_model_len
        if num_tokens + reserved_tokens > max_len:
            raise ApiError(
                400,
                f"this model's maximum context length is {max_len} tokens; the chat's text "
                f"and {len(images)} image(s) take {num_tokens} tokens, plus {reserved_tokens} "
                "to generate, which does not fit",
                param="messages",
                code="context_length_exceeded",
            )

    def _content_hash(self, data: bytes) -> str:
        """The encoder-cache key of one image: its file's bytes, as the client sent them, and
        every processor setting that changes the pixels (``_settings_hash``). Hashing the
        pixels instead cost 6 ms per 1024x768 photo (9.4 MB of bf16); these bytes, 0.1 ms."""
        assert self._image_hash is not None
        digest = self._image_hash.copy()
        digest.update(data)
        return digest.hexdigest()

    def _with_images(
        self, ids: np.ndarray, pixels: torch.Tensor, grids: torch.Tensor, hashes: list[str]
    ) -> Prompt:
        """The prompt of ``ids`` (one placeholder token per image) with each placeholder
        expanded to its image's tokens, a patch of 2x2 (``merge_size``) for each, as the
        Qwen2-VL processors expand them."""
        if self._pixel_dtype == torch.uint8 and pixels.dtype != torch.uint8:
            raise ApiError(500, f"image processor returned {pixels.dtype} pixels, not uint8")
        at = np.flatnonzero(ids == self._ready.image_token_id)
        if len(at) > len(grids):
            raise ApiError(
                400, "the prompt contains image placeholder tokens without images", param="messages"
            )
        if len(at) < len(grids):
            raise ApiError(500, f"the chat template placed {len(at)} images of {len(grids)}")
        rows = [math.prod(grid) for grid in grids.tolist()]
        lengths = [r // (self._merge_size * self._merge_size) for r in rows]
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[at] = lengths
        items, row, grown = [], 0, 0
        for place, grid, num_rows, length, digest in zip(
            at.tolist(), grids.tolist(), rows, lengths, hashes, strict=True
        ):
            # (rows, C*T*patch*patch), T = 1 for one-frame uint8: this image's patches. uint8
            # patches are a view of the processor's output, sent without a copy; float ones
            # take the tower's dtype.
            patch = pixels[row : row + num_rows].to(self._pixel_dtype)
            row += num_rows
            items.append(
                MultiModalItem(
                    content_hash=digest,
                    modality="image",
                    grid_thw=(grid[0], grid[1], grid[2]),
                    offset=place + grown,
                    length=length,
                    pixel_values=patch,
                )
            )
            grown += length - 1
        expanded = np.repeat(ids, repeats)
        return Prompt(self._checked(expanded, sum(lengths), "messages"), items)

    def _checked(self, ids: np.ndarray, num_image_tokens: int, param: str = "prompt") -> np.ndarray:
        """int32 ids; refuse ids outside the vocabulary and image placeholders without images
        (text that spells the placeholder token would otherwise reach the vision path).
        ``param`` names the request field the ids came from."""
        if ids.size == 0:
            raise ApiError(400, "the prompt is empty", param=param)
        if ids.min() < 0 or ids.max() >= self._ready.vocab_size:
            raise self._outside_vocabulary(param)
        image_id = self._ready.image_token_id
        if image_id is not None and int((ids == image_id).sum()) != num_image_tokens:
            raise ApiError(
                400, "the prompt contains image placeholder tokens without images", param=param
            )
        return ids.astype(np.int32)

    def _outside_vocabulary(self, param: str) -> ApiError:
        return ApiError(400, f"token ids must be in [0, {self._ready.vocab_size})", param=param)


def _pixel_kwargs(ready: Ready) -> dict[str, Any]:
    if ready.pixel_dtype != "uint8":
        return {}
    return _UINT8_ONE_FRAME if ready.uint8_one_frame else _UINT8_PIXELS


def _settings_hash(processor: Any, ready: Ready) -> hashlib._Hash:
    """A sha256 fed with everything but the image bytes that decides an image's pixels: the
    image processor's whole configuration (size limits, patch, temporal patch and merge
    sizes, resampling, mean and std, rescale factor...) and the form pixels travel in."""
    settings = processor.image_processor.to_dict()
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(f"\0pixels={ready.pixel_dtype}\0".encode())
    return digest


def _to_hf_messages(messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], list[str]]:
    """OpenAI messages -> the HF chat-template format, plus image URLs in prompt order."""
    conversation: list[dict[str, Any]] = []
    urls: list[str] = []
    for m in messages:
        if m.content is None or isinstance(m.content, str):
            conversation.append({"role": m.role, "content": m.content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for p in m.content:
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
            elif isinstance(p, ImagePart):
                parts.append({"type": "image"})
                urls.append(p.image_url.url)
        conversation.append({"role": m.role, "content": parts})
    return conversation, urls
