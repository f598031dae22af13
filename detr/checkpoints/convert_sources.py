"""Reading checkpoints of other code bases into this package's parameter names.

Each reader returns a ``SourceWeights``: the tensors renamed to the names of ``detr.models``
(``build_model``), where each one came from, what was left out and why, the architecture values the
source declares (argparse ``args`` or a Hugging Face config; the tensors' shapes are read later, in
``convert_arch``) and the class names by class id.

This module reads the official layouts: facebookresearch/detr (``{"model": state_dict, "args":
argparse.Namespace, ...}``) and fundamentalvision/Deformable-DETR (same layout). Both use the module
names this package uses, so the renaming is the identity except for Deformable DETR's
``transformer.decoder.class_embed.*`` / ``transformer.decoder.bbox_embed.*``, which are the
top-level heads registered a second time, and the segmentation heads of DETR's panoptic models.
"""

from __future__ import annotations

import argparse
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from detr.checkpoints.format import KIND
from detr.errors import CheckpointError

# COCO's class ids as the official DETR and Deformable DETR models predict them: index = COCO
# category id, 91 slots, "N/A" where COCO has no category (0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83).
COCO_91_CLASSES = (
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A",
    "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)


@dataclass
class SourceWeights:
    """A foreign checkpoint renamed into this package's parameter names.

    Attributes:
        kind: human-readable origin, e.g. "official DETR checkpoint".
        arch: "detr" or "deformable_detr".
        state: our parameter name -> tensor.
        origin: our parameter name -> the name (or names) it was built from in the source file.
        dropped: reason -> source keys deliberately left out (duplicates, counters, unsupported heads).
        declared: ModelConfig values the source states (hidden_dim, nheads, deformable.n_points, ...)
            as a nested dict; values the tensors determine are checked against them.
        class_names: name of each class id, or None when the source does not say.
        label_source: where the class names come from, for the report.
        notes: anything else the report should say.
    """

    kind: str
    arch: str
    state: dict[str, torch.Tensor]
    origin: dict[str, str]
    dropped: dict[str, list[str]] = field(default_factory=dict)
    declared: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    label_source: str = ""
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, key: str) -> None:
        self.dropped.setdefault(reason, []).append(key)


def unique_class_names(names: list[str]) -> list[str]:
    """Label-map names from per-id names: a repeated or empty name gets its id appended
    ("N/A" at id 12 -> "N/A_12"), since label-map names must be unique."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    out = []
    for class_id, name in enumerate(names):
        if not name.strip():
            out.append(f"class_{class_id}")
        elif counts[name] > 1:
            out.append(f"{name}_{class_id}")
        else:
            out.append(name)
    return out


def load_torch_file(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``, allowing the ``argparse.Namespace`` the official
    repositories pickle as ``args`` (a plain attribute bag; any other Python object is refused)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({first_line}); expected a file saved with torch.save "
            "holding tensors (and argparse args), as the official DETR / Deformable-DETR releases"
        ) from None


def is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _official_payload(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, args as a dict) of an official checkpoint (a bare state dict is accepted too)."""
    data = load_torch_file(path)
    if isinstance(data, Mapping) and data.get("kind") == KIND:
        raise CheckpointError(f"{path}: already an mlflow-detr checkpoint; load it with detr.load_model, "
                              "there is nothing to convert")
    if is_state_dict(data):
        return dict(data), {}
    if not isinstance(data, Mapping) or not is_state_dict(data.get("model")):
        found = sorted(data)[:8] if isinstance(data, Mapping) else type(data).__name__
        raise CheckpointError(
            f"{path}: expected an official checkpoint {{'model': state_dict, 'args': ...}} (or a bare state "
            f"dict of tensors), found {found}"
        )
    args = data.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return dict(data["model"]), dict(args) if isinstance(args, Mapping) else {}


def _require_layout(path: Path, state: Mapping[str, torch.Tensor], arch: str) -> None:
    """A clear error when the file is the other architecture (or neither)."""
    deformable = "transformer.level_embed" in state
    detr = "transformer.decoder.norm.weight" in state and "class_embed.weight" in state
    if arch == "detr" and not detr:
        hint = "use --source deformable_detr" if deformable else "it has no transformer.decoder.norm / class_embed"
        raise CheckpointError(f"{path}: not a facebookresearch/detr checkpoint ({hint})")
    if arch == "deformable_detr" and not deformable:
        hint = "use --source detr" if detr else "it has no transformer.level_embed"
        raise CheckpointError(f"{path}: not a fundamentalvision/Deformable-DETR checkpoint ({hint})")


def read_official_detr(path: Path) -> SourceWeights:
    """facebookresearch/detr: key for key; panoptic models' ``detr.`` prefix stripped and their mask
    head left out (this package detects boxes only)."""
    raw, args = _official_payload(path)
    if any(k.startswith("detr.") for k in raw):
        out = SourceWeights("official DETR checkpoint", "detr", {}, {})
        for key, value in raw.items():
            if key.startswith("detr."):
                out.state[key[len("detr."):]] = value
                out.origin[key[len("detr."):]] = key
            else:
                out.drop("segmentation head (this package predicts boxes only)", key)
    else:
        out = SourceWeights("official DETR checkpoint", "detr", dict(raw), {k: k for k in raw})
    _require_layout(path, out.state, "detr")
    _drop_counters(out)
    out.declared = _declared_from_args(args, deformable=False)
    _official_class_names(out, int(out.state["class_embed.weight"].shape[0]) - 1, args)
    return out


def read_official_deformable(path: Path) -> SourceWeights:
    """fundamentalvision/Deformable-DETR: key for key, minus the decoder's copies of the heads
    (``transformer.decoder.class_embed.*`` / ``bbox_embed.*``: the same modules as ``class_embed.*`` /
    ``bbox_embed.*``, registered a second time so the decoder can call them)."""
    raw, args = _official_payload(path)
    _require_layout(path, raw, "deformable_detr")
    if "class_embed.0.weight" not in raw:
        raise CheckpointError(f"{path}: no class head class_embed.0; is it a complete Deformable DETR checkpoint?")
    out = SourceWeights("official Deformable DETR checkpoint", "deformable_detr", {}, {})
    for key, value in raw.items():
        for head in ("class_embed", "bbox_embed"):
            prefix = f"transformer.decoder.{head}."
            if key.startswith(prefix):
                top = key[len("transformer.decoder."):]
                if top in raw and not torch.equal(raw[top], value):
                    raise CheckpointError(f"{path}: {key} differs from {top}; the official model uses one module "
                                          "for both, so the checkpoint is inconsistent")
                out.drop(f"decoder copies of the {head} heads (the same modules as {head}.*)", key)
                break
        else:
            out.state[key] = value
            out.origin[key] = key
    _drop_counters(out)
    out.declared = _declared_from_args(args, deformable=True)
    if "with_box_refine" not in out.declared.get("deformable", {}):
        # The official model registers the decoder's box heads only with box refinement.
        refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in raw)
        out.declared.setdefault("deformable", {})["with_box_refine"] = refine
    _official_class_names(out, int(out.state["class_embed.0.weight"].shape[0]), args)
    return out


def _drop_counters(out: SourceWeights) -> None:
    for key in [k for k in out.state if k.endswith("num_batches_tracked")]:
        del out.state[key]
        del out.origin[key]
        out.drop("BatchNorm step counters (the backbone's BatchNorm is frozen)", key)


def _official_class_names(out: SourceWeights, num_classes: int, args: Mapping[str, Any]) -> None:
    if num_classes == len(COCO_91_CLASSES):
        out.class_names = unique_class_names(list(COCO_91_CLASSES))
        out.label_source = "COCO's 91 category-id slots (the official models' classes)"
        return
    out.class_names = [f"class_{i}" for i in range(num_classes)]
    dataset = args.get("dataset_file", "unknown")
    out.label_source = f"generic names: {num_classes} classes (dataset_file={dataset!r}), names not stored"
    out.notes.append(f"the checkpoint has {num_classes} classes, not COCO's 91, and does not store their names; "
                     "pass --labels/--classes (or label_map=) to name them")


def _declared_from_args(args: Mapping[str, Any], *, deformable: bool) -> dict[str, Any]:
    """ModelConfig values from the official argparse args (only those present)."""
    declared: dict[str, Any] = {}
    simple = {"hidden_dim": "hidden_dim", "nheads": "nheads", "enc_layers": "enc_layers",
              "dec_layers": "dec_layers", "dim_feedforward": "dim_feedforward", "dropout": "dropout",
              "num_queries": "num_queries", "aux_loss": "aux_loss"}
    if not deformable:
        simple["pre_norm"] = "pre_norm"
    for ours, theirs in simple.items():
        if theirs in args and args[theirs] is not None:
            declared[ours] = args[theirs]
    if "position_embedding" in args:
        declared["position_encoding"] = {"v2": "sine", "sine": "sine", "v3": "learned",
                                         "learned": "learned"}.get(args["position_embedding"],
                                                                   args["position_embedding"])
    backbone: dict[str, Any] = {}
    if "backbone" in args:
        backbone["name"] = args["backbone"]
    if "dilation" in args:
        backbone["dilation"] = bool(args["dilation"])
    if args.get("lr_backbone", 1) == 0:
        backbone["trainable_layers"] = 0
    if backbone:
        declared["backbone"] = backbone
    matcher = {ours: args[theirs] for ours, theirs in
               (("cost_class", "set_cost_class"), ("cost_bbox", "set_cost_bbox"), ("cost_giou", "set_cost_giou"))
               if theirs in args}
    loss = {ours: args[theirs] for ours, theirs in
            (("bbox_loss_coef", "bbox_loss_coef"), ("giou_loss_coef", "giou_loss_coef"),
             ("eos_coef", "eos_coef"), ("class_loss_coef", "cls_loss_coef"), ("focal_alpha", "focal_alpha"))
            if theirs in args}
    if matcher:
        declared["matcher"] = matcher
    if loss:
        declared["loss"] = loss
    if deformable:
        d = {ours: args[theirs] for ours, theirs in
             (("n_levels", "num_feature_levels"), ("with_box_refine", "with_box_refine"), ("two_stage", "two_stage"))
             if theirs in args}
        enc_points, dec_points = args.get("enc_n_points"), args.get("dec_n_points")
        if enc_points is not None and dec_points is not None and enc_points != dec_points:
            raise CheckpointError(f"args enc_n_points={enc_points} and dec_n_points={dec_points} differ; this "
                                  "package uses one number of sampling points for encoder and decoder")
        if enc_points is not None:
            d["n_points"] = enc_points
        if d.get("two_stage") and "num_queries" in args:
            d["two_stage_num_proposals"] = args["num_queries"]
        declared["deformable"] = d
        scale = args.get("position_embedding_scale", 2 * math.pi)
        if not math.isclose(float(scale), 2 * math.pi):
            raise CheckpointError(f"args position_embedding_scale={scale}: only 2*pi (the default) is supported")
    return declared
