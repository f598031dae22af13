"""``detr.load_model``: a checkpoint file in, (model in eval mode, config, label map) out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from detr.checkpoints.format import load_checkpoint
from detr.config import Config, config_from_dict
from detr.data.labelmap import LabelMap
from detr.errors import CheckpointError
from detr.models.build import build_model


def load_model(
    checkpoint: str | Path, *, device: str | torch.device = "cpu", use_ema: bool = True
) -> tuple[nn.Module, Config, LabelMap]:
    """Rebuild the model a checkpoint was trained (or converted) as, with its weights.

    The architecture comes from the config stored in the checkpoint and the number of classes from
    its label map, so nothing has to be repeated by hand. With ``use_ema`` the EMA weights are used
    when the checkpoint has them (they are what evaluation reported).
    """
    path = Path(checkpoint)
    data = load_checkpoint(path, map_location=device)
    require_model_entries(data, path)
    config = config_from_dict(data["config"], source=f"{path} (stored config)")
    label_map = LabelMap.from_dict(data["label_map"], source=f"{path} (stored label map)")
    model = build_model(config.model, len(label_map))
    try:
        model.load_state_dict(inference_weights(data, use_ema=use_ema))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the stored model config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), config, label_map


def require_model_entries(data: dict[str, Any], path: str | Path) -> None:
    """A checkpoint that can rebuild its model holds the weights, the config and the label map."""
    for key in ("model", "config", "label_map"):
        if key not in data:
            raise CheckpointError(f"{path}: checkpoint has no {key!r} entry; it was not written by this package")


def inference_weights(data: dict[str, Any], *, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The model's state dict, or its EMA weights when the checkpoint has them and ``use_ema``."""
    ema = data.get("ema")
    if use_ema and ema is not None:
        # AveragedModel's state dict: "module.<name>" entries plus its "n_averaged" counter.
        return {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}
    return data["model"]
