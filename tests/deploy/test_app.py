"""The REST app over real HTTP: `detr serve` runs as its own process on a local port, requests go
through httpx. Bad requests get a 4xx with a message, and the server keeps answering."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from deploy.detector import DetectionParams, Detector
from tests.deploy.conftest import CLASSES
from tests.servers import VENV_BIN, free_port, server_process

MAX_BODY_BYTES = 512 * 1024


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(registered_model, tmp_path_factory) -> str:
    """`detr serve models:/shapes@champion` (the model from the registry, over the tracking URI)."""
    work = tmp_path_factory.mktemp("serve")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(VENV_BIN / "detr"), "serve", registered_model.serving_uri, "--port", str(port),
               "--max-body-mb", str(MAX_BODY_BYTES / 1024 / 1024), "--max-images", "4"]
    with server_process(command, ready_url=f"{url}/health/ready", log=work / "serve.log", cwd=work):
        yield url


def upload(*images: bytes, name: str = "scene.png") -> list:
    return [("image", (name, data, "image/png")) for data in images]


def test_metadata_and_labels(server):
    meta = httpx.get(f"{server}/model/metadata").json()
    assert meta["arch"] == "detr" and meta["classes"] == list(CLASSES)
    assert meta["source"] == "models:/shapes@champion"
    assert meta["limits"]["max_images"] == 4 and meta["limits"]["max_body_bytes"] == MAX_BODY_BYTES
    labels = httpx.get(f"{server}/model/labels").json()
    assert labels == {"count": 3, "labels": [{"id": i, "name": n} for i, n in enumerate(CLASSES)]}


def test_openapi_documents_the_predict_endpoint(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    predict = spec["paths"]["/model/predict"]["post"]
    names = {p["name"] for p in predict["parameters"]}
    assert names == {"score_threshold", "max_detections", "box_format"}
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert httpx.get(f"{server}/docs").status_code == 200


def test_predictions_equal_the_checkpoint(server, detr_checkpoint, request_images):
    response = httpx.post(f"{server}/model/predict", params={"score_threshold": 0.0, "box_format": "cxcywh"},
                          files=upload(*(png_bytes(p) for p in request_images)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    expected = Detector.from_checkpoint(detr_checkpoint).detect(
        [torch.from_numpy(p).permute(2, 0, 1) for p in request_images],
        DetectionParams(score_threshold=0.0, box_format="cxcywh"))
    for got, want in zip(body["predictions"], expected):
        assert got["labels"] == want["labels"] and got["image_size"] == want["image_size"]
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6)
        np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=1e-6)


@pytest.mark.parametrize(
    ("params", "files", "status", "message"),
    [
        ({}, [("image", ("notes.txt", b"hello", "text/plain"))], 400, "image 0 ('notes.txt'): not an image"),
        ({"box_format": "yxyx"}, None, 422, "box_format"),
        ({"score_threshold": "-1"}, None, 422, "score_threshold"),
        ({"max_detections": "many"}, None, 422, "max_detections"),
        ({}, [], 422, "image"),
    ],
)
def test_bad_requests_get_a_message(server, request_images, params, files, status, message):
    files = upload(png_bytes(request_images[0])) if files is None else files
    response = httpx.post(f"{server}/model/predict", params=params, files=files or None)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "error" and message in body["message"]
    assert httpx.get(f"{server}/ping").json() == {"status": "ok"}  # still up


def test_limits(server, request_images):
    one = png_bytes(request_images[0])
    response = httpx.post(f"{server}/model/predict", files=upload(*[one] * 5))
    assert response.status_code == 400 and "at most 4" in response.json()["message"]
    big = np.random.default_rng(0).integers(0, 256, (420, 420, 3), dtype=np.uint8)  # ~530 kB of PNG noise
    response = httpx.post(f"{server}/model/predict", files=upload(png_bytes(big)))
    assert response.status_code == 413 and "larger than" in response.json()["message"]
    # The same upload streamed without Content-Length (chunked) is counted as it arrives.
    body = (b"--zz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png_bytes(big) + b"\r\n--zz--\r\n")

    def chunks():
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    response = httpx.post(f"{server}/model/predict", content=chunks(),
                          headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert response.status_code == 413, response.text
    assert httpx.get(f"{server}/ping").status_code == 200
