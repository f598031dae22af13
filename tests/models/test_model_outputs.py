"""Model forward contract for every variant: shapes, masks, key names, gradients, input errors."""

from __future__ import annotations

import math

import pytest
import torch

from detr.config import Config
from detr.errors import InvalidInputError
from detr.models.build import build_criterion, build_model

NUM_CLASSES = 5
H, W = 64, 96  # feature maps: stride 8 -> 8x12, 16 -> 4x6, 32 -> 2x3, 64 -> 1x2


def _images(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, H, W, generator=g)
    masks = torch.zeros(batch, H, W, dtype=torch.bool)
    masks[-1, :, 72:] = True  # the last image is 64x72, padded on the right
    return images, masks


def test_forward_shapes(variant, tiny_config):
    config = tiny_config(variant)
    model = build_model(config, NUM_CLASSES)
    images, masks = _images()
    out = model(images, masks)
    deformable = config.arch == "deformable_detr"
    classes = NUM_CLASSES if deformable else NUM_CLASSES + 1
    q = config.num_queries
    assert out["pred_logits"].shape == (2, q, classes)
    assert out["pred_boxes"].shape == (2, q, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == config.dec_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, q, classes) and aux["pred_boxes"].shape == (2, q, 4)
    assert not any(key.startswith("loss") for key in out)
    if config.deformable.two_stage if deformable else config.detr.two_stage:
        strides = [8, 16, 32, 64][4 - config.deformable.n_levels :] if deformable else [32]
        tokens = sum(math.ceil(H / s) * math.ceil(W / s) for s in strides)
        assert out["enc_outputs"]["pred_logits"].shape == (2, tokens, classes)
        assert out["enc_outputs"]["pred_boxes"].shape == (2, tokens, 4)
    else:
        assert "enc_outputs" not in out


def test_no_aux_outputs_without_aux_loss(tiny_config):
    for variant in ("detr", "deformable_multi_scale"):
        model = build_model(tiny_config(variant, aux_loss=False), NUM_CLASSES)
        out = model(_images()[0])
        assert "aux_outputs" not in out


@pytest.mark.parametrize("variant", ["detr", "deformable_multi_scale", "deformable_two_stage"])
def test_masks_none_means_no_padding(variant, tiny_config):
    model = build_model(tiny_config(variant), NUM_CLASSES).eval()
    images = _images()[0]
    with torch.no_grad():
        a = model(images)
        b = model(images, torch.zeros(2, H, W, dtype=torch.bool))
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"])
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])


def test_padding_mask_changes_the_padded_image_only(tiny_config):
    model = build_model(tiny_config("deformable_multi_scale"), NUM_CLASSES).eval()
    images, masks = _images()
    with torch.no_grad():
        masked = model(images, masks)["pred_logits"]
        unmasked = model(images)["pred_logits"]
    torch.testing.assert_close(masked[0], unmasked[0])
    assert not torch.allclose(masked[1], unmasked[1])


def test_state_dict_keys_follow_the_official_layout(tiny_config):
    detr_keys = set(build_model(tiny_config("detr"), NUM_CLASSES).state_dict())
    for key in (
        "backbone.0.body.conv1.weight",
        "backbone.0.body.bn1.running_var",
        "backbone.0.body.layer4.1.conv2.weight",
        "input_proj.weight",
        "query_embed.weight",
        "class_embed.weight",
        "bbox_embed.layers.2.bias",
        "transformer.encoder.layers.0.self_attn.in_proj_weight",
        "transformer.encoder.layers.0.linear1.weight",
        "transformer.decoder.layers.2.multihead_attn.out_proj.weight",
        "transformer.decoder.layers.0.norm3.weight",
        "transformer.decoder.norm.weight",
    ):
        assert key in detr_keys, key
    assert not any(k.startswith("backbone.0.body.fc") for k in detr_keys)
    assert "backbone.1.row_embed.weight" in build_model(tiny_config("detr_prenorm_learned"), NUM_CLASSES).state_dict()

    deformable = set(build_model(tiny_config("deformable_refine"), NUM_CLASSES).state_dict())
    for key in (
        "transformer.level_embed",
        "transformer.reference_points.weight",
        "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
        "transformer.encoder.layers.0.self_attn.attention_weights.bias",
        "transformer.decoder.layers.2.cross_attn.value_proj.weight",
        "transformer.decoder.layers.2.cross_attn.output_proj.bias",
        "transformer.decoder.layers.0.self_attn.in_proj_weight",
        "input_proj.0.1.weight",  # GroupNorm of the first level
        "input_proj.3.0.weight",  # the extra stride-64 level's 3x3 conv
        "query_embed.weight",
        "class_embed.2.weight",
        "bbox_embed.2.layers.2.bias",
    ):
        assert key in deformable, key
    two_stage = set(build_model(tiny_config("deformable_two_stage"), NUM_CLASSES).state_dict())
    for key in ("transformer.enc_output.weight", "transformer.enc_output_norm.weight", "transformer.pos_trans.weight",
                "transformer.pos_trans_norm.bias", "class_embed.3.weight", "bbox_embed.3.layers.0.weight"):
        assert key in two_stage, key
    assert "query_embed.weight" not in two_stage and "transformer.reference_points.weight" not in two_stage


def test_heads_shared_without_refinement_and_separate_with_it(tiny_config):
    plain = build_model(tiny_config("deformable_multi_scale"), NUM_CLASSES)
    assert all(head is plain.class_embed[0] for head in plain.class_embed)
    assert all(head is plain.bbox_embed[0] for head in plain.bbox_embed)
    refine = build_model(tiny_config("deformable_refine"), NUM_CLASSES)
    assert len({id(head) for head in refine.bbox_embed}) == len(refine.bbox_embed) == 3
    two_stage = build_model(tiny_config("deformable_two_stage"), NUM_CLASSES)
    assert len(two_stage.class_embed) == 4  # 3 decoder layers + the encoder proposals


def test_focal_prior_and_box_head_init(tiny_config):
    model = build_model(tiny_config("deformable_multi_scale"), NUM_CLASSES)
    torch.testing.assert_close(model.class_embed[0].bias.sigmoid(), torch.full((NUM_CLASSES,), 0.01))
    last = model.bbox_embed[0].layers[-1]
    assert (last.weight == 0).all()
    torch.testing.assert_close(last.bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))


# DETR's first decoder layer receives zeros as its input (the queries enter only as positions), so
# every query's value in its self-attention is the same vector and the attention weights cannot
# matter. Post-norm: that layer's in_proj_weight (query/key/value projections) gets no gradient.
# Pre-norm: the values are W_v * norm1(0) + b_v, so W_v does get one, but norm1's weight multiplies
# the normalized zeros and does not. "No gradient" means |grad| < 1e-6 (rounding, ~1e-8), where
# every other parameter gets more than 1e-3.
EXPECTED_ZERO_GRAD = {
    "detr": {"transformer.decoder.layers.0.self_attn.in_proj_weight"},
    "detr_prenorm_learned": {"transformer.decoder.layers.0.norm1.weight"},
}


def test_gradients_reach_every_trainable_parameter(variant, tiny_config, make_targets):
    torch.manual_seed(0)
    config = tiny_config(variant)
    model = build_model(config, NUM_CLASSES)
    with torch.no_grad():  # leave the zero initialisations (box head output, offsets) of the papers
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    criterion = build_criterion(config, NUM_CLASSES)
    images, masks = _images()
    losses = criterion(model(images, masks), make_targets([3, 2], NUM_CLASSES))
    losses["weighted_total"].backward()
    no_grad = sorted(
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().max() < 1e-6)
    )
    assert set(no_grad) == EXPECTED_ZERO_GRAD.get(variant, set()), no_grad


def test_refined_reference_points_are_detached(tiny_config):
    model = build_model(tiny_config("deformable_refine"), NUM_CLASSES)
    out = model(_images()[0])
    out["pred_boxes"].sum().backward()  # the last layer's boxes only
    for i, head in enumerate(model.bbox_embed):
        has_grad = any(p.grad is not None and p.grad.any() for p in head.parameters())
        assert has_grad == (i == len(model.bbox_embed) - 1), f"bbox_embed.{i}"


@pytest.mark.parametrize(
    ("images", "masks", "match"),
    [
        (torch.zeros(2, 1, 32, 32), None, r"\[B, 3, H, W\]"),
        (torch.zeros(3, 32, 32), None, r"\[B, 3, H, W\]"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), None, "floating-point"),
        (torch.zeros(2, 3, 32, 32), torch.zeros(2, 32, 31, dtype=torch.bool), r"\[2, 32, 32\]"),
        (torch.zeros(2, 3, 32, 32), torch.zeros(2, 32, 32), "bool"),
    ],
)
def test_bad_inputs_raise_invalid_input(images, masks, match, tiny_config):
    model = build_model(tiny_config("detr"), NUM_CLASSES)
    with pytest.raises(InvalidInputError, match=match):
        model(images, masks)


@pytest.mark.parametrize("variant", ["deformable_two_stage", "detr_two_stage"])
def test_two_stage_with_too_few_positions_is_an_error(variant, tiny_config):
    model = build_model(tiny_config(variant, num_queries=200), NUM_CLASSES)
    with pytest.raises(InvalidInputError, match="200 proposals"):
        model(torch.zeros(1, 3, 64, 64))


def test_two_stage_detr_starts_each_query_at_its_selected_proposal(tiny_config):
    """The top-Q encoder positions by best real-class probability are the queries, and the box
    heads start at zero offsets: the first decoder layer's boxes are the selected proposals."""
    torch.manual_seed(0)
    model = build_model(tiny_config("detr_two_stage"), NUM_CLASSES).eval()
    assert not hasattr(model, "query_embed")
    images, masks = _images()
    with torch.no_grad():
        out = model(images, masks)
    enc_logits, enc_boxes = out["enc_outputs"]["pred_logits"], out["enc_outputs"]["pred_boxes"]
    for b in range(2):
        score = enc_logits[b].softmax(-1)[:, :-1].max(-1).values
        chosen = enc_boxes[b, score.topk(model.num_queries).indices]
        torch.testing.assert_close(out["aux_outputs"][0]["pred_boxes"][b], chosen)


def test_two_stage_detr_queries_at_padding_start_from_the_whole_image(tiny_config):
    """A padded image with fewer valid positions than queries: every box stays finite."""
    model = build_model(tiny_config("detr_two_stage", num_queries=6), NUM_CLASSES).eval()
    images, masks = _images()
    masks[-1, :, 40:] = True  # 64x40 of image: 2x2 valid positions of the 2x3 map
    with torch.no_grad():
        out = model(images, masks)
    assert torch.isfinite(out["pred_boxes"]).all() and torch.isfinite(out["pred_logits"]).all()


def test_num_classes_must_be_positive(tiny_config):
    with pytest.raises(InvalidInputError, match="num_classes"):
        build_model(tiny_config("detr"), 0)


def test_builders_take_the_model_settings_not_the_whole_config(tiny_config):
    """The config stops at the boundary (detr.run): a whole Config is refused with the way out."""
    whole = Config(model=tiny_config("detr"))
    for builder in (build_model, build_criterion):
        with pytest.raises(InvalidInputError, match=r"a ModelConfig, got Config \(pass its model section"):
            builder(whole, NUM_CLASSES)


@pytest.mark.parametrize("variant", ["detr", "deformable_multi_scale", "deformable_two_stage"])
def test_bfloat16_autocast(variant, tiny_config, make_targets):
    """Mixed precision (train.amp=bf16): the deformable op gets float32 locations and weights."""
    config = tiny_config(variant)
    model = build_model(config, NUM_CLASSES)
    images = torch.randn(2, 3, 32, 64)  # bfloat16 convolutions are slow on most CPUs: keep it small
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    losses = build_criterion(config, NUM_CLASSES)(out, make_targets([2, 1], NUM_CLASSES))
    assert torch.isfinite(losses["weighted_total"])
    losses["weighted_total"].backward()
