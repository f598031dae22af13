"""Two-stage DETR and Deformable DETR with ``encoder_content`` (``model.detr.`` / ``model.deformable.``):
a query's content is its box embedding plus the encoder head's feature at the position it was
selected from (Efficient DETR, RT-DETR)."""

from __future__ import annotations

import pytest
import torch

from detr.config import load_config
from detr.errors import ConfigError
from detr.models.build import build_model

from .conftest import tiny_model_config


def two_stage_model(encoder_content: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_model_config("detr_two_stage", detr={"two_stage": True, "encoder_content": encoder_content})
    return build_model(config, num_classes=3).eval()


def test_the_content_adds_the_selected_positions_encoder_features():
    with_features, box_only = two_stage_model(True), two_stage_model(False)
    box_only.load_state_dict(with_features.state_dict())  # the option adds no parameter
    torch.manual_seed(1)
    memory = torch.randn(2, 12, with_features.proposals.hidden_dim)  # [B, S, C]: a 3x4 map
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 8:] = True                                            # image 1: the last row is padding
    selected = with_features.proposals(memory, padding, (3, 4), 4)
    reference = box_only.proposals(memory, padding, (3, 4), 4)
    # The reference features: the encoder head's normed projection at the top-4 positions by best
    # real-class probability, padding excluded.
    head = with_features.proposals
    hidden = head.enc_output_norm(head.enc_output(memory.masked_fill(padding[..., None], 0.0)))
    score = head.class_embed(hidden).softmax(-1)[..., :-1].amax(-1).masked_fill(padding, -1.0)
    top = score.topk(4, dim=1).indices
    expected = torch.stack([hidden[b, top[b]] for b in range(2)])
    assert not top[1].ge(8).any()
    torch.testing.assert_close(selected.content - reference.content, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(selected.query_pos, reference.query_pos)
    torch.testing.assert_close(selected.boxes_unact, reference.boxes_unact)


def test_eval_outputs_use_the_encoder_features():
    model, plain = two_stage_model(True), two_stage_model(False)
    plain.load_state_dict(model.state_dict())
    images, masks = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    with torch.no_grad():
        assert not torch.allclose(model(images, masks)["pred_logits"], plain(images, masks)["pred_logits"])


def test_encoder_content_without_two_stage_is_a_config_error():
    with pytest.raises(ConfigError, match="encoder_content needs two_stage: true"):
        load_config(None, ["model.arch=detr", "model.detr.encoder_content=true"])


# Deformable DETR: ``model.deformable.encoder_content`` (two-stage) adds, to the sine-embedded content
# of each selected proposal, the encoder feature (enc_output + norm) at the proposal's position.


def deformable_model(encoder_content: bool, seed: int = 0):
    torch.manual_seed(seed)
    variant = "deformable_two_stage_encoder_content" if encoder_content else "deformable_two_stage"
    return build_model(tiny_model_config(variant), num_classes=3).eval()


def _transformer_tensors(model, images, masks):
    """Of one forward: the level masks the transformer gets, the encoder memory [B, S, C], and the
    decoder's content queries [B, Q, C] and reference boxes [B, Q, 4]."""
    seen = {}
    hooks = [
        model.transformer.register_forward_pre_hook(lambda m, args: seen.update(masks=args[1])),
        model.transformer.encoder.register_forward_hook(lambda m, args, out: seen.update(memory=out)),
        model.transformer.decoder.register_forward_pre_hook(lambda m, args: seen.update(tgt=args[0], refs=args[1])),
    ]
    with torch.no_grad():
        model(images, masks)
    for hook in hooks:
        hook.remove()
    return seen


def test_deformable_content_adds_the_selected_positions_encoder_features():
    with_features, box_only = deformable_model(True), deformable_model(False)
    box_only.load_state_dict(with_features.state_dict())  # the option adds no parameter
    torch.manual_seed(1)
    images, masks = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[1, :, 96:] = True  # image 1: its right quarter is padding
    seen = _transformer_tensors(with_features, images, masks)
    reference = _transformer_tensors(box_only, images, masks)
    # The expected features, from the memory by the model's own parts: the encoder head's normed
    # projection at the top-k positions by foreground logit.
    transformer = with_features.transformer
    shapes = [(int(m.shape[1]), int(m.shape[2])) for m in seen["masks"]]
    padding = torch.cat([m.flatten(1) for m in seen["masks"]], 1)  # [B, S]
    output_memory, _, _ = transformer.encoder_output_proposals(seen["memory"], padding, shapes)
    enc_class_head = with_features.class_embed[transformer.decoder.num_layers]
    top = enc_class_head(output_memory)[..., 0].topk(with_features.num_queries, dim=1).indices  # [B, Q]
    expected = torch.stack([output_memory[b, top[b]] for b in range(2)])
    torch.testing.assert_close(seen["tgt"] - reference["tgt"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["refs"], reference["refs"])


@pytest.mark.parametrize("arch", ["detr", "deformable_detr"])
@pytest.mark.parametrize("encoder_content", [True, False])
def test_the_decoder_classes_reach_the_encoder_projection_only_through_the_content(arch, encoder_content):
    # The selected boxes are detached and the selection is an index; the encoder head's own loss is
    # not part of pred_logits. So without the encoder features in the content, the decoder's class
    # logits have no path into the encoder head's projection.
    if arch == "detr":
        model = two_stage_model(encoder_content).train()
        projection = model.proposals.enc_output
    else:
        model = deformable_model(encoder_content).train()
        projection = model.transformer.enc_output
    images, masks = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    model(images, masks)["pred_logits"].sum().backward()
    grad = projection.weight.grad
    assert (grad is not None and bool(grad.any())) == encoder_content


def test_deformable_encoder_content_without_two_stage_is_a_config_error():
    with pytest.raises(ConfigError, match="model.deformable.encoder_content needs model.deformable.two_stage: true"):
        load_config(None, ["model.arch=deformable_detr", "model.deformable.encoder_content=true"])
