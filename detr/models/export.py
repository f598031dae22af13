"""ONNX export of the inference path: images [B, 3, H, W] -> pred_logits, pred_boxes.

The graph is the model's forward without padding masks (every image fills the tensor) and without
the training-only outputs. Deformable attention is exported through the PyTorch reference backend
(``grid_sample``; ONNX GridSample, opset >= 16): the native kernels are not ONNX operators, so the
backend is forced to "reference" for the duration of the export.

Exporter: the TorchScript-based ``torch.onnx.export(dynamo=False)`` by default. It needs no extra
package, exports in seconds and keeps the batch dimension dynamic; for DETR the image height and
width are dynamic too. Deformable DETR's level sizes become constants of the graph (its deformable
attention splits the flattened levels by Python-side sizes), so its image height and width stay
static input dimensions, which ONNX Runtime enforces (a graph traced at one size would silently
compute garbage at a transposed size with the same number of positions). ``dynamo=True`` uses the
torch.export-based exporter instead (needs the ``onnxscript`` package; several times slower to
export).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from detr.errors import DetrError, InvalidInputError
from detr.ops.dispatch import BACKEND_ENV

INPUT_NAME = "images"
OUTPUT_NAMES = ("pred_logits", "pred_boxes")
MIN_OPSET = 16  # GridSample


class _InferenceOutputs(nn.Module):
    """Wraps a detector so that it returns the two inference tensors as a tuple (ONNX outputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out["pred_logits"], out["pred_boxes"]


@contextlib.contextmanager
def reference_attention_backend() -> Iterator[None]:
    """Force ``ms_deform_attn`` onto the PyTorch reference backend, restoring the environment after."""
    previous = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = "reference"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[BACKEND_ENV]
        else:
            os.environ[BACKEND_ENV] = previous


def supports_dynamic_image_size(model: nn.Module) -> bool:
    """DETR's graph computes every size from the input; Deformable DETR's level sizes are constants."""
    return getattr(model, "class_activation", None) == "softmax"


def export_onnx(
    model: nn.Module,
    path: str | Path,
    image_size: tuple[int, int] = (800, 800),
    *,
    opset: int = 18,
    batch_size: int = 1,
    dynamic_batch: bool = True,
    dynamic_image_size: bool | None = None,
    dynamo: bool = False,
) -> Path:
    """Export ``model`` (DETR or Deformable DETR) to an ONNX file.

    Args:
        model: the detector (``detr.load_model`` / ``build_model``); exported in eval mode on its device.
        path: the .onnx file to write (parent directories are created).
        image_size: (H, W) of the example input; for Deformable DETR the only size the graph accepts.
        opset: ONNX opset, at least 16 (GridSample).
        batch_size: batch of the example input (the graph's batch when ``dynamic_batch`` is False).
        dynamic_batch: the batch dimension is a graph input dimension ("batch").
        dynamic_image_size: H and W as graph dimensions; None = wherever supported (DETR).
        dynamo: use the torch.export-based exporter (needs onnxscript) instead of the TorchScript one.

    Returns:
        ``path``. Inputs: "images" float32 [B, 3, H, W] normalized as in training. Outputs:
        "pred_logits" [B, Q, K(+1)] and "pred_boxes" [B, Q, 4] normalized cxcywh.
    """
    height, width = _check_size(image_size)
    if opset < MIN_OPSET:
        raise InvalidInputError(f"opset {opset} is too old: the deformable attention needs GridSample (opset >= "
                                f"{MIN_OPSET})")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
    dynamic_hw = supports_dynamic_image_size(model) if dynamic_image_size is None else dynamic_image_size
    if dynamic_hw and not supports_dynamic_image_size(model):
        raise InvalidInputError(f"{type(model).__name__} cannot be exported with a dynamic image size: its feature "
                                "level sizes are constants of the graph; export one model per input size")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    # A batch of 1 would let the exporters specialise the batch dimension to 1.
    example = torch.randn(max(batch_size, 2) if dynamic_batch else batch_size, 3, height, width, device=device)
    axes = ({0: "batch"} if dynamic_batch else {}) | ({2: "height", 3: "width"} if dynamic_hw else {})
    was_training = model.training
    wrapper = _InferenceOutputs(model).eval()
    try:
        with reference_attention_backend(), torch.no_grad(), warnings.catch_warnings():
            # Expected while tracing: sizes read from tensors become graph constants where the
            # model uses them as Python numbers (checked above), and torch announces its newer exporter.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message="The feature will be removed.*")
            if dynamo:
                _export_dynamo(wrapper, example, path, opset, axes)
            else:
                torch.onnx.export(wrapper, (example,), str(path), input_names=[INPUT_NAME],
                                  output_names=list(OUTPUT_NAMES), opset_version=opset,
                                  dynamic_axes={INPUT_NAME: axes} if axes else None, dynamo=False)
    finally:
        model.train(was_training)
    return path


def _export_dynamo(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int, axes: dict[int, str]) -> None:
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError:
        raise DetrError("dynamo=True needs the onnxscript package (pip install onnxscript); the default "
                        "exporter (dynamo=False) does not") from None
    dims = {i: torch.export.Dim(name, min=1 if name == "batch" else 32) for i, name in axes.items()}
    program = torch.onnx.export(wrapper, (example,), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                opset_version=opset, dynamic_shapes=(dims,) if dims else None, dynamo=True)
    program.save(str(path))


def _check_size(image_size: tuple[int, int]) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise InvalidInputError(f"image_size must be (height, width), got {image_size!r}") from None
    if height < 32 or width < 32:
        raise InvalidInputError(f"image_size {image_size}: height and width must be at least 32 pixels (the "
                                "backbone's stride)")
    return height, width
