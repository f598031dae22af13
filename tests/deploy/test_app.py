"""The REST app over real HTTP: `detr serve` runs as its own process on a local port, requests go
through httpx. Bad requests get a 4xx with a message, and the server keeps answering."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from deploy.detector import DetectionParams, Detector
from tests.deploy.conftest import CLASSES, MAX_BODY_BYTES
from tests.deploy.odd_images import odd_images


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(detr_server) -> str:
    return detr_server.url


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


@pytest.mark.parametrize("odd", odd_images(), ids=lambda o: o.name)
def test_every_kind_of_image_gets_an_answer(server, odd):
    """Strips of any aspect ratio, grayscale, 16-bit, CMYK, RGBA, palette, EXIF-rotated."""
    response = httpx.post(f"{server}/model/predict", params={"score_threshold": 0.0},
                          files=[("image", (f"{odd.name}{odd.suffix}", odd.data, "application/octet-stream"))])
    assert response.status_code == 200, response.text
    (record,) = response.json()["predictions"]
    assert record["image_size"] == list(odd.size)
    assert len(record["scores"]) > 0
    width, height = odd.size
    for x1, y1, x2, y2 in record["boxes"]:
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "message"),
    [
        ("GET", "/no/such/path", {}, 404, "no such path: /no/such/path"),
        ("GET", "/model/predict", {}, 405, "GET is not allowed on /model/predict; use POST"),
        ("DELETE", "/model/labels", {}, 405, "DELETE is not allowed"),
        ("POST", "/model/predict", {"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data"}},
         400, "not valid multipart/form-data"),
        ("POST", "/model/predict", {"json": {"image": "abc"}}, 422, "image"),
        ("POST", "/model/predict?score_threshold=0.2&treshold=0.3", {}, 400,
         "unknown query parameter(s) 'treshold'; accepted: box_format, max_detections, score_threshold"),
        ("GET", "/model/labels?verbose=1", {}, 400, "unknown query parameter(s) 'verbose'; accepted: none"),
        ("POST", "/model/predict?max_detections=0", {}, 422, "max_detections"),
    ],
)
def test_every_error_has_one_shape(server, request_images, method, path, kwargs, status, message):
    if method == "POST" and not kwargs:
        kwargs = {"files": upload(png_bytes(request_images[0]))}
    response = httpx.request(method, f"{server}{path}", **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"status", "message"} and body["status"] == "error", body
    assert message in body["message"], body["message"]
    assert httpx.get(f"{server}/health/live").json() == {"status": "ok"}


def test_health_and_metrics(server, request_images):
    assert httpx.get(f"{server}/health/live").json() == {"status": "ok"}
    assert httpx.get(f"{server}/health/ready").json() == {"status": "ok"}
    one = png_bytes(request_images[0])
    assert httpx.post(f"{server}/model/predict", files=upload(one, one, one)).status_code == 200
    assert httpx.get(f"{server}/nowhere").status_code == 404
    text = httpx.get(f"{server}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    ok = samples[("detr_http_requests_total", (("method", "POST"), ("route", "/model/predict"), ("status", "200")))]
    assert ok >= 1
    assert samples[("detr_http_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] >= 1
    assert samples[("detr_http_request_duration_seconds_count", (("method", "POST"), ("route", "/model/predict")))] >= 1
    assert samples[("detr_images_per_request_bucket", (("le", "2.0"),))] < samples[
        ("detr_images_per_request_bucket", (("le", "4.0"),))]  # the request of three images
    assert samples[("detr_batch_size_count", ())] >= 1
    info = [labels for (name, labels) in samples if name == "detr_model_info"]
    assert dict(info[0]) == {"name": "shapes", "version": "1", "arch": "detr", "source": "models:/shapes@champion"}


def test_docs_assets_are_served_by_the_app(server):
    for page in ("/docs", "/redoc", "/"):
        html = httpx.get(f"{server}{page}").text
        assert "cdn." not in html and "googleapis" not in html and "https://" not in html.replace(
            "http://www.w3.org", ""), page
    for asset in ("/static-offline-docs/swagger-ui-bundle.js", "/static-offline-docs/redoc.standalone.js",
                  "/static/page.js", "/static/page.css"):
        response = httpx.get(f"{server}{asset}")
        assert response.status_code == 200 and len(response.content) > 1000, asset
