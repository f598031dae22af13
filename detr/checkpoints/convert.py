"""``detr.convert_checkpoint``: official DETR / Deformable-DETR and Hugging Face checkpoints in, one
of this package's checkpoints out (model weights, resolved config, label map; no training state, so
``detr.load_model`` reads it and training can start from it).

Steps: read and rename the source (``convert_sources`` / ``convert_hf``), infer the architecture
(``convert_arch``), build that model, check every tensor against it (a missing, unknown or
wrongly-shaped tensor is a ``CheckpointError`` naming it), optionally move to another label map, save.

With a different label map every weight is kept except the class heads (``class_embed``: DETR's one
head, or Deformable DETR's head of every decoder layer and the two-stage encoder head), which start
from the model's own initialisation (Deformable DETR: the focal-loss bias prior); a class whose name
is in both maps keeps its row. DETR's "no object" row and the two-stage encoder head's class-agnostic
objectness row (index 0: the encoder is trained with every box labelled 0) are kept as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from detr.checkpoints.convert_arch import infer_config
from detr.checkpoints.convert_hf import read_hf
from detr.checkpoints.convert_sources import SourceWeights, read_official_deformable, read_official_detr
from detr.checkpoints.format import save_checkpoint
from detr.data.labelmap import LabelMap
from detr.errors import CheckpointError, InvalidInputError
from detr.models.build import build_model

SOURCES = ("detr", "deformable_detr", "hf")
_CLASS_HEAD = re.compile(r"^class_embed(?:\.(\d+))?\.(weight|bias)$")
_INIT_SEED = 0  # re-initialised class heads are the same on every run


@dataclass
class ConversionReport:
    """What a conversion did; ``str()`` is the text ``detr convert`` prints."""

    source: str
    src_path: Path
    out_path: Path
    architecture: str
    label_map: LabelMap
    label_source: str
    source_classes: int
    kept: int = 0
    reset_heads: list[str] = field(default_factory=list)
    copied_classes: list[tuple[str, int, int]] = field(default_factory=list)  # (name, old id, new id)
    new_classes: list[str] = field(default_factory=list)
    kept_rows: list[str] = field(default_factory=list)  # rows kept besides name matches
    dropped: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {self.source}: {self.src_path}", f"  wrote          {self.out_path}",
                 f"  architecture   {self.architecture}"]
        if self.reset_heads:
            lines.append(f"  label map      {len(self.label_map)} classes (given); the checkpoint had "
                         f"{self.source_classes} ({self.label_source})")
        else:
            lines.append(f"  label map      {len(self.label_map)} classes from {self.label_source}")
        lines.append(f"  weights kept   {self.kept} tensors"
                     + (" (everything but the re-initialised class heads)" if self.reset_heads else " (all)"))
        if self.reset_heads:
            lines.append(f"  class heads re-initialised: {', '.join(self.reset_heads)}")
            copied = ", ".join(f"{n} ({old}->{new})" for n, old, new in self.copied_classes) or "none"
            lines.append(f"    rows kept by class name: {copied}")
            if self.kept_rows:
                lines.append(f"    rows kept besides: {', '.join(self.kept_rows)}")
            lines.append(f"    new classes (fresh rows): {', '.join(self.new_classes) or 'none'}")
        for reason, keys in self.dropped.items():
            lines.append(f"  left out       {len(keys)} tensors: {reason} (e.g. {keys[0]})")
        lines.extend(f"  note           {note}" for note in self.notes)
        return "\n".join(lines)


def convert_checkpoint(
    src_path: str | Path,
    source: str = "hf",
    label_map: LabelMap | str | Path | None = None,
    *,
    out: str | Path | None = None,
    hf_config: str | Path | None = None,
) -> Path:
    """Convert a foreign checkpoint; returns the path of the written checkpoint.

    Args:
        src_path: an official ``.pth`` file (source "detr" / "deformable_detr"), or a Hugging Face
            directory (config.json + weights) or weights file (source "hf", with ``hf_config``).
        source: "detr" (facebookresearch/detr), "deformable_detr" (fundamentalvision/Deformable-DETR)
            or "hf" (transformers DetrForObjectDetection / DeformableDetrForObjectDetection).
        label_map: keep the source's classes (None) or move to this map (a LabelMap or a label-map
            JSON path): the class heads are re-initialised, rows of classes in both maps kept.
        out: where to write (default: next to the source, ``<name>-mlflow-detr.pt``).
        hf_config: the config.json of a Hugging Face weights file given without its directory.
    """
    return convert_with_report(src_path, source, label_map, out=out, hf_config=hf_config).out_path


def convert_with_report(
    src_path: str | Path,
    source: str = "hf",
    label_map: LabelMap | str | Path | None = None,
    *,
    out: str | Path | None = None,
    hf_config: str | Path | None = None,
) -> ConversionReport:
    """``convert_checkpoint``, returning the full report (what was kept, reset and left out)."""
    src_path = Path(src_path)
    if source not in SOURCES:
        raise InvalidInputError(f"unknown checkpoint source {source!r}; accepted: {', '.join(SOURCES)}")
    if hf_config is not None and source != "hf":
        raise InvalidInputError("hf_config (--hf-config) only applies to source 'hf'")
    if source == "detr":
        src = read_official_detr(src_path)
    elif source == "deformable_detr":
        src = read_official_deformable(src_path)
    else:
        src = read_hf(src_path, Path(hf_config) if hf_config is not None else None)
    out_path = Path(out) if out is not None else _default_out(src_path)
    if out_path.resolve() == src_path.resolve():
        raise InvalidInputError(f"--out {out_path} is the source checkpoint; choose another path")

    config = infer_config(src, str(src_path))
    source_map = LabelMap(tuple(src.class_names or ()))
    target_map = _resolve_label_map(label_map) if label_map is not None else source_map
    relabel = target_map.names != source_map.names
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_INIT_SEED)
        model = build_model(config.model, len(target_map))
    report = ConversionReport(
        source=src.kind, src_path=src_path, out_path=out_path, architecture=_describe(config),
        label_map=target_map, label_source=src.label_source, source_classes=len(source_map),
        dropped=src.dropped, notes=src.notes,
    )
    state = _check_against_model(src, model, str(src_path), len(source_map))
    if relabel:
        state = _move_class_heads(state, model, source_map, target_map, report)
    _check_shared_tensors(state, model, src, str(src_path))
    model.load_state_dict(state)
    report.kept = sum(1 for key in state if not (relabel and _CLASS_HEAD.match(key)))
    save_checkpoint(out_path, {
        "model": model.state_dict(),
        "config": config.to_dict(),
        "label_map": target_map.to_dict(),
        "converted_from": {"source": source, "path": str(src_path), "kind": src.kind},
    })
    return report


def _default_out(src_path: Path) -> Path:
    if src_path.is_dir():
        return src_path / "mlflow-detr.pt"
    return src_path.with_name(f"{src_path.stem}-mlflow-detr.pt")


def _resolve_label_map(label_map: LabelMap | str | Path) -> LabelMap:
    if isinstance(label_map, LabelMap):
        return label_map
    if isinstance(label_map, (str, Path)):
        return LabelMap.load(label_map)
    raise InvalidInputError(f"label_map must be a LabelMap or a label-map JSON path, got {type(label_map).__name__}")


def _check_against_model(src: SourceWeights, model: torch.nn.Module, where: str,
                         source_classes: int) -> dict[str, torch.Tensor]:
    """The source tensors, once every key and shape is known to fit the inferred model (class heads
    are checked against the source's own number of classes)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in src.state]
    unexpected = [f"{src.origin[k]} (as {k})" for k in src.state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors the model needs are missing, e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors fit no parameter, e.g. {unexpected[:4]}")
        raise CheckpointError(f"{where}: the weights do not match the inferred {type(model).__name__}: "
                              + "; ".join(parts))
    for key, want in expected.items():
        got = src.state[key]
        shape = tuple(want.shape)
        if _CLASS_HEAD.match(key):
            rows = source_classes + (1 if model.class_activation == "softmax" else 0)
            shape = (rows, *shape[1:])
        if tuple(got.shape) != shape:
            named = key if src.origin[key] == key else f"{src.origin[key]} (as {key})"
            raise CheckpointError(f"{where}: tensor {named} has shape {tuple(got.shape)}, the inferred model "
                                  f"needs {shape}")
        if not got.is_floating_point() and want.is_floating_point():
            raise CheckpointError(f"{where}: tensor {src.origin[key]} has dtype {got.dtype}, expected floating point")
    return dict(src.state)


def _move_class_heads(state: dict[str, torch.Tensor], model: torch.nn.Module, old: LabelMap, new: LabelMap,
                      report: ConversionReport) -> dict[str, torch.Tensor]:
    """Replace every class head by the model's fresh one, keeping rows of classes in both maps."""
    fresh = model.state_dict()
    softmax = model.class_activation == "softmax"
    encoder_head = model.transformer.decoder.num_layers if getattr(model, "two_stage", False) else None
    shared = not getattr(model, "with_box_refine", True)  # one module behind every index
    pairs = [(name, old.id_of(name), j) for j, name in enumerate(new.names) if name in old]
    report.copied_classes = pairs
    report.new_classes = [name for name in new.names if name not in old]
    out = dict(state)
    heads = sorted({m.group(1) for k in fresh if (m := _CLASS_HEAD.match(k))}, key=lambda i: int(i or 0))
    for index in heads:
        prefix = "class_embed" if index is None else f"class_embed.{index}"
        report.reset_heads.append(prefix)
        for param in ("weight", "bias"):
            key = f"{prefix}.{param}"
            head = fresh[key].clone()
            for _, i, j in pairs:
                head[j] = state[key][i]
            if softmax:  # the "no object" logit is the last row of both heads
                head[-1] = state[key][-1]
            if encoder_head is not None and not shared and index == str(encoder_head):
                head[0] = state[key][0]  # objectness: the encoder head is trained class-agnostically
            out[key] = head
    if softmax:
        report.kept_rows.append("no-object")
    if encoder_head is not None and not shared:
        report.kept_rows.append(f"class_embed.{encoder_head} row 0 (two-stage proposal objectness)")
    return out


def _check_shared_tensors(state: dict[str, torch.Tensor], model: torch.nn.Module, src: SourceWeights,
                          where: str) -> None:
    """Names that are one tensor in the model (Deformable DETR's heads without box refinement) must
    hold equal values in the source, or loading would silently keep only one of them."""
    groups: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(key)
    for keys in groups.values():
        first = keys[0]
        for other in keys[1:]:
            if not torch.equal(state[first], state[other]):
                raise CheckpointError(
                    f"{where}: {src.origin.get(other, other)} differs from {src.origin.get(first, first)}, but "
                    "without box refinement the model has one head for every decoder layer (is it a "
                    "with_box_refine checkpoint whose args/config say otherwise?)"
                )


def _describe(config) -> str:
    mc = config.model
    parts = [mc.arch, mc.backbone.name + (" DC5" if mc.backbone.dilation else ""), f"hidden {mc.hidden_dim}",
             f"{mc.nheads} heads", f"{mc.enc_layers}+{mc.dec_layers} layers", f"ffn {mc.dim_feedforward}",
             f"{mc.num_queries} queries", f"{mc.position_encoding} positions"]
    if mc.arch == "detr":
        parts.append("pre-norm" if mc.pre_norm else "post-norm")
    else:
        d = mc.deformable
        parts.append(f"{d.n_levels} levels x {d.n_points} points")
        if d.with_box_refine:
            parts.append("box refinement")
        if d.two_stage:
            parts.append("two-stage")
    return ", ".join(parts)


__all__ = ["ConversionReport", "SOURCES", "convert_checkpoint", "convert_with_report"]
