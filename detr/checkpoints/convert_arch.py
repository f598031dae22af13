"""The model config a converted checkpoint needs, read from its tensors and what its source declares.

Tensor shapes decide whatever they can (backbone depth, width, depths, queries, levels, points,
two-stage, pre-norm, learned position encoding); the source's args / config supply what they cannot
(heads, dilation, dropout, loss weights) and must agree with the shapes where both speak. The state
dict here is already in this package's parameter names (``convert_sources`` / ``convert_hf``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torchvision.models.resnet import Bottleneck

from detr.checkpoints.convert_sources import SourceWeights
from detr.config import Config, config_from_dict
from detr.errors import CheckpointError, ConfigError
from detr.models.backbone import RESNET_LAYOUTS

# (blocks per stage of layer1..layer4, bottleneck blocks) -> name, of the ResNets the backbone supports.
_RESNETS = {(tuple(layers), issubclass(block, Bottleneck)): name for name, (block, layers) in RESNET_LAYOUTS.items()}
DEFAULT_NHEADS = 8


def infer_config(src: SourceWeights, where: str) -> Config:
    """The resolved ``Config`` (model section inferred, the rest defaults) for ``src``'s weights."""
    state, declared = src.state, src.declared
    section: dict[str, Any] = {"arch": src.arch}
    check = _Agreement(declared, where)

    backbone = dict(declared.get("backbone", {}))
    backbone["name"] = check("backbone.name", backbone_name(state, where), "backbone.0.body.layer*")
    section["backbone"] = backbone
    section["position_encoding"] = check(
        "position_encoding", "learned" if "backbone.1.row_embed.weight" in state else "sine", "backbone.1.row_embed")
    section["enc_layers"] = check("enc_layers", _count_layers(state, "transformer.encoder.layers."),
                                  "transformer.encoder.layers.*")
    section["dec_layers"] = check("dec_layers", _count_layers(state, "transformer.decoder.layers."),
                                  "transformer.decoder.layers.*")
    if section["dec_layers"] == 0:
        raise CheckpointError(f"{where}: no decoder layers (transformer.decoder.layers.*) found")
    ffn_key = "transformer.decoder.layers.0.linear1.weight"
    section["dim_feedforward"] = check("dim_feedforward", _shape(state, ffn_key, where)[0], ffn_key)

    nheads = declared.get("nheads")
    if nheads is None:
        nheads = DEFAULT_NHEADS
        src.notes.append(f"the number of attention heads is not recorded; assumed {DEFAULT_NHEADS} (the papers')")
    section["nheads"] = nheads

    if src.arch == "detr":
        query_shape = _shape(state, "query_embed.weight", where)
        section["hidden_dim"] = check("hidden_dim", query_shape[1], "query_embed.weight")
        section["num_queries"] = check("num_queries", query_shape[0], "query_embed.weight")
        section["pre_norm"] = check("pre_norm", "transformer.encoder.norm.weight" in state, "transformer.encoder.norm")
    else:
        section.update(_deformable_section(src, check, nheads, where))

    for key in ("dropout", "aux_loss"):
        if key in declared:
            section[key] = declared[key]
    default_costs = {"cost_class": 2.0} if src.arch == "deformable_detr" else {}
    default_loss = {"class_loss_coef": 2.0} if src.arch == "deformable_detr" else {}
    section["matcher"] = {**default_costs, **declared.get("matcher", {})}
    section["loss"] = {**default_loss, **declared.get("loss", {})}
    try:
        return config_from_dict({"model": section}, source=f"{where} (inferred model config)")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _deformable_section(src: SourceWeights, check: _Agreement, nheads: int, where: str) -> dict[str, Any]:
    state, declared = src.state, src.declared.get("deformable", {})
    level_shape = _shape(state, "transformer.level_embed", where)
    out: dict[str, Any] = {"hidden_dim": check("hidden_dim", level_shape[1], "transformer.level_embed")}
    n_levels = check("deformable.n_levels", level_shape[0], "transformer.level_embed")
    two_stage = check("deformable.two_stage", "transformer.enc_output.weight" in state, "transformer.enc_output")

    attn_keys = ["transformer.encoder.layers.0.self_attn.attention_weights.weight",
                 "transformer.decoder.layers.0.cross_attn.attention_weights.weight"]
    points = []
    for key in attn_keys:
        if key in state:
            per_head_level, rest = divmod(int(state[key].shape[0]), nheads * n_levels)
            if rest:
                raise CheckpointError(f"{where}: {key} has {state[key].shape[0]} outputs, not a multiple of "
                                      f"nheads x levels = {nheads} x {n_levels}")
            points.append(per_head_level)
    if len(set(points)) != 1:
        raise CheckpointError(f"{where}: encoder and decoder sample {points} points per head and level; this "
                              "package uses one number for both")
    n_points = check("deformable.n_points", points[0], attn_keys[1])

    if two_stage:
        proposals = declared.get("two_stage_num_proposals") or src.declared.get("num_queries")
        if proposals is None:
            raise CheckpointError(f"{where}: a two-stage model whose number of proposals is not recorded "
                                  "(args.num_queries / config two_stage_num_proposals)")
        out["num_queries"] = proposals
    else:
        query_shape = _shape(state, "query_embed.weight", where)
        out["num_queries"] = check("num_queries", query_shape[0], "query_embed.weight")

    num_pred = _count_layers(state, "transformer.decoder.layers.") + (1 if two_stage else 0)
    refine = declared.get("with_box_refine")
    if refine is None:
        refine = _heads_differ(state, "bbox_embed", num_pred)
    out["deformable"] = {"n_levels": n_levels, "n_points": n_points, "with_box_refine": bool(refine),
                         "two_stage": two_stage}
    return out


def backbone_name(state: Mapping[str, torch.Tensor], where: str) -> str:
    """resnet10/18/34/50/101 from the blocks under ``backbone.0.body.layer1..4``."""
    blocks = []
    for stage in range(1, 5):
        prefix = f"backbone.0.body.layer{stage}."
        blocks.append(len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)}))
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state
    name = _RESNETS.get((tuple(blocks), bottleneck))
    if name is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise CheckpointError(
            f"{where}: the backbone has {blocks} {kind} blocks in layer1..layer4, which is none of the supported "
            "ResNets (" + ", ".join(f"{name} {list(layers)} {'bottleneck' if bottleneck else 'basic'}"
                                    for (layers, bottleneck), name in _RESNETS.items()) + ")"
        )
    return name


def _count_layers(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _heads_differ(state: Mapping[str, torch.Tensor], head: str, num_pred: int) -> bool:
    first = {k[len(f"{head}.0."):]: v for k, v in state.items() if k.startswith(f"{head}.0.")}
    return any(not torch.equal(state.get(f"{head}.{i}.{name}", v), v) for i in range(1, num_pred)
               for name, v in first.items())


def _shape(state: Mapping[str, torch.Tensor], key: str, where: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{where}: tensor {key} not found; is the --source right?")
    return tuple(state[key].shape)


class _Agreement:
    """Checks a value read from the tensors against the source's declared value (``a.b`` paths)."""

    def __init__(self, declared: Mapping[str, Any], where: str) -> None:
        self.declared = declared
        self.where = where

    def __call__(self, path: str, value: Any, key: str) -> Any:
        node: Any = self.declared
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return value
            node = node[part]
        if node is not None and node != value:
            raise CheckpointError(f"{self.where}: {key} says {path} = {value!r} but the checkpoint's "
                                  f"args/config say {node!r}")
        return value
