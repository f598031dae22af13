"""What only a broken or slow model shows, in-process (starlette's TestClient runs the app with its
lifespan): a bug is a 500 with a fixed message and a logged traceback, and /health/ready waits for
the warm-up prediction."""

from __future__ import annotations

import io
import logging
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deploy.app import create_app
from deploy.detector import Detector
from deploy.errors import INTERNAL_ERROR_MESSAGE


class BrokenDetector(Detector):
    """The real detector with a bug after the warm-up: every request's forward pass raises."""

    calls = 0

    def detect(self, images, params=None):
        type(self).calls += 1
        if type(self).calls > 1:
            raise RuntimeError("shape mismatch in layer 7 (secret internals)")
        return super().detect(images) if params is None else super().detect(images, params)


class SlowToWarmDetector(Detector):
    """The real detector whose first prediction waits until the test lets it go."""

    release = threading.Event()

    def detect(self, images, params=None):
        self.release.wait(timeout=60)
        return super().detect(images) if params is None else super().detect(images, params)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 60
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.05)


@pytest.mark.parametrize("batching", [True, False])
def test_a_bug_is_a_500_without_traceback_and_is_logged(detr_checkpoint, caplog, monkeypatch, batching):
    # import-linter (tests/test_layers.py, same process) configures logging with dictConfig, which
    # disables every logger that existed before: undo that for the app's logger.
    monkeypatch.setattr(logging.getLogger("deploy.app"), "disabled", False)
    BrokenDetector.calls = 0
    app = create_app(BrokenDetector.from_checkpoint(detr_checkpoint), batching=batching)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        with caplog.at_level(logging.ERROR, logger="deploy.app"):
            response = client.post("/model/predict", files=[("image", ("a.png", png(), "image/png"))])
        assert response.status_code == 500
        assert response.json() == {"status": "error", "message": INTERNAL_ERROR_MESSAGE}
        assert "secret" not in response.text and "Traceback" not in response.text
        logged = [r for r in caplog.records if r.name == "deploy.app" and r.exc_info]
        assert logged and "shape mismatch in layer 7" in str(logged[0].exc_info[1])
        assert client.get("/health/live").status_code == 200
        metrics = client.get("/metrics").text
        assert 'detr_http_requests_total{method="POST",route="/model/predict",status="500"} 1.0' in metrics


def test_ready_only_after_the_warm_up_prediction(detr_checkpoint):
    SlowToWarmDetector.release.clear()
    app = create_app(SlowToWarmDetector.from_checkpoint(detr_checkpoint))
    with TestClient(app) as client:
        assert client.get("/health/live").json() == {"status": "ok"}
        response = client.get("/health/ready")
        assert response.status_code == 503
        assert response.json() == {"status": "error", "message": "not ready: the model is warming up"}
        SlowToWarmDetector.release.set()
        wait_ready(client)
        assert client.get("/health/ready").json() == {"status": "ok"}
