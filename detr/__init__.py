"""mlflow-detr: DETR and Deformable DETR from your detection data to a served MLflow model.

The public API (stable names; the CLI is built on them) is imported lazily so that ``import detr``
and the CLI's ``--help`` stay fast and do not load torch until it is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute"
_LAZY = {
    "load_config": "detr.config:load_config",
    "Config": "detr.config:Config",
    "build_model": "detr.models.build:build_model",
    "load_model": "detr.checkpoints.load:load_model",
    "predict": "detr.models.postprocess:predict",
    "convert_checkpoint": "detr.checkpoints.convert:convert_checkpoint",
    "DetrError": "detr.errors:DetrError",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'detr' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
