"""ONNX export: onnxruntime on CPU reproduces the eager model's pred_logits / pred_boxes, the batch
(and for DETR the image size) is dynamic, and the deformable attention goes through the reference op."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from detr.checkpoints.format import save_checkpoint
from detr.cli import main
from detr.config import Config
from detr.data.labelmap import LabelMap
from detr.errors import DetrError, InvalidInputError
from detr.models.build import build_model
from detr.models.export import export_onnx
from detr.ops.dispatch import BACKEND_ENV
from tests.models.conftest import tiny_model_config

ort = pytest.importorskip("onnxruntime")

H, W = 64, 96
ATOL = 1e-4


def _model(variant: str, **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_model_config(variant, **changes), 3).eval()


def _run(path, images: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})


def _assert_matches_eager(model: torch.nn.Module, path, images: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(images)
    logits, boxes = _run(path, images)
    np.testing.assert_allclose(logits, expected["pred_logits"].numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(boxes, expected["pred_boxes"].numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["detr", "detr_two_stage"])
def test_detr_dynamic_batch_and_size(variant, tmp_path):
    model = _model(variant)
    path = export_onnx(model, tmp_path / f"{variant}.onnx", (H, W))
    g = torch.Generator().manual_seed(1)
    for shape in ((1, 3, H, W), (3, 3, H, W), (2, 3, 96, 64), (1, 3, 128, 160)):
        _assert_matches_eager(model, path, torch.randn(*shape, generator=g))


def test_channels_last_backbone_exports_the_same_graph_function(tmp_path):
    """The channels-last ResNet is a memory layout only: its export computes what the eager model does."""
    model = _model("detr_two_stage", backbone={"name": "resnet18", "channels_last": True})
    assert model.backbone[0].body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    path = export_onnx(model, tmp_path / "channels_last.onnx", (H, W))
    g = torch.Generator().manual_seed(1)
    for shape in ((1, 3, H, W), (2, 3, 96, 64)):
        _assert_matches_eager(model, path, torch.randn(*shape, generator=g))


@pytest.mark.parametrize(
    "variant", ["deformable_refine", "deformable_two_stage", "deformable_two_stage_encoder_content"])
def test_deformable_dynamic_batch_fixed_size(variant, tmp_path, monkeypatch):
    # The native backend requested here would fail to export; the export forces the reference op.
    monkeypatch.setenv(BACKEND_ENV, "native")
    model = _model(variant)
    config = tiny_model_config(variant)
    assert config.deformable.n_levels == 4 and config.deformable.with_box_refine
    path = export_onnx(model, tmp_path / f"{variant}.onnx", (H, W))
    assert os.environ[BACKEND_ENV] == "native"
    g = torch.Generator().manual_seed(2)
    monkeypatch.setenv(BACKEND_ENV, "reference")  # the eager reference for the comparison
    for batch in (1, 3):
        _assert_matches_eager(model, path, torch.randn(batch, 3, H, W, generator=g))
    with pytest.raises(Exception, match="(?i)invalid dimensions"):
        _run(path, torch.randn(1, 3, W, H))  # same number of positions, other shape: refused, not garbage


def test_export_restores_environment_and_mode(tmp_path, monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    model = _model("deformable_single_scale").train()
    export_onnx(model, tmp_path / "m.onnx", (H, W), dynamic_batch=False, batch_size=2)
    assert BACKEND_ENV not in os.environ
    assert model.training
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, H, W]
    assert [o.name for o in session.get_outputs()] == ["pred_logits", "pred_boxes"]


def test_export_argument_errors(tmp_path):
    deformable = _model("deformable_multi_scale")
    with pytest.raises(InvalidInputError, match="GridSample"):
        export_onnx(deformable, tmp_path / "a.onnx", (H, W), opset=15)
    with pytest.raises(InvalidInputError, match="dynamic image size"):
        export_onnx(deformable, tmp_path / "a.onnx", (H, W), dynamic_image_size=True)
    with pytest.raises(InvalidInputError, match="at least 32 pixels"):
        export_onnx(deformable, tmp_path / "a.onnx", (16, 16))
    with pytest.raises(InvalidInputError, match=r"\(height, width\)"):
        export_onnx(deformable, tmp_path / "a.onnx", "big")


def test_cli_export(tmp_path, capsys):
    full = Config(model=tiny_model_config("deformable_multi_scale"))
    model = build_model(full.model, 2).eval()
    labels = LabelMap(("car", "person"))
    checkpoint = save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "config": full.to_dict(),
                                                         "label_map": labels.to_dict()})
    out = tmp_path / "onnx" / "model.onnx"
    assert main(["export", str(checkpoint), "--out", str(out), "--image-size", f"{H}x{W}"]) == 0
    assert "model.onnx" in capsys.readouterr().out
    assert LabelMap.load(out.with_suffix(".labels.json")) == labels
    _assert_matches_eager(model, out, torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(3)))
    assert main(["export", str(checkpoint), "--out", str(out), "--image-size", "big"]) == 2
    assert "--image-size 'big'" in capsys.readouterr().err


@pytest.mark.slow
def test_dynamo_exporter(tmp_path):
    pytest.importorskip("onnxscript")
    model = _model("deformable_refine")
    path = export_onnx(model, tmp_path / "dynamo.onnx", (H, W), dynamo=True)
    for batch in (1, 2):
        _assert_matches_eager(model, path, torch.randn(batch, 3, H, W, generator=torch.Generator().manual_seed(4)))


def test_dynamo_exporter_needs_onnxscript(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    with pytest.raises(DetrError, match="onnxscript"):
        export_onnx(_model("detr"), tmp_path / "a.onnx", (H, W), dynamo=True)
