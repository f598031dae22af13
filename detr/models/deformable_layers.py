"""Deformable DETR encoder and decoder (Zhu et al. 2021).

Encoder layers: deformable self-attention over all levels (each pixel is a query whose reference
point is its own centre). Decoder layers: standard self-attention between object queries, then
deformable cross-attention to the encoder memory around each query's reference point. With
iterative box refinement each decoder layer's box head moves the reference points for the next
layer (detached, as in the paper, so each layer's box loss trains only its own head).
Post-norm layers, parameter names as in the official code.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from detr.models import inplace
from detr.models.heads import inverse_sigmoid
from detr.models.ms_deform_attn import MSDeformAttn


class DeformableTransformerEncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        """src, pos [B, S, C]; reference_points [B, S, L, 2]; padding_mask [B, S] -> [B, S, C]."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(inplace.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableTransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        memory_padding_mask: torch.Tensor,
        self_attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tgt, query_pos [B, Q, C]; reference_points [B, Q, L, 2 or 4]; memory [B, S, C];
        self_attn_mask [B * n_heads, Q, Q] bool (True = may not attend; training aids only) -> [B, Q, C]."""
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                               memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attn))
        ffn = self.linear2(self.dropout3(inplace.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, layer: DeformableTransformerEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers

    @staticmethod
    def reference_points(spatial_shapes: Sequence[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level as reference points for every level.

        Args:
            spatial_shapes: (H_l, W_l) per level.
            valid_ratios: [B, L, 2] (w, h) fraction of each padded map that is image.

        Returns:
            [B, S, L, 2] (x, y) in [0, 1] of the padded maps: a pixel's centre normalized by the
            valid size of its own level, then rescaled to each level's valid region.
        """
        device = valid_ratios.device
        points = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)  # [B, HW]
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        reference = torch.cat(points, 1)  # [B, S, 2] relative to the valid region
        return reference[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2]

    def forward(
        self,
        src: torch.Tensor,
        spatial_shapes_list: Sequence[tuple[int, int]],
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        pos: torch.Tensor,
        padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        """src, pos [B, S, C] -> memory [B, S, C]."""
        reference_points = self.reference_points(spatial_shapes_list, valid_ratios)  # float32, see MSDeformAttn
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableTransformerDecoder(nn.Module):
    def __init__(self, layer: DeformableTransformerDecoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers

    def forward(
        self,
        tgt: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        query_pos: torch.Tensor,
        memory_padding_mask: torch.Tensor,
        bbox_embed: Sequence[nn.Module] | None = None,
        self_attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            tgt, query_pos: [B, Q, C].
            reference_points: [B, Q, 2] points or [B, Q, 4] boxes (cxcywh), in [0, 1] of the
                valid image region.
            memory: [B, S, C]; valid_ratios [B, L, 2].
            bbox_embed: one box head per layer for iterative refinement, or None.
            self_attn_mask: [B * n_heads, Q, Q] bool between the queries (training aids), or None.

        Returns:
            hs [L_dec, B, Q, C], and the reference points after each layer [L_dec, B, Q, 2 or 4]
            (refined by that layer's box head and detached, or unchanged without refinement).
            Layer l predicts relative to the points before it: the initial ones for l = 0, else
            entry l - 1.
        """
        intermediate, intermediate_refs = [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # [B, 1, L, 4]
            else:
                scale = valid_ratios[:, None]  # [B, 1, L, 2]
            refs_input = reference_points[:, :, None] * scale  # [B, Q, L, 2 or 4] in padded coordinates
            tgt = layer(tgt, query_pos, refs_input, memory, spatial_shapes, level_start_index, memory_padding_mask,
                        self_attn_mask)
            if bbox_embed is not None:
                delta = bbox_embed[lid](tgt)  # [B, Q, 4] in logit space
                if reference_points.shape[-1] == 4:
                    refined = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    centre = delta[..., :2] + inverse_sigmoid(reference_points)
                    refined = torch.cat([centre, delta[..., 2:]], -1).sigmoid()
                # Detached: the next layer starts from this box but does not backpropagate into it.
                reference_points = refined.detach()
            intermediate.append(tgt)
            intermediate_refs.append(reference_points)
        return torch.stack(intermediate), torch.stack(intermediate_refs)
