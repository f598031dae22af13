"""Transformers: a padded feature map with its mask gives the same result as the unpadded one, the
deformable attention samples where the paper says, and its initialisation is the paper's."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detr.models.deformable_transformer import DeformableTransformer
from detr.models.heads import MLP
from detr.models.ms_deform_attn import MSDeformAttn
from detr.models.position_encoding import PositionEmbeddingSine
from detr.models.transformer import Transformer

C = 32


def _pad(x: torch.Tensor, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [B, C, h0, w0] with random garbage to [B, C, h, w]; mask True on the padding."""
    b, c, h0, w0 = x.shape
    padded = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))
    padded[:, :, :h0, :w0] = x
    mask = torch.ones(b, h, w, dtype=torch.bool)
    mask[:, :h0, :w0] = False
    return padded, mask


@pytest.mark.parametrize("pre_norm", [False, True])
def test_detr_transformer_ignores_padding(pre_norm):
    torch.manual_seed(0)
    model = Transformer(C, 4, 2, 2, 64, dropout=0.0, normalize_before=pre_norm).eval()
    pos_enc = PositionEmbeddingSine(C // 2)
    queries = torch.randn(5, C)
    src = torch.randn(1, C, 3, 4)
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    hs, memory = model(src, mask, queries, pos_enc(src, mask))
    assert hs.shape == (2, 1, 5, C) and memory.shape == (1, C, 3, 4)
    src_p, mask_p = _pad(src, 5, 7, seed=1)
    hs_p, memory_p = model(src_p, mask_p, queries, pos_enc(src_p, mask_p))
    torch.testing.assert_close(hs_p, hs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(memory_p[..., :3, :4], memory, atol=1e-5, rtol=1e-5)


def _levels(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, C, h, w, generator=g) for h, w in shapes]


@pytest.mark.parametrize("two_stage", [False, True])
def test_deformable_transformer_ignores_padding(two_stage):
    """Level l is h_l x w_l valid inside an H_l x W_l padded map with the same valid ratio (3/4):
    reference points, offsets and bilinear sampling must then hit the same pixels."""
    torch.manual_seed(0)
    levels = 2
    model = DeformableTransformer(C, 4, 2, 2, 64, dropout=0.0, num_feature_levels=levels, two_stage=two_stage,
                                  two_stage_num_proposals=6).eval()
    refine = nn.ModuleList(MLP(C, C, 4, 3) for _ in range(2))
    enc_class, enc_box = nn.Linear(C, 3), MLP(C, C, 4, 3)
    pos_enc = PositionEmbeddingSine(C // 2, offset=-0.5)
    queries = None if two_stage else torch.randn(5, 2 * C)

    def run(srcs, masks):
        pos = [pos_enc(s, m) for s, m in zip(srcs, masks)]
        return model(srcs, masks, pos, queries, bbox_embed=refine, enc_class_embed=enc_class,
                     enc_bbox_embed=enc_box)

    srcs = _levels([(6, 6), (3, 3)], seed=1)
    masks = [torch.zeros(1, s.shape[2], s.shape[3], dtype=torch.bool) for s in srcs]
    hs, init_ref, inter_refs, enc_class_out, _ = run(srcs, masks)
    padded = [_pad(s, 8, 8, seed=2 + i) for i, s in enumerate(srcs)]
    hs_p, init_ref_p, inter_refs_p, enc_class_p, _ = run([p[0] for p in padded], [p[1] for p in padded])
    torch.testing.assert_close(hs_p, hs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(init_ref_p, init_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inter_refs_p, inter_refs, atol=1e-4, rtol=1e-4)
    if two_stage:
        # The valid positions' proposal scores are unchanged (level 0's first row, 6 pixels).
        torch.testing.assert_close(enc_class_p[:, :6], enc_class_out[:, :6], atol=1e-4, rtol=1e-4)


def test_deformable_sampling_hits_the_reference_pixel():
    """With zero offsets and the encoder's reference points (pixel centres), bilinear sampling
    returns the pixel itself: out = output_proj(value_proj(x)) at every position."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=C, n_levels=1, n_heads=4, n_points=3)
    nn.init.zeros_(attn.sampling_offsets.bias)
    h, w = 3, 5
    x = torch.randn(2, h * w, C)
    shapes = torch.tensor([[h, w]])
    ref_y, ref_x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    ref = torch.stack([ref_x.flatten(), ref_y.flatten()], -1)[None, :, None].expand(2, -1, 1, -1)
    out = attn(x, ref, x, shapes, torch.tensor([0]))
    torch.testing.assert_close(out, attn.output_proj(attn.value_proj(x)), atol=1e-5, rtol=1e-5)


def test_deformable_box_reference_scales_offsets_by_box_size(monkeypatch):
    """With a box reference, the location is centre + offset / P * size / 2."""
    import detr.models.ms_deform_attn as module

    captured = {}

    def fake_op(value, shapes, starts, locations, weights):
        captured["loc"] = locations
        return value.new_zeros(value.shape[0], locations.shape[1], C)

    monkeypatch.setattr(module, "ms_deform_attn", fake_op)
    attn = MSDeformAttn(d_model=C, n_levels=1, n_heads=1, n_points=2)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 2.0]))  # point 0: +2 in x, point 1: +2 in y
    box = torch.tensor([0.25, 0.5, 2.0, 1.0]).view(1, 1, 1, 4)  # cx, cy, w, h
    attn(torch.randn(1, 1, C), box, torch.randn(1, 6, C), torch.tensor([[2, 3]]), torch.tensor([0]))
    loc = captured["loc"][0, 0, 0, 0]  # [P, 2]
    torch.testing.assert_close(loc, torch.tensor([[0.25 + 2 / 2 * 2.0 / 2, 0.5], [0.25, 0.5 + 2 / 2 * 1.0 / 2]]))


def test_ms_deform_attn_initialisation_is_the_papers():
    attn = MSDeformAttn(d_model=C, n_levels=2, n_heads=8, n_points=3)
    assert (attn.sampling_offsets.weight == 0).all() and (attn.attention_weights.weight == 0).all()
    assert (attn.attention_weights.bias == 0).all() and (attn.value_proj.bias == 0).all()
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    for head in range(8):
        theta = 2 * math.pi * head / 8
        direction = torch.tensor([math.cos(theta), math.sin(theta)])
        direction = direction / direction.abs().max()
        for point in range(3):
            torch.testing.assert_close(bias[head, 1, point], direction * (point + 1))


def test_transformer_resets_keep_deformable_init():
    model = DeformableTransformer(C, 4, 1, 1, 64, num_feature_levels=2)
    assert (model.encoder.layers[0].self_attn.sampling_offsets.weight == 0).all()
    assert (model.decoder.layers[0].cross_attn.attention_weights.weight == 0).all()
    assert (model.reference_points.bias == 0).all()
