"""Cross-request batching in a real `detr serve`: concurrent requests share forward passes, and each
image's detections are those it gets alone."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from deploy.detector import DetectionParams, Detector
from tests.deploy.conftest import scene_pixels


def batch_histogram(url: str) -> tuple[float, float]:
    """(batches run, images in them) so far."""
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            values[sample.name] = sample.value
    return values["detr_batch_size_count"], values["detr_batch_size_sum"]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_concurrent_requests_share_batches_without_changing_results(detr_server, detr_checkpoint):
    url = detr_server.url
    # 24 requests of one image each, same size (so they can share a pass), different content; plus a
    # few of another size and with other params in the mix.
    images = [scene_pixels(100 + i, 120, 90) for i in range(24)] + [scene_pixels(200 + i, 70, 110) for i in range(4)]
    params = [{"score_threshold": 0.0} if i % 5 else {"score_threshold": 0.0, "box_format": "xywh"}
              for i in range(len(images))]
    before = batch_histogram(url)

    def send(i: int) -> dict:
        response = httpx.post(f"{url}/model/predict", params=params[i], timeout=120,
                              files=[("image", (f"{i}.png", png(images[i]), "image/png"))])
        assert response.status_code == 200, response.text
        return response.json()["predictions"][0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(send, range(len(images))))
    batches, batched_images = (a - b for a, b in zip(batch_histogram(url), before))
    assert batched_images == len(images)
    assert batches < len(images), "no two requests shared a batch"

    detector = Detector.from_checkpoint(detr_checkpoint)
    for i, (pixels, record) in enumerate(zip(images, got)):
        (alone,) = detector.detect([torch.from_numpy(pixels).permute(2, 0, 1)], DetectionParams(**params[i]))
        assert record["labels"] == alone["labels"] and record["image_size"] == alone["image_size"], i
        np.testing.assert_allclose(record["scores"], alone["scores"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(record["boxes"], alone["boxes"], rtol=1e-4, atol=1e-3)


def test_a_lone_request_does_not_wait_and_an_announced_one_is_waited_for(detr_checkpoint):
    import asyncio
    import time

    from deploy.batching import Batcher

    sizes: list[int] = []
    batcher = Batcher(Detector.from_checkpoint(detr_checkpoint), max_batch_size=8, max_wait_s=5.0,
                      on_batch=sizes.append, workers=1)
    image = torch.from_numpy(scene_pixels(5, 120, 90)).permute(2, 0, 1)
    batcher.start()
    try:
        async def lone():
            start = time.monotonic()
            await batcher.detect([image], DetectionParams())
            return time.monotonic() - start

        assert asyncio.run(lone()) < 4.0  # not the 5 s of max_wait_s
        assert sizes == [1]

        async def two_requests():
            with batcher.expecting():  # the second request is still decoding its image
                first = batcher.submit([image], DetectionParams())
                await asyncio.sleep(0.3)
                second = batcher.submit([image], DetectionParams())
            return await first, await second

        first, second = asyncio.run(two_requests())
        assert sizes == [1, 2]  # one forward pass for both
        assert first == second
    finally:
        batcher.stop()
