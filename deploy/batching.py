"""Cross-request dynamic batching: images of concurrent requests share the detector's forward passes.

A request's images are queued one by one with its ``DetectionParams``; a worker thread takes what
the queue holds and, while the batch has fewer than ``max_batch_size`` images and other requests are
on their way (``expecting``: received, images still decoding), waits up to ``max_wait_s`` for them.
A lone request never waits. The worker then runs ``Detector.detect`` once per distinct
``DetectionParams`` in the batch (the usual case, every request with the default params, is one
call). ``Detector.detect``
stacks only same-size inputs and never pads, so an image's detections do not depend on the other
images of the batch, whichever requests they came from.

``workers`` threads take batches from the one queue (default 2): while one runs a forward pass the
next batch forms and can start, so batching never serializes a server whose forward passes do not
fill the machine on their own (a small model on a CPU: measured in ``bench/serve.py``).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from deploy.detector import Detector
from detr.models.detection_params import DetectionParams

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_WAIT_S = 0.005
DEFAULT_WORKERS = 2


@dataclass
class _Item:
    image: torch.Tensor
    params: DetectionParams
    future: Future = field(default_factory=Future)


class Batcher:
    """Args:
        detector: runs the batches.
        max_batch_size: most images in one batch.
        max_wait_s: how long the first image of a batch waits for others (0: take only what is
            already queued).
        on_batch: called with the size of every batch run (metrics).
        workers: threads running batches.
    """

    def __init__(self, detector: Detector, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_wait_s: float = DEFAULT_MAX_WAIT_S, on_batch: Callable[[int], None] | None = None,
                 workers: int = DEFAULT_WORKERS) -> None:
        if max_batch_size < 1 or max_wait_s < 0 or workers < 1:
            raise ValueError(f"max_batch_size and workers must be >= 1 and max_wait_s >= 0, got {max_batch_size}, "
                             f"{workers}, {max_wait_s}")
        self.detector = detector
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self.workers = workers
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._expected = 0  # requests received whose images are not queued yet
        self._lock = threading.Lock()

    @contextmanager
    def expecting(self) -> Iterator[None]:
        """Around a request's decoding: batches forming meanwhile wait for its images."""
        with self._lock:
            self._expected += 1
        try:
            yield
        finally:
            with self._lock:
                self._expected -= 1

    def start(self) -> None:
        if not self._threads:
            self._threads = [threading.Thread(target=self._run, name=f"detr-batcher-{i}", daemon=True)
                             for i in range(self.workers)]
            for thread in self._threads:
                thread.start()

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads = []

    def submit(self, images: Sequence[torch.Tensor], params: DetectionParams) -> Awaitable[list[dict]]:
        """Queue ``images``; await the result for their records, in order."""
        items = [_Item(image, params) for image in images]
        for item in items:
            self._queue.put(item)
        return asyncio.gather(*(asyncio.wrap_future(item.future) for item in items))

    async def detect(self, images: Sequence[torch.Tensor], params: DetectionParams) -> list[dict]:
        """The records of ``images``, in order, computed in batches shared with other requests."""
        return list(await self.submit(images, params))

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if self._expected == 0 and self._queue.empty():
                    break  # nobody else is coming: do not make this request wait
                try:
                    # In slices of at most 1 ms: the wait ends as soon as nobody else is coming.
                    if remaining > 0:
                        item = self._queue.get(timeout=min(remaining, 0.001))
                    else:
                        item = self._queue.get_nowait()
                except queue.Empty:
                    if remaining > 0:
                        continue
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[_Item]) -> None:
        if self.on_batch is not None:
            self.on_batch(len(batch))
        by_params: dict[DetectionParams, list[_Item]] = {}
        for item in batch:
            by_params.setdefault(item.params, []).append(item)
        for params, items in by_params.items():
            try:
                records = self.detector.detect([item.image for item in items], params)
            except Exception as e:  # noqa: BLE001 - handed to the waiting requests, which raise it
                for item in items:
                    item.future.set_exception(e)
            else:
                for item, record in zip(items, records):
                    item.future.set_result(record)
