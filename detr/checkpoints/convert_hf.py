"""Reading Hugging Face transformers ``DetrForObjectDetection`` / ``DeformableDetrForObjectDetection``
checkpoints into this package's parameter names.

Input: a directory with ``config.json`` and ``model.safetensors`` / ``pytorch_model.bin`` (or their
sharded ``*.index.json``), or one weights file plus its ``config.json``. transformers itself is not
needed. Both key layouts are read: the one ``save_pretrained`` writes (``backbone.conv_encoder``,
``out_proj``, ``fc1``) and the in-memory one of transformers 5 (``backbone.model``, ``o_proj``,
``mlp.fc1``). The backbone is a timm ResNet (the hub checkpoints; its names are torchvision's) or a
transformers ResNet (``embedder`` / ``encoder.stages``), renamed to torchvision's.

Attention: HF keeps separate q/k/v projections where ``nn.MultiheadAttention`` has one
``in_proj_weight`` [3C, C] (q, k, v stacked in that order); they are concatenated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from detr.checkpoints.convert_sources import SourceWeights, is_state_dict, load_torch_file, unique_class_names
from detr.errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_BACKBONE_PREFIXES = ("model.backbone.conv_encoder.model.", "model.backbone.model.")
_QKV = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn)\.([qkv])_proj\.(weight|bias)$")

# (pattern, replacement) on the normalized HF key, first match wins; q/k/v projections are handled apart.
_COMMON_RULES = [
    (r"^model\.query_position_embeddings\.weight$", "query_embed.weight"),
    (r"^model\.position_embedding\.row_embeddings\.weight$", "backbone.1.row_embed.weight"),
    (r"^model\.position_embedding\.column_embeddings\.weight$", "backbone.1.col_embed.weight"),
]
_DETR_RULES = _COMMON_RULES + [
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.layers\.", "bbox_embed.layers."),
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.encoder.layers.\1.self_attn.out_proj."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.encoder.layers.\1.norm1."),
    (r"^model\.encoder\.layers\.(\d+)\.fc1\.", r"transformer.encoder.layers.\1.linear1."),
    (r"^model\.encoder\.layers\.(\d+)\.fc2\.", r"transformer.encoder.layers.\1.linear2."),
    (r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.encoder.layers.\1.norm2."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.decoder.layers.\1.self_attn.out_proj."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.out_proj\.",
     r"transformer.decoder.layers.\1.multihead_attn.out_proj."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (r"^model\.decoder\.layers\.(\d+)\.fc1\.", r"transformer.decoder.layers.\1.linear1."),
    (r"^model\.decoder\.layers\.(\d+)\.fc2\.", r"transformer.decoder.layers.\1.linear2."),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
]
_MSDA = r"(sampling_offsets|attention_weights|value_proj|output_proj)"
_DEFORMABLE_RULES = _COMMON_RULES + [
    (r"^(class_embed|bbox_embed)\.(\d+)\.", r"\1.\2."),
    (r"^model\.input_proj\.", "input_proj."),
    (r"^model\.(level_embed)$", r"transformer.\1"),
    (r"^model\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.", r"transformer.\1."),
    (rf"^model\.encoder\.layers\.(\d+)\.self_attn\.{_MSDA}\.", r"transformer.encoder.layers.\1.self_attn.\2."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.encoder.layers.\1.norm1."),
    (r"^model\.encoder\.layers\.(\d+)\.fc1\.", r"transformer.encoder.layers.\1.linear1."),
    (r"^model\.encoder\.layers\.(\d+)\.fc2\.", r"transformer.encoder.layers.\1.linear2."),
    (r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.encoder.layers.\1.norm2."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.decoder.layers.\1.self_attn.out_proj."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (rf"^model\.decoder\.layers\.(\d+)\.encoder_attn\.{_MSDA}\.", r"transformer.decoder.layers.\1.cross_attn.\2."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (r"^model\.decoder\.layers\.(\d+)\.fc1\.", r"transformer.decoder.layers.\1.linear1."),
    (r"^model\.decoder\.layers\.(\d+)\.fc2\.", r"transformer.decoder.layers.\1.linear2."),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
]


def read_hf(path: Path, config_path: Path | None = None) -> SourceWeights:
    """A Hugging Face DETR / Deformable DETR checkpoint (directory or weights file + config)."""
    weights_path, config_file = _locate(path, config_path)
    config = _read_config(config_file)
    model_type = config.get("model_type")
    if model_type not in ("detr", "deformable_detr"):
        raise CheckpointError(f"{config_file}: model_type {model_type!r} is not supported; accepted: 'detr' "
                              "(DetrForObjectDetection), 'deformable_detr' (DeformableDetrForObjectDetection)")
    kind = "DETR" if model_type == "detr" else "Deformable DETR"
    out = SourceWeights(f"Hugging Face {kind} checkpoint", model_type, {}, {})
    raw = _read_weights(weights_path)
    _check_backbone_config(config, config_file)
    out.declared = _declared_from_config(config, config_file)
    rules = [(re.compile(p), r) for p, r in (_DETR_RULES if model_type == "detr" else _DEFORMABLE_RULES)]
    # (stack, layer, attention) -> (q|k|v, weight|bias) -> (HF key, tensor)
    qkv: dict[tuple[str, str, str], dict[tuple[str, str], tuple[str, torch.Tensor]]] = {}
    decoder_heads: dict[str, tuple[str, torch.Tensor]] = {}
    unexpected = []
    for hf_key, value in raw.items():
        key = _normalize(hf_key)
        if key.endswith("num_batches_tracked"):
            out.drop("BatchNorm step counters (the backbone's BatchNorm is frozen)", hf_key)
        elif key.startswith("BACKBONE."):
            ours = _backbone_key(key[len("BACKBONE."):])
            if ours is None or ours.startswith("fc."):
                unexpected.append(hf_key)
            else:
                _put(out, "backbone.0.body." + ours, value, hf_key)
        elif m := _QKV.match(key):
            stack, layer, attn, which, param = m.groups()
            qkv.setdefault((stack, layer, attn), {})[(which, param)] = (hf_key, value)
        elif m := re.match(r"^model\.decoder\.(class_embed|bbox_embed)\.(\d+\..+)$", key):
            decoder_heads[f"{m.group(1)}.{m.group(2)}"] = (hf_key, value)
        else:
            for pattern, replacement in rules:
                if pattern.match(key):
                    _put(out, pattern.sub(replacement, key), value, hf_key)
                    break
            else:
                unexpected.append(hf_key)
    if unexpected:
        raise CheckpointError(f"{weights_path}: {len(unexpected)} tensors that match no {kind} parameter, e.g. "
                              f"{unexpected[:5]} (is it a {kind} object-detection checkpoint?)")
    _join_qkv(out, qkv, model_type, weights_path)
    if model_type == "deformable_detr":
        _resolve_deformable_heads(out, decoder_heads, config, weights_path)
    head = "class_embed.weight" if model_type == "detr" else "class_embed.0.weight"
    if head not in out.state:
        hf_head = "class_labels_classifier" if model_type == "detr" else "class_embed.0"
        raise CheckpointError(f"{weights_path}: no class head ({hf_head}); only the ...ForObjectDetection models "
                              "can be converted")
    num_classes = int(out.state[head].shape[0]) - (1 if model_type == "detr" else 0)
    _class_names(out, config, config_file, num_classes)
    if model_type == "detr" and config.get("auxiliary_loss"):
        out.notes.append(AUXILIARY_LOSS_NOTE)
    return out


# transformers' DetrDecoder with auxiliary_loss=True writes the LayerNorm'd hidden state back into the stream,
# so each later layer (and the final LayerNorm, applied a second time) sees normalized inputs;
# facebookresearch/detr's TransformerDecoder normalizes only a copy for the auxiliary heads. The converted
# model follows facebookresearch/detr: its outputs equal transformers' with auxiliary_loss=False.
AUXILIARY_LOSS_NOTE = (
    "config.json has auxiliary_loss=true: with it transformers' DetrDecoder feeds each layer's LayerNorm'd "
    "output to the next layer (facebookresearch/detr normalizes only the auxiliary heads' copy), so transformers' "
    "outputs for this checkpoint differ from the official DETR's; the converted model computes the official "
    "DETR, equal to transformers with auxiliary_loss=false on the same weights")


def _locate(path: Path, config_path: Path | None) -> tuple[Path, Path]:
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise CheckpointError(f"{path}: no Hugging Face weights file in the directory; expected one of "
                                  f"{', '.join(WEIGHT_FILES)}")
        weights = found[0]
    elif path.is_file():
        weights = path
    else:
        raise CheckpointError(f"{path}: checkpoint file or directory not found")
    config = config_path or weights.parent / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{config}: the Hugging Face config.json was not found; it says which architecture "
                              "the weights are (pass it with --hf-config / hf_config=)")
    return weights, config


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object (a transformers config), got {type(data).__name__}")
    return data


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".index.json"):
        index = _read_config(path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path}: a sharded-checkpoint index needs a 'weight_map' object")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_weights(path.parent / shard))
        return state
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"{path}: weights file not found")
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package "
                                  "(pip install safetensors)") from None
        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    data = load_torch_file(path)
    if not is_state_dict(data):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor) as pytorch_model.bin holds, "
                              f"got {type(data).__name__}")
    return dict(data)


def _normalize(key: str) -> str:
    """One spelling for both transformers key layouts; the backbone gets a ``BACKBONE.`` prefix."""
    for prefix in _BACKBONE_PREFIXES:
        if key.startswith(prefix):
            return "BACKBONE." + key[len(prefix):]
    return key.replace(".o_proj.", ".out_proj.").replace(".mlp.fc1.", ".fc1.").replace(".mlp.fc2.", ".fc2.")


def _backbone_key(key: str) -> str | None:
    """torchvision ResNet name of a backbone tensor (timm's ResNet names already are torchvision's).

    transformers ResNet: ``embedder.embedder`` is conv1/bn1; stage s is ``layer{s+1}``; in block b,
    sub-layer j is ``conv{j+1}``/``bn{j+1}`` and the shortcut is ``downsample.0``/``downsample.1``.
    """
    if not key.startswith(("embedder.", "encoder.")):
        return key
    if m := re.match(r"^embedder\.embedder\.(convolution|normalization)\.(.+)$", key):
        return ("conv1." if m.group(1) == "convolution" else "bn1.") + m.group(2)
    if m := re.match(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\.(.+)$", key):
        stage, block, kind, rest = m.groups()
        return f"layer{int(stage) + 1}.{block}.downsample.{0 if kind == 'convolution' else 1}.{rest}"
    if m := re.match(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.(convolution|normalization)\.(.+)$",
                     key):
        stage, block, sub, kind, rest = m.groups()
        return f"layer{int(stage) + 1}.{block}.{'conv' if kind == 'convolution' else 'bn'}{int(sub) + 1}.{rest}"
    return None


def _put(out: SourceWeights, ours: str, value: torch.Tensor, origin: str) -> None:
    if ours in out.state:
        raise CheckpointError(f"{origin} and {out.origin[ours]} both map to {ours}")
    out.state[ours] = value
    out.origin[ours] = origin


def _join_qkv(out: SourceWeights, qkv: dict, model_type: str, where: Path) -> None:
    """q/k/v projections -> ``in_proj_weight`` [3C, C] / ``in_proj_bias`` [3C] of nn.MultiheadAttention."""
    for (stack, layer, attn), parts in sorted(qkv.items()):
        if model_type == "detr":
            module = "self_attn" if attn == "self_attn" else "multihead_attn"
        elif stack == "decoder" and attn == "self_attn":
            module = "self_attn"
        else:
            names = sorted(hf_key for hf_key, _ in parts.values())
            raise CheckpointError(f"{where}: unexpected q/k/v projections {names[:3]} in a Deformable DETR "
                                  "checkpoint (only the decoder self-attention has them)")
        for param in ("weight", "bias"):
            missing = [w for w in "qkv" if (w, param) not in parts]
            if missing:
                raise CheckpointError(f"{where}: model.{stack}.layers.{layer}.{attn} lacks "
                                      f"{', '.join(f'{w}_proj.{param}' for w in missing)}")
            origins = ", ".join(parts[(w, param)][0] for w in "qkv")
            joined = torch.cat([parts[(w, param)][1] for w in "qkv"], 0)
            _put(out, f"transformer.{stack}.layers.{layer}.{module}.in_proj_{param}", joined, origins)


def _resolve_deformable_heads(out: SourceWeights, decoder_heads: dict[str, tuple[str, torch.Tensor]],
                              config: Mapping[str, Any], where: Path) -> None:
    """Top-level heads for every prediction; the decoder's copies are duplicates or, where
    ``save_pretrained`` stored only one side of a tied pair, the source of the missing ones."""
    num_pred = int(config.get("decoder_layers", 6)) + (1 if config.get("two_stage") else 0)
    for key, (hf_key, value) in decoder_heads.items():
        if key in out.state:
            if not torch.equal(out.state[key], value):
                raise CheckpointError(f"{where}: {hf_key} differs from {out.origin[key]}; the model uses one "
                                      "module for both")
            out.drop("decoder copies of the prediction heads (the same modules as the top-level heads)", hf_key)
    tied = []
    for head in ("class_embed", "bbox_embed"):
        first = sorted(k[len(f"{head}.0."):] for k in {**out.state, **dict(decoder_heads)} if
                       k.startswith(f"{head}.0."))
        for i in range(num_pred):
            for name in first:
                key = f"{head}.{i}.{name}"
                if key in out.state:
                    continue
                if key in decoder_heads:
                    hf_key, value = decoder_heads[key]
                    _put(out, key, value, hf_key)
                elif f"{head}.0.{name}" in out.state:
                    _put(out, key, out.state[f"{head}.0.{name}"], out.origin[f"{head}.0.{name}"])
                    tied.append(f"{head}.{i}")
    if tied:
        heads = sorted(set(tied))
        out.notes.append(f"{', '.join(heads)} not stored (tied to the first head in the transformers model): "
                         "filled from it")


def _check_backbone_config(config: Mapping[str, Any], where: Path) -> None:
    backbone = config.get("backbone_config")
    if isinstance(backbone, Mapping):
        model_type = backbone.get("model_type")
        if model_type == "resnet":
            for flag in ("downsample_in_first_stage", "downsample_in_bottleneck"):
                if backbone.get(flag):
                    raise CheckpointError(f"{where}: backbone_config.{flag} = true has no torchvision ResNet "
                                          "equivalent (torchvision strides in the 3x3 convolution of stages 2-4)")
            if backbone.get("hidden_act", "relu") != "relu":
                raise CheckpointError(f"{where}: backbone_config.hidden_act = {backbone['hidden_act']!r}; only relu")
        elif model_type == "timm_backbone":
            name = str(backbone.get("backbone", ""))
            if not name.startswith("resnet"):
                raise CheckpointError(f"{where}: timm backbone {name!r} is not supported; accepted: resnet18/34/50/101")
        else:
            raise CheckpointError(f"{where}: backbone_config.model_type {model_type!r} is not supported; "
                                  "accepted: a ResNet ('resnet' or a timm resnet)")
    elif config.get("use_timm_backbone", True) and not str(config.get("backbone") or "resnet50").startswith("resnet"):
        raise CheckpointError(f"{where}: backbone {config.get('backbone')!r} is not supported; "
                              "accepted: resnet18/34/50/101")


def _declared_from_config(config: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """ModelConfig values from a transformers config.json (present keys only)."""
    for ours, (a, b) in {"nheads": ("encoder_attention_heads", "decoder_attention_heads"),
                         "dim_feedforward": ("encoder_ffn_dim", "decoder_ffn_dim")}.items():
        if a in config and b in config and config[a] != config[b]:
            raise CheckpointError(f"{where}: {a} = {config[a]} and {b} = {config[b]} differ; this package uses one "
                                  f"{ours} for encoder and decoder")
    if config.get("activation_function", "relu") != "relu":
        raise CheckpointError(f"{where}: activation_function = {config['activation_function']!r}; only relu")
    declared: dict[str, Any] = {}
    for ours, theirs in (("hidden_dim", "d_model"), ("nheads", "encoder_attention_heads"),
                         ("enc_layers", "encoder_layers"), ("dec_layers", "decoder_layers"),
                         ("dim_feedforward", "encoder_ffn_dim"), ("dropout", "dropout"),
                         ("position_encoding", "position_embedding_type")):
        if theirs in config:
            declared[ours] = config[theirs]
    if "dilation" in config:
        declared["backbone"] = {"dilation": bool(config["dilation"])}
    declared["matcher"] = {ours: config[theirs] for ours, theirs in
                           (("cost_class", "class_cost"), ("cost_bbox", "bbox_cost"), ("cost_giou", "giou_cost"))
                           if theirs in config}
    declared["loss"] = {ours: config[theirs] for ours, theirs in
                        (("bbox_loss_coef", "bbox_loss_coefficient"), ("giou_loss_coef", "giou_loss_coefficient"),
                         ("eos_coef", "eos_coefficient"), ("focal_alpha", "focal_alpha")) if theirs in config}
    if config.get("model_type") == "deformable_detr":
        if config.get("encoder_n_points", 4) != config.get("decoder_n_points", 4):
            raise CheckpointError(f"{where}: encoder_n_points and decoder_n_points differ; this package uses one "
                                  "number of sampling points for both")
        two_stage = bool(config.get("two_stage", False))
        d = {"n_levels": config.get("num_feature_levels", 4), "n_points": config.get("encoder_n_points", 4),
             "with_box_refine": bool(config.get("with_box_refine", False)), "two_stage": two_stage}
        if two_stage:
            d["two_stage_num_proposals"] = config.get("two_stage_num_proposals", 300)
        else:
            declared["num_queries"] = config.get("num_queries", 300)
        declared["deformable"] = d
    elif "num_queries" in config:
        declared["num_queries"] = config["num_queries"]
    return declared


def _class_names(out: SourceWeights, config: Mapping[str, Any], where: Path, num_classes: int) -> None:
    id2label = config.get("id2label")
    if not isinstance(id2label, Mapping) or not id2label:
        out.class_names = [f"class_{i}" for i in range(num_classes)]
        out.label_source = f"generic names ({where} has no id2label)"
        return
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except ValueError:
        raise CheckpointError(f"{where}: id2label keys must be integer class ids, got {sorted(id2label)[:5]}") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise CheckpointError(f"{where}: id2label ids must be 0..{len(by_id) - 1} without gaps, got "
                              f"{sorted(by_id)[:10]}...")
    if len(by_id) != num_classes:
        raise CheckpointError(f"{where}: id2label has {len(by_id)} classes but the class head predicts "
                              f"{num_classes}")
    out.class_names = unique_class_names([by_id[i] for i in range(len(by_id))])
    out.label_source = f"id2label of {where}"
