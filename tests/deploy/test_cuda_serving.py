"""`detr serve --device cuda` answers what `detr serve` on the CPU answers, within 1e-3.

Two real server processes (one per device) get the same request over HTTP. Skipped without a GPU.
With the threshold at 0 and room for every candidate, both return every (query, class) candidate, so
the two answers hold the same detections; their order can differ where two scores nearly tie, hence
the matching below.
"""

from __future__ import annotations

import sys

import httpx
import numpy as np
import pytest
import torch

from tests.deploy.test_app import png_bytes, upload
from tests.servers import free_port, server_process

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")

TOLERANCE = 1e-3


def _serve(checkpoint, device: str, work):
    port = free_port()
    command = [sys.executable, "-m", "detr.cli", "serve", str(checkpoint), "--port", str(port), "--device", device]
    return f"http://127.0.0.1:{port}", server_process(command, ready_url=f"http://127.0.0.1:{port}/health/ready",
                                                     log=work / f"serve-{device}.log", cwd=work)


def _unmatched(got: dict, want: dict, size: int) -> list[str]:
    """Detections of ``want`` with no detection in ``got`` of the same class within the tolerance
    (scores absolute, boxes relative to the image's longer side)."""
    free = list(range(len(got["scores"])))
    missing = []
    for label, score, box in zip(want["labels"], want["scores"], want["boxes"]):
        match = next((j for j in free if got["labels"][j] == label and abs(got["scores"][j] - score) <= TOLERANCE
                      and np.abs(np.subtract(got["boxes"][j], box)).max() <= TOLERANCE * size), None)
        if match is None:
            missing.append(f"{label} {score:.5f} {np.round(box, 3).tolist()}")
        else:
            free.remove(match)
    return missing


@pytest.mark.parametrize("arch", ["detr", "deformable"])
def test_cuda_server_answers_as_the_cpu_server(arch, detr_checkpoint, deformable_checkpoint, request_images,
                                               tmp_path):
    checkpoint = detr_checkpoint if arch == "detr" else deformable_checkpoint
    files = upload(*(png_bytes(p) for p in request_images))
    params = {"score_threshold": 0.0, "max_detections": 100}
    answers = {}
    for device in ("cpu", "cuda"):
        url, server = _serve(checkpoint, device, tmp_path)
        with server:
            response = httpx.post(f"{url}/model/predict", params=params, files=files, timeout=120)
        assert response.status_code == 200, response.text
        answers[device] = response.json()["predictions"]
    for pixels, on_gpu, on_cpu in zip(request_images, answers["cuda"], answers["cpu"]):
        assert on_gpu["image_size"] == on_cpu["image_size"]
        assert len(on_gpu["scores"]) == len(on_cpu["scores"]) > 0
        missing = _unmatched(on_gpu, on_cpu, max(pixels.shape[:2]))
        assert not missing, (f"{len(missing)} of {len(on_cpu['scores'])} CPU detections have no CUDA match: "
                             f"{missing[:5]}")
