"""The registered model behind a real `mlflow models serve` process, over HTTP: the same detections
as in-process, params passed through, 400 with the reason for bad requests, and the server stays up."""

from __future__ import annotations

import base64

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest

from deploy.images import encode_png_base64
from tests.deploy.odd_images import odd_images
from tests.servers import VENV_BIN, free_port, server_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scoring_server(registered_model, tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("mlflow-serve")
    port = free_port()
    command = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", registered_model.serving_uri,
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with server_process(command, ready_url=f"{url}/ping", log=work / "serve.log", cwd=work):
        yield url


def invoke(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/invocations", json=body, timeout=120)


def test_served_over_http_equals_in_process(scoring_server, registered_model, request_images):
    images = [encode_png_base64(p) for p in request_images]
    params = {"score_threshold": 0.0, "max_detections": 4, "box_format": "xywh"}
    expected = mlflow.pyfunc.load_model(registered_model.serving_uri).predict(
        pd.DataFrame({"image": images}), params=params)
    for body in (
        {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}, "params": params},
        {"dataframe_records": [{"image": i} for i in images], "params": params},
    ):
        response = invoke(scoring_server, body)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert len(predictions) == len(images)
        for got, want in zip(predictions, expected):
            assert got["labels"] == want["labels"] and got["image_size"] == want["image_size"]
            assert len(got["scores"]) == 4
            np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6)
            np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=1e-6)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"dataframe_records": [{"image": "aGVsbG8gd29ybGQ="}]}, "row 0, column 'image': not an image"),
        ({"dataframe_records": [{"image": "http://10.0.0.1/secret.png"}]}, "URLs are never fetched"),
        ({"dataframe_records": [{"IMAGE": "x"}]}, "image"),
        ({"dataframe_records": [{"image": None}], "params": {}}, "image"),
        ("PARAMS", "box_format must be one of"),
    ],
)
def test_bad_requests_are_400_and_the_server_stays_up(scoring_server, request_images, body, message):
    if body == "PARAMS":
        body = {"dataframe_records": [{"image": encode_png_base64(request_images[0])}],
                "params": {"box_format": "polygon"}}
    response = invoke(scoring_server, body)
    assert response.status_code == 400, response.text
    assert message in response.json()["message"]
    assert httpx.get(f"{scoring_server}/ping").status_code == 200


def test_every_kind_of_image_gets_an_answer(scoring_server):
    """Strips of any aspect ratio, grayscale, 16-bit, CMYK, RGBA, palette, EXIF-rotated: one request."""
    images = odd_images()
    body = {"dataframe_records": [{"image": base64.b64encode(o.data).decode()} for o in images],
            "params": {"score_threshold": 0.0}}
    response = invoke(scoring_server, body)
    assert response.status_code == 200, response.text[:2000]
    predictions = response.json()["predictions"]
    for odd, record in zip(images, predictions, strict=True):
        assert record["image_size"] == list(odd.size), odd.name
        assert len(record["scores"]) > 0, odd.name


def test_messages_lead_with_the_problem(scoring_server, request_images):
    body = {"dataframe_records": [{"image": encode_png_base64(request_images[0])},
                                  {"image": base64.b64encode(b"plain text").decode()}]}
    response = invoke(scoring_server, body)
    assert response.status_code == 400
    message = response.json()["message"]
    assert message.startswith("row 1, column 'image': not an image"), message[:300]
    assert "Failed to predict data" not in message and len(message) < 300
