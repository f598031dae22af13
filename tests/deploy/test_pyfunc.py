"""The logged pyfunc model: registered under an alias, self-contained, same detections as the
checkpoint, declared params, and MLflow's INVALID_PARAMETER_VALUE for every bad request."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from deploy.detector import DetectionParams, Detector
from deploy.images import encode_png_base64
from deploy.packaging import log_detr_model
from detr.errors import InvalidInputError


def frame(images) -> pd.DataFrame:
    return pd.DataFrame({"image": [encode_png_base64(p) for p in images]})


def test_alias_resolves_to_the_registered_version(registered_model, tracking_uri):
    assert registered_model.serving_uri == "models:/shapes@champion"
    version = MlflowClient().get_model_version_by_alias("shapes", "champion")
    assert str(version.version) == registered_model.version == "1"
    assert MlflowClient().get_model_version("shapes", "1").run_id == registered_model.run_id


def test_served_detections_equal_the_checkpoint(registered_model, detr_checkpoint, request_images):
    model = mlflow.pyfunc.load_model(registered_model.serving_uri)
    params = {"score_threshold": 0.0, "max_detections": 5, "box_format": "xywh"}
    records = model.predict(frame(request_images), params=params)
    expected = Detector.from_checkpoint(detr_checkpoint).detect(
        [torch.from_numpy(p).permute(2, 0, 1) for p in request_images],
        DetectionParams(score_threshold=0.0, max_detections=5, box_format="xywh"))
    assert len(records) == len(request_images)
    for got, want in zip(records, expected):
        assert set(got) == {"boxes", "scores", "labels", "label_ids", "image_size"}
        assert got["labels"] == want["labels"] and got["image_size"] == want["image_size"]
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6)
        np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=1e-6)


def test_signature_declares_the_image_column_and_params(registered_model):
    info = mlflow.models.get_model_info(registered_model.model_uri)
    assert info.signature.inputs.input_names() == ["image"]
    params = {p.name: (p.dtype.name, p.default) for p in info.signature.params}
    assert params == {"score_threshold": ("double", 0.5), "max_detections": ("long", 100),
                      "box_format": ("string", "xyxy")}


def test_default_params_apply(registered_model, request_images):
    model = mlflow.pyfunc.load_model(registered_model.serving_uri)
    (record,) = model.predict(frame(request_images[:1]))
    assert all(score >= 0.5 for score in record["scores"])


@pytest.mark.parametrize(
    ("data", "params", "message"),
    [
        (pd.DataFrame({"image": ["bm90IGFuIGltYWdl"]}), None, "row 0, column 'image': not an image"),
        (pd.DataFrame({"image": ["https://example.com/a.png"]}), None, "URLs are never fetched"),
        (None, {"box_format": "polygon"}, "box_format must be one of"),
        (None, {"score_threshold": 2.0}, "score_threshold must be a number in"),
        (pd.DataFrame({"image": []}), None, "no image|Incompatible input types"),  # MLflow refuses it first
    ],
)
def test_bad_requests_raise_invalid_parameter_value(registered_model, request_images, data, params, message):
    model = mlflow.pyfunc.load_model(registered_model.serving_uri)
    with pytest.raises(MlflowException, match=message) as info:
        model.predict(frame(request_images[:1]) if data is None else data, params=params)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


def test_direct_calls_check_the_input_and_the_image_count(registered_model, request_images, monkeypatch):
    import deploy.pyfunc_model

    python_model = mlflow.pyfunc.load_model(registered_model.serving_uri).unwrap_python_model()
    with pytest.raises(MlflowException, match="no column 'image' \\(columns: \\['picture'\\]\\)"):
        python_model.predict(None, pd.DataFrame({"picture": ["x"]}))
    with pytest.raises(MlflowException, match="expected a DataFrame with a string column 'image', got list"):
        python_model.predict(None, ["x"])
    monkeypatch.setattr(deploy.pyfunc_model, "MAX_IMAGES_PER_REQUEST", 2)
    with pytest.raises(MlflowException, match="holds 3 images; at most 2 per request"):
        python_model.predict(None, frame(request_images))
    with pytest.raises(MlflowException, match="unknown params \\['threshold'\\]"):
        python_model.predict(None, frame(request_images[:1]), params={"threshold": 0.2})


def test_logged_model_loads_without_the_source_tree(registered_model, request_images, tmp_path):
    """Load the downloaded model in a fresh interpreter elsewhere, with the editable install of
    this package disabled: the code must come from the model's own code/ directory."""
    local = mlflow.artifacts.download_artifacts(registered_model.model_uri, dst_path=str(tmp_path / "model"))
    (tmp_path / "request.json").write_text(json.dumps([encode_png_base64(request_images[0])]))
    script = textwrap.dedent(f"""
        import json, sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", "") or "")]
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model({local!r})
        images = json.load(open("request.json"))
        records = model.predict(pd.DataFrame({{"image": images}}), params={{"score_threshold": 0.0}})
        import detr, deploy
        print(json.dumps({{"detr": detr.__file__, "deploy": deploy.__file__, "records": records}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["detr"].startswith(local) and out["deploy"].startswith(local)
    expected = mlflow.pyfunc.load_model(registered_model.model_uri).predict(
        frame(request_images[:1]), params={"score_threshold": 0.0})
    np.testing.assert_allclose(out["records"][0]["scores"], expected[0]["scores"], rtol=1e-6)


def test_a_new_version_moves_the_alias(deformable_checkpoint, registered_model):
    logged = log_detr_model(deformable_checkpoint, registered_name="shapes-moving", alias="champion")
    again = log_detr_model(deformable_checkpoint, registered_name="shapes-moving", alias="champion")
    assert (logged.version, again.version) == ("1", "2")
    assert str(MlflowClient().get_model_version_by_alias("shapes-moving", "champion").version) == "2"


def test_training_run_recorded_in_the_checkpoint_receives_the_model(detr_checkpoint, tracking_uri, tmp_path):
    from detr.checkpoints.format import load_checkpoint, save_checkpoint

    with mlflow.start_run() as run:
        pass
    data = load_checkpoint(detr_checkpoint)
    trained = save_checkpoint(tmp_path / "best.pt", {**data, "mlflow_run_id": run.info.run_id})
    logged = log_detr_model(trained)
    assert logged.run_id == run.info.run_id
    assert logged.registered_name is None and logged.serving_uri == logged.model_uri


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alias": "champion"}, "an alias needs a registered model name"),
        ({"registered_name": "x", "alias": "latest"}, "alias 'latest' is not allowed"),
        ({"run_id": "0" * 32}, "is not in the tracking store"),
    ],
)
def test_bad_logging_requests(detr_checkpoint, tracking_uri, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        log_detr_model(detr_checkpoint, **kwargs)


def test_missing_checkpoint(tmp_path, tracking_uri):
    from detr.errors import CheckpointError

    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        log_detr_model(tmp_path / "nope.pt")
