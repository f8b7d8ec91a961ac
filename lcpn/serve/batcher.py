"""Dynamic batching: the pictures of concurrent requests go through the cascade together.

Every picture waits in one asyncio queue. A collector takes the first, then keeps taking until it
has ``max_batch`` pictures or ``max_wait_ms`` have passed since the first, and routes them through
``Cascade.predict_batch`` on the one model thread (off the event loop, which keeps accepting and
decoding uploads meanwhile). While a batch runs the next one fills up, so under load batches grow
by themselves and many one-picture clients get close to the throughput of one big batch.

Requests may ask for different decoding. A batch is split by (decode, min_confidence), the only
settings that change a path; top-k lists are searched with the group's largest k and cut per
picture, which gives the same lists (the best-first search is exact and takes paths in order).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from PIL import Image

from ..cascade import Cascade, Prediction


@dataclass(frozen=True)
class Settings:
    top_k: int = 1
    decode: str = "best-path"
    min_confidence: float = 0.0


@dataclass
class _Item:
    image: Image.Image
    settings: Settings
    answer: asyncio.Future


@dataclass
class BatchStats:
    """What the batcher has done: read by /v1/model and the tests."""

    batches: int = 0
    images: int = 0
    largest_batch: int = 0

    def to_dict(self) -> dict:
        return {"batches": self.batches, "images": self.images, "largest_batch": self.largest_batch}


class Batcher:
    """Gathers pictures from concurrent requests into batches; ``start`` and ``stop`` on the serving loop."""

    def __init__(self, cascade: Cascade, model_thread: Executor, max_batch: int, max_wait_ms: float) -> None:
        self.cascade, self.model_thread = cascade, model_thread
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Item] | None = None
        self._collector: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._collector = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        if self._collector:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector

    async def predict(self, images: Sequence[Image.Image], settings: Settings) -> list[Prediction]:
        """The predictions for ``images``, in order, made in whatever batches they join."""
        loop = asyncio.get_running_loop()
        items = [_Item(image, settings, loop.create_future()) for image in images]
        for item in items:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.answer for item in items)))

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                wait = deadline - loop.time()
                if wait <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), wait))
                except asyncio.TimeoutError:
                    break
            batch = [item for item in batch if not item.answer.done()]  # a request that gave up
            if not batch:
                continue
            try:
                predictions = await loop.run_in_executor(self.model_thread, self._predict, batch)
            except Exception as exc:  # a failing batch fails its requests, never the collector
                for item in batch:
                    if not item.answer.done():
                        item.answer.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.images += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            for item, prediction in zip(batch, predictions):
                if not item.answer.done():
                    item.answer.set_result(prediction)

    def _predict(self, batch: list[_Item]) -> list[Prediction]:
        groups: dict[tuple[str, float], list[int]] = defaultdict(list)
        for i, item in enumerate(batch):
            groups[(item.settings.decode, item.settings.min_confidence)].append(i)
        out: list[Prediction | None] = [None] * len(batch)
        for (decode, min_confidence), rows in groups.items():
            top_k = max(batch[i].settings.top_k for i in rows)
            images = [batch[i].image for i in rows]
            for i, prediction in zip(rows, self.cascade.predict_batch(images, top_k, decode, min_confidence)):
                prediction.top_k = prediction.top_k[: batch[i].settings.top_k]
                out[i] = prediction
        return out
