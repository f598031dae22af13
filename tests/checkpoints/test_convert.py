"""Checkpoint converters: Hugging Face, official DETR and official Deformable-DETR checkpoints give a
model whose outputs equal the original's; other label maps keep every weight but the class heads.

Hugging Face models are built offline with random weights (transformers ResNet backbone, nothing
downloaded) and compared output for output. The official layouts are written by renaming our state
dict into the key layout of the official repositories, enumerated here from their module structure
(facebookresearch/detr models/{detr,transformer,backbone}.py, fundamentalvision/Deformable-DETR
models/{deformable_detr,deformable_transformer}.py), and saved with an argparse.Namespace ``args``
as the released files are.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

import detr
from detr.checkpoints.convert import convert_checkpoint, convert_with_report
from detr.checkpoints.convert_sources import COCO_91_CLASSES
from detr.checkpoints.format import load_checkpoint, save_checkpoint
from detr.checkpoints.load import load_model
from detr.cli import main
from detr.data.labelmap import LabelMap
from detr.errors import CheckpointError, InvalidInputError
from detr.models.build import build_model
from tests.models.conftest import tiny_model_config

H, W = 64, 96
ATOL = 1e-4


def _images(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized-looking images and the padding mask (True = padding): image 1 is 48x72."""
    images = torch.randn(batch, 3, H, W, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(batch, H, W, dtype=torch.bool)
    mask[-1, :, 72:] = True
    mask[-1, 48:, :] = True
    return images, mask


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Move every float tensor away from its initialisation (LayerNorms at 1/0, zero-initialised
    attention weights...), so that a swapped or dropped tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                scale = max(float(t.std()) if t.numel() > 1 else 0.0, 0.1)
                t.add_(torch.randn(t.shape, generator=g) * 0.1 * scale)


def _outputs(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor) -> dict:
    with torch.no_grad():
        return model.eval()(images, mask)


def _assert_same_outputs(ours: dict, theirs_logits: torch.Tensor, theirs_boxes: torch.Tensor) -> None:
    torch.testing.assert_close(ours["pred_logits"], theirs_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours["pred_boxes"], theirs_boxes, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------

HF_ID2LABEL = {0: "cat", 1: "dog", 2: "bird"}
HF_VARIANTS = {
    "detr": {},
    "deformable_single_scale": {"num_feature_levels": 1},
    "deformable_multi_scale": {"num_feature_levels": 4},
    "deformable_refine": {"num_feature_levels": 4, "with_box_refine": True},
    "deformable_two_stage": {"num_feature_levels": 4, "with_box_refine": True, "two_stage": True,
                             "two_stage_num_proposals": 10},
}


def _hf_model(variant: str):
    transformers = pytest.importorskip("transformers")
    levels = HF_VARIANTS[variant].get("num_feature_levels", 1)
    backbone = transformers.ResNetConfig(
        depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
        out_features=["stage4"] if levels == 1 else ["stage2", "stage3", "stage4"],
    )
    common = dict(backbone_config=backbone, use_timm_backbone=False, d_model=64, encoder_layers=2,
                  decoder_layers=2, encoder_ffn_dim=96, decoder_ffn_dim=96, encoder_attention_heads=4,
                  decoder_attention_heads=4, num_queries=5, id2label=HF_ID2LABEL, dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # transformers initialises from the global RNG
        if variant == "detr":
            model = transformers.DetrForObjectDetection(transformers.DetrConfig(**common))
        else:
            config = transformers.DeformableDetrConfig(encoder_n_points=2, decoder_n_points=2, **common,
                                                       **HF_VARIANTS[variant])
            model = transformers.DeformableDetrForObjectDetection(config)
    _randomize(model, seed=1)
    return model


@pytest.fixture(scope="module", params=sorted(HF_VARIANTS))
def hf_saved(request, tmp_path_factory) -> tuple[str, Path, dict]:
    """(variant, save_pretrained directory, HF outputs of the model read back from it)."""
    variant = request.param
    directory = tmp_path_factory.mktemp(f"hf_{variant}")
    model = _hf_model(variant)
    model.save_pretrained(directory)
    reloaded = type(model).from_pretrained(directory).eval()  # what transformers reads from the files
    images, mask = _images()
    with torch.no_grad():
        out = reloaded(pixel_values=images, pixel_mask=(~mask).long())
    selects_invalid = False  # did a padding / border position make the two-stage top-k?
    if getattr(out, "enc_outputs_class", None) is not None:
        top = torch.topk(out.enc_outputs_class[..., 0], reloaded.config.two_stage_num_proposals, dim=1)[1]
        chosen = torch.gather(out.enc_outputs_coord_logits, 1, top[..., None].expand(-1, -1, 4))
        selects_invalid = bool(torch.isinf(chosen).any())
    return variant, directory, {"logits": out.logits, "boxes": out.pred_boxes, "selects_invalid": selects_invalid}


def test_hf_outputs_match(hf_saved, tmp_path):
    variant, directory, hf_out = hf_saved
    report = convert_with_report(directory, "hf", out=tmp_path / "converted.pt")
    model, config, label_map = load_model(report.out_path)
    assert label_map.names == tuple(HF_ID2LABEL.values())
    assert config.model.arch == ("detr" if variant == "detr" else "deformable_detr")
    assert (config.model.hidden_dim, config.model.nheads, config.model.enc_layers, config.model.dec_layers,
            config.model.dim_feedforward) == (64, 4, 2, 2, 96)
    assert config.model.backbone.name == "resnet18"
    if variant != "detr":
        hf = HF_VARIANTS[variant]
        d = config.model.deformable
        assert (d.n_levels, d.n_points, d.with_box_refine, d.two_stage) == (
            hf["num_feature_levels"], 2, hf.get("with_box_refine", False), hf.get("two_stage", False))
        assert config.model.num_queries == hf.get("two_stage_num_proposals", 5)
    if variant == "deformable_two_stage":
        # The seeded weights rank padded positions into the proposals, as the official code may:
        # the case where ranking over every position (not only valid ones) changes the outputs.
        assert hf_out["selects_invalid"]
    _assert_same_outputs(_outputs(model, *_images()), hf_out["logits"], hf_out["boxes"])
    assert "Hugging Face" in str(report) and str(report.out_path) in str(report)


def _hf_detr_saved(tmp_path: Path) -> tuple[Path, dict]:
    pytest.importorskip("transformers")
    directory = tmp_path / "hf_detr"
    model = _hf_model("detr").eval()
    model.save_pretrained(directory)
    images, mask = _images()
    with torch.no_grad():
        out = model(pixel_values=images, pixel_mask=(~mask).long())
    return directory, {"logits": out.logits, "boxes": out.pred_boxes, "model": model}


def test_hf_in_memory_layout_and_state_dict_file(tmp_path):
    """transformers 5's own names (o_proj, mlp.fc1, backbone.model) in a pytorch_model.bin given with
    --hf-config read the same as the save_pretrained layout."""
    directory, hf_out = _hf_detr_saved(tmp_path)
    state = hf_out["model"].state_dict()
    assert any(".o_proj." in k for k in state) and any(".mlp.fc1." in k for k in state)
    weights = tmp_path / "pytorch_model.bin"
    torch.save(state, weights)
    out = convert_checkpoint(weights, "hf", hf_config=directory / "config.json", out=tmp_path / "a.pt")
    _assert_same_outputs(_outputs(load_model(out)[0], *_images()), hf_out["logits"], hf_out["boxes"])


def test_hf_timm_backbone_layout(tmp_path):
    """Hub DETR checkpoints use a timm ResNet, whose parameter names are torchvision's."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    directory, hf_out = _hf_detr_saved(tmp_path)
    converted, _, _ = load_model(convert_checkpoint(directory, "hf", out=tmp_path / "ref.pt"))
    tensors = safetensors_torch.load_file(directory / "model.safetensors")
    tensors = {k: v for k, v in tensors.items() if not k.startswith("model.backbone.")}
    for name, value in converted.backbone[0].body.state_dict().items():
        tensors[f"model.backbone.conv_encoder.model.{name}"] = value.clone()
    timm_dir = tmp_path / "timm"
    timm_dir.mkdir()
    safetensors_torch.save_file(tensors, timm_dir / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    config.pop("backbone_config")
    config.update(use_timm_backbone=True, backbone="resnet18")
    (timm_dir / "config.json").write_text(json.dumps(config))
    model, _, _ = load_model(convert_checkpoint(timm_dir, "hf", out=tmp_path / "timm.pt"))
    _assert_same_outputs(_outputs(model, *_images()), hf_out["logits"], hf_out["boxes"])


def test_hf_auxiliary_loss_converts_to_the_official_decoder(tmp_path):
    """transformers' DetrDecoder with auxiliary_loss=True feeds the LayerNorm'd state to the next layer,
    unlike facebookresearch/detr. The same weights with auxiliary_loss=False run the official decoder
    (norm only on the heads' copy), so that is the reference for the final and every auxiliary output."""
    transformers = pytest.importorskip("transformers")
    model = _hf_model("detr").eval()
    model.config.auxiliary_loss = True
    directory = tmp_path / "hf_aux"
    model.save_pretrained(directory)
    assert json.loads((directory / "config.json").read_text())["auxiliary_loss"] is True
    images, mask = _images()
    official = transformers.DetrForObjectDetection.from_pretrained(directory, auxiliary_loss=False).eval()
    deviating = transformers.DetrForObjectDetection.from_pretrained(directory).eval()
    assert deviating.config.auxiliary_loss and not official.config.auxiliary_loss
    with torch.no_grad():
        ref = official(pixel_values=images, pixel_mask=(~mask).long(), output_hidden_states=True)
        dev = deviating(pixel_values=images, pixel_mask=(~mask).long())
        # Official auxiliary heads: the shared LayerNorm on each earlier layer's (unnormalized) output.
        layer_outputs = ref.decoder_hidden_states[1:-1]  # [B, Q, C] after decoder layers 1..L-1
        normed = [official.model.decoder.layernorm(h) for h in layer_outputs]
        aux_ref = [(official.class_labels_classifier(h), official.bbox_predictor(h).sigmoid()) for h in normed]
    report = convert_with_report(directory, "hf", out=tmp_path / "converted.pt")
    assert any("auxiliary_loss=true" in note for note in report.notes)
    ours = _outputs(load_model(report.out_path)[0], images, mask)
    _assert_same_outputs(ours, ref.logits, ref.pred_boxes)
    assert len(ours["aux_outputs"]) == len(aux_ref) == 1
    for aux, (logits, boxes) in zip(ours["aux_outputs"], aux_ref):
        _assert_same_outputs(aux, logits, boxes)
    # The departure itself: if transformers ever follows the official decoder, this note can go.
    assert (dev.logits - ref.logits).abs().max() > 10 * ATOL


def test_hf_without_auxiliary_loss_has_no_note(tmp_path):
    directory, _ = _hf_detr_saved(tmp_path)
    report = convert_with_report(directory, "hf", out=tmp_path / "converted.pt")
    assert not any("auxiliary_loss" in note for note in report.notes)


def test_hf_errors(tmp_path):
    directory, _ = _hf_detr_saved(tmp_path)
    (directory / "config.json").rename(tmp_path / "elsewhere.json")
    with pytest.raises(CheckpointError, match="config.json"):
        convert_checkpoint(directory, "hf", out=tmp_path / "x.pt")
    config = json.loads((tmp_path / "elsewhere.json").read_text())
    config["model_type"] = "yolos"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type 'yolos'"):
        convert_checkpoint(directory, "hf", out=tmp_path / "x.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        convert_checkpoint(empty, "hf", out=tmp_path / "x.pt")


# ---------------------------------------------------------------------------------------------
# The official layouts, enumerated from the official modules
# ---------------------------------------------------------------------------------------------

_BN = ("weight", "bias", "running_mean", "running_var")  # official FrozenBatchNorm2d buffers
_WB = ("weight", "bias")
_MHA = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")  # nn.MultiheadAttention
_MSDA = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")  # official MSDeformAttn


def _resnet18_keys() -> set[str]:
    body = "backbone.0.body."
    keys = {body + "conv1.weight"} | {body + f"bn1.{b}" for b in _BN}
    for stage in range(1, 5):
        for block in range(2):
            prefix = f"{body}layer{stage}.{block}."
            keys |= {prefix + "conv1.weight", prefix + "conv2.weight"}
            keys |= {prefix + f"bn{i}.{b}" for i in (1, 2) for b in _BN}
            if block == 0 and stage > 1:
                keys |= {prefix + "downsample.0.weight"} | {prefix + f"downsample.1.{b}" for b in _BN}
    return keys


def _mlp_keys(prefix: str) -> set[str]:
    return {f"{prefix}.layers.{i}.{p}" for i in range(3) for p in _WB}


def _official_detr_keys(enc: int, dec: int) -> set[str]:
    """facebookresearch/detr DETR (post-norm, sine positions) with a ResNet-18 body."""
    keys = _resnet18_keys() | {"query_embed.weight"} | _mlp_keys("bbox_embed")
    keys |= {f"class_embed.{p}" for p in _WB} | {f"input_proj.{p}" for p in _WB}
    keys |= {f"transformer.decoder.norm.{p}" for p in _WB}
    for i in range(enc):
        layer = f"transformer.encoder.layers.{i}."
        keys |= {layer + f"self_attn.{p}" for p in _MHA}
        keys |= {layer + f"{m}.{p}" for m in ("linear1", "linear2", "norm1", "norm2") for p in _WB}
    for i in range(dec):
        layer = f"transformer.decoder.layers.{i}."
        keys |= {layer + f"{a}.{p}" for a in ("self_attn", "multihead_attn") for p in _MHA}
        keys |= {layer + f"{m}.{p}" for m in ("linear1", "linear2", "norm1", "norm2", "norm3") for p in _WB}
    return keys


def _official_deformable_keys(enc: int, dec: int, levels: int, refine: bool, two_stage: bool) -> set[str]:
    """fundamentalvision/Deformable-DETR with a ResNet-18 body (decoder head copies included)."""
    keys = _resnet18_keys() | {"transformer.level_embed"}
    num_pred = dec + 1 if two_stage else dec
    for j in range(num_pred):
        keys |= {f"class_embed.{j}.{p}" for p in _WB} | _mlp_keys(f"bbox_embed.{j}")
        if refine:
            keys |= _mlp_keys(f"transformer.decoder.bbox_embed.{j}")
        if two_stage:
            keys |= {f"transformer.decoder.class_embed.{j}.{p}" for p in _WB}
    for level in range(levels):
        keys |= {f"input_proj.{level}.{m}.{p}" for m in (0, 1) for p in _WB}
    if two_stage:
        keys |= {f"transformer.{m}.{p}" for m in ("enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm")
                 for p in _WB}
    else:
        keys |= {"query_embed.weight"} | {f"transformer.reference_points.{p}" for p in _WB}
    for i in range(enc):
        layer = f"transformer.encoder.layers.{i}."
        keys |= {layer + f"self_attn.{m}.{p}" for m in _MSDA for p in _WB}
        keys |= {layer + f"{m}.{p}" for m in ("norm1", "linear1", "linear2", "norm2") for p in _WB}
    for i in range(dec):
        layer = f"transformer.decoder.layers.{i}."
        keys |= {layer + f"cross_attn.{m}.{p}" for m in _MSDA for p in _WB}
        keys |= {layer + f"self_attn.{p}" for p in _MHA}
        keys |= {layer + f"{m}.{p}" for m in ("norm1", "norm2", "linear1", "linear2", "norm3") for p in _WB}
    return keys


def _official_args(config, deformable: bool) -> argparse.Namespace:
    mc = config.model if hasattr(config, "model") else config
    args = dict(lr=1e-4, lr_backbone=1e-5, batch_size=2, weight_decay=1e-4, epochs=300, lr_drop=200,
                clip_max_norm=0.1, frozen_weights=None, backbone=mc.backbone.name, dilation=False,
                position_embedding="sine", enc_layers=mc.enc_layers, dec_layers=mc.dec_layers,
                dim_feedforward=mc.dim_feedforward, hidden_dim=mc.hidden_dim, dropout=mc.dropout, nheads=mc.nheads,
                num_queries=mc.num_queries, masks=False, aux_loss=True, set_cost_class=1, set_cost_bbox=5,
                set_cost_giou=2, bbox_loss_coef=5, giou_loss_coef=2, eos_coef=0.1, dataset_file="coco",
                coco_path="/data/coco", output_dir="", device="cuda", seed=42, resume="", start_epoch=0,
                eval=False, num_workers=2, world_size=8, dist_url="env://")
    if deformable:
        d = mc.deformable
        args.update(lr_backbone_names=["backbone.0"], lr_linear_proj_names=["reference_points", "sampling_offsets"],
                    lr_linear_proj_mult=0.1, sgd=False, with_box_refine=d.with_box_refine, two_stage=d.two_stage,
                    position_embedding_scale=2 * math.pi, num_feature_levels=d.n_levels, dec_n_points=d.n_points,
                    enc_n_points=d.n_points, cls_loss_coef=2, focal_alpha=0.25, set_cost_class=2)
        del args["eos_coef"]
    else:
        args["pre_norm"] = mc.pre_norm
    return argparse.Namespace(**args)


def _fake_official(tmp_path: Path, variant: str, num_classes: int = 91, **changes) -> tuple[Path, torch.nn.Module]:
    """An official-layout checkpoint of a randomized tiny model, and that model."""
    config = tiny_model_config(variant, **changes)
    model = build_model(config, num_classes)
    _randomize(model, seed=2)
    state = model.state_dict()
    deformable = config.arch == "deformable_detr"
    if deformable:
        num_dec = config.dec_layers
        num_pred = num_dec + (1 if config.deformable.two_stage else 0)
        for j in range(num_pred):
            if config.deformable.with_box_refine:
                for k, v in model.bbox_embed[j].state_dict().items():
                    state[f"transformer.decoder.bbox_embed.{j}.{k}"] = v
            if config.deformable.two_stage:
                for k, v in model.class_embed[j].state_dict().items():
                    state[f"transformer.decoder.class_embed.{j}.{k}"] = v
        expected = _official_deformable_keys(config.enc_layers, num_dec, config.deformable.n_levels,
                                             config.deformable.with_box_refine, config.deformable.two_stage)
    else:
        expected = _official_detr_keys(config.enc_layers, config.dec_layers)
    assert set(state) == expected  # our names are the official ones (plus the decoder's head copies)
    path = tmp_path / f"{variant}-official.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 3},
                "epoch": 3, "args": _official_args(config, deformable)}, path)
    return path, model


OFFICIAL_VARIANTS = {
    "detr": "detr",
    "deformable_multi_scale": "deformable_detr",
    "deformable_refine": "deformable_detr",
    "deformable_two_stage": "deformable_detr",
}


@pytest.mark.parametrize("variant", sorted(OFFICIAL_VARIANTS))
def test_official_outputs_match(variant, tmp_path):
    path, original = _fake_official(tmp_path, variant)
    with pytest.raises(Exception, match="(?i)weights.only|Unsupported global"):
        torch.load(path, weights_only=True)  # the pickled argparse.Namespace needs the allow-list
    report = convert_with_report(path, OFFICIAL_VARIANTS[variant], out=tmp_path / "ours.pt")
    model, config, label_map = load_model(report.out_path)
    images, mask = _images()
    expected = _outputs(original, images, mask)
    _assert_same_outputs(_outputs(model, images, mask), expected["pred_logits"], expected["pred_boxes"])
    assert len(label_map) == 91 and label_map.names[1] == "person" and label_map.names[90] == "toothbrush"
    assert label_map.names[0] == "N/A_0" and label_map.names[12] == "N/A_12"
    assert [n for n in COCO_91_CLASSES if n != "N/A"] == [n for n in label_map.names if not n.startswith("N/A_")]
    reference = tiny_model_config(variant)
    assert config.model.model_dump(include={"hidden_dim", "nheads", "enc_layers", "dec_layers", "num_queries",
                                            "dim_feedforward", "deformable"}) == reference.model_dump(
        include={"hidden_dim", "nheads", "enc_layers", "dec_layers", "num_queries", "dim_feedforward",
                 "deformable"})
    stored = load_checkpoint(report.out_path)
    assert not {"optimizer", "scheduler", "ema", "training_state"} & set(stored)
    if variant in ("deformable_refine", "deformable_two_stage"):
        assert "transformer.decoder" in "".join(k for keys in report.dropped.values() for k in keys)
        assert "left out" in str(report)


def test_official_detr_prenorm_learned_positions(tmp_path):
    config = tiny_model_config("detr_prenorm_learned")
    model = build_model(config, 91)
    _randomize(model, seed=4)
    args = _official_args(config, deformable=False)
    args.position_embedding = "learned"
    path = tmp_path / "prenorm.pth"
    torch.save({"model": model.state_dict(), "args": args}, path)
    converted, stored_config, _ = load_model(convert_checkpoint(path, "detr", out=tmp_path / "ours.pt"))
    assert stored_config.model.pre_norm and stored_config.model.position_encoding == "learned"
    expected = _outputs(model, *_images())
    _assert_same_outputs(_outputs(converted, *_images()), expected["pred_logits"], expected["pred_boxes"])


def test_bare_state_dict_without_args(tmp_path):
    """A state dict alone: everything but the number of heads comes from the shapes (8 assumed)."""
    model = build_model(tiny_model_config("detr", nheads=8), 91)
    path = tmp_path / "bare.pth"
    torch.save(model.state_dict(), path)
    report = convert_with_report(path, "detr", out=tmp_path / "ours.pt")
    assert any("assumed 8" in note for note in report.notes)
    converted, _, _ = load_model(report.out_path)
    expected = _outputs(model, *_images())
    _assert_same_outputs(_outputs(converted, *_images()), expected["pred_logits"], expected["pred_boxes"])


# ---------------------------------------------------------------------------------------------
# Another label map
# ---------------------------------------------------------------------------------------------


def test_new_label_map_deformable_two_stage(tmp_path):
    path, original = _fake_official(tmp_path, "deformable_two_stage")
    new = LabelMap(("car", "widget", "person"))
    report = convert_with_report(path, "deformable_detr", new, out=tmp_path / "ours.pt")
    model, _, label_map = load_model(report.out_path)
    assert label_map == new
    before, after = original.state_dict(), model.state_dict()
    heads = [k for k in after if k.startswith("class_embed.")]
    assert {k for k in after if k not in heads} == {k for k in before if not k.startswith("class_embed.")}
    for key in after:
        if key not in heads:
            assert torch.equal(after[key], before[key]), key
    prior = -math.log((1 - 0.01) / 0.01)
    encoder_head = model.transformer.decoder.num_layers
    for j in range(encoder_head + 1):
        w, b = f"class_embed.{j}.weight", f"class_embed.{j}.bias"
        assert after[w].shape == (3, 64)
        if j < encoder_head:
            assert torch.equal(after[w][0], before[w][3]) and torch.equal(after[b][0], before[b][3])  # car = id 3
        else:  # the encoder head keeps its class-agnostic objectness row
            assert torch.equal(after[w][0], before[w][0]) and torch.equal(after[b][0], before[b][0])
        assert torch.equal(after[w][2], before[w][1]) and torch.equal(after[b][2], before[b][1])  # person = id 1
        assert after[b][1].item() == pytest.approx(prior)  # widget: the focal prior, fresh weights
        assert not any(torch.allclose(after[w][1], row) for row in before[w])
    assert report.copied_classes == [("car", 3, 0), ("person", 1, 2)]
    assert report.new_classes == ["widget"]
    text = str(report)
    assert "car (3->0)" in text and "person (1->2)" in text and "widget" in text
    assert "class_embed.2" in text and "re-initialised" in text


def test_new_label_map_detr_via_cli(tmp_path, capsys):
    path, original = _fake_official(tmp_path, "detr")
    out = tmp_path / "ours.pt"
    assert main(["convert", str(path), "--source", "detr", "--out", str(out), "--classes", "dog,unicorn"]) == 0
    printed = capsys.readouterr().out
    assert "dog (18->0)" in printed and "unicorn" in printed and "no-object" in printed
    model, _, label_map = load_model(out)
    assert label_map.names == ("dog", "unicorn")
    before, after = original.state_dict(), model.state_dict()
    assert torch.equal(after["class_embed.weight"][0], before["class_embed.weight"][18])
    assert torch.equal(after["class_embed.weight"][2], before["class_embed.weight"][91])  # no-object
    assert not any(torch.allclose(after["class_embed.weight"][1], row) for row in before["class_embed.weight"])
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("class_embed."))

    labels = tmp_path / "labels.json"
    LabelMap(("unicorn", "dog")).save(labels)
    again = tmp_path / "again.pt"
    assert main(["convert", str(path), "--source", "detr", "--out", str(again), "--labels", str(labels)]) == 0
    assert load_model(again)[2].names == ("unicorn", "dog")
    # The same label map is deterministic: the fresh rows do not depend on the global RNG.
    torch.manual_seed(123)
    assert torch.equal(load_checkpoint(out)["model"]["class_embed.weight"],
                       load_checkpoint(convert_checkpoint(path, "detr", LabelMap(("dog", "unicorn")),
                                                          out=tmp_path / "third.pt"))["model"]["class_embed.weight"])


def test_public_api_name(tmp_path):
    path, _ = _fake_official(tmp_path, "detr")
    assert detr.convert_checkpoint(path, source="detr", out=tmp_path / "x.pt") == tmp_path / "x.pt"
    default = detr.convert_checkpoint(path, source="detr")
    assert default == path.with_name(f"{path.stem}-mlflow-detr.pt") and default.is_file()


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _load_fake(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


class _NotAllowed:
    """A pickled object that is neither a tensor container nor argparse args."""


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pth: checkpoint file not found"):
        convert_checkpoint(tmp_path / "missing.pth", "detr", out=tmp_path / "x.pt")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.pth: not a readable PyTorch checkpoint"):
        convert_checkpoint(text, "detr", out=tmp_path / "x.pt")
    with pytest.raises(InvalidInputError, match="source 'yolo'; accepted: detr, deformable_detr, hf"):
        convert_checkpoint(text, "yolo", out=tmp_path / "x.pt")

    path, model = _fake_official(tmp_path, "detr")
    with pytest.raises(CheckpointError, match="use --source detr"):
        convert_checkpoint(path, "deformable_detr", out=tmp_path / "x.pt")
    with pytest.raises(InvalidInputError, match="is the source checkpoint"):
        convert_checkpoint(path, "detr", out=path)

    data = _load_fake(path)
    bad = dict(data, model=dict(data["model"]))
    bad["model"]["transformer.decoder.layers.1.linear1.weight"] = torch.zeros(5, 64)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"transformer\.decoder\.layers\.1\.linear1\.weight has shape \(5, 64\)"):
        convert_checkpoint(tmp_path / "shape.pth", "detr", out=tmp_path / "x.pt")

    extra = dict(data, model={**data["model"], "transformer.decoder.layers.0.extra.weight": torch.zeros(2)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"fit no parameter.*layers\.0\.extra\.weight"):
        convert_checkpoint(tmp_path / "extra.pth", "detr", out=tmp_path / "x.pt")

    lying = dict(data, args=argparse.Namespace(**{**vars(data["args"]), "hidden_dim": 256}))
    torch.save(lying, tmp_path / "args.pth")
    with pytest.raises(CheckpointError, match="query_embed.weight says hidden_dim = 64 .* say 256"):
        convert_checkpoint(tmp_path / "args.pth", "detr", out=tmp_path / "x.pt")

    torch.save({"model": data["model"], "args": _NotAllowed()}, tmp_path / "object.pth")
    with pytest.raises(CheckpointError, match="object.pth: not a readable PyTorch checkpoint"):
        convert_checkpoint(tmp_path / "object.pth", "detr", out=tmp_path / "x.pt")

    ours = tmp_path / "ours.pt"
    save_checkpoint(ours, {"model": model.state_dict(), "config": {}, "label_map": {}})
    with pytest.raises(CheckpointError, match="already an mlflow-detr checkpoint"):
        convert_checkpoint(ours, "detr", out=tmp_path / "x.pt")


def test_shared_heads_must_agree(tmp_path):
    """Without box refinement every decoder layer uses one head; differing copies are an error."""
    path, _ = _fake_official(tmp_path, "deformable_multi_scale")
    data = _load_fake(path)
    data["model"]["class_embed.1.bias"] = data["model"]["class_embed.1.bias"] + 1
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="class_embed.1.bias differs from class_embed.0.bias"):
        convert_checkpoint(path, "deformable_detr", out=tmp_path / "x.pt")


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tmp_path / "a.pth"), "--source", "yolo", "--out", str(tmp_path / "b.pt")])
    assert exit_info.value.code == 2
    assert main(["convert", str(tmp_path / "a.pth"), "--source", "detr", "--out", str(tmp_path / "b.pt")]) == 2
    assert "a.pth: checkpoint file not found" in capsys.readouterr().err
    path, _ = _fake_official(tmp_path, "detr")
    assert main(["convert", str(path), "--source", "detr", "--out", str(tmp_path / "b.pt"), "--classes", "a,,b"]) == 2
    assert "--classes" in capsys.readouterr().err
