"""Both servers enforce the same limits, and `detr serve` reports them in /model/metadata."""

from __future__ import annotations

from fastapi.testclient import TestClient

import deploy.pyfunc_model
from deploy.app import create_app
from deploy.detector import Detector
from deploy.images import ImageLimits


def test_detr_serve_reports_the_limits_the_pyfunc_model_applies(detr_checkpoint, monkeypatch):
    monkeypatch.delenv("DETR_SERVE_MAX_IMAGES", raising=False)
    with TestClient(create_app(Detector.from_checkpoint(detr_checkpoint))) as client:
        limits = client.get("/model/metadata").json()["limits"]
    pyfunc = deploy.pyfunc_model.DetrPythonModel()
    assert limits["max_images"] == deploy.pyfunc_model.MAX_IMAGES_PER_REQUEST == 16
    assert limits["max_image_bytes"] == pyfunc.limits.max_bytes == ImageLimits().max_bytes
    assert limits["max_image_pixels"] == pyfunc.limits.max_pixels == ImageLimits().max_pixels
