"""Deformable DETR transformer: flattens the levels, runs the deformable encoder and decoder.

Single-stage: object queries are learned ([Q, 2C] split into a positional half and a content half);
their reference points are a linear function of the positional half. Two-stage: every encoder
position proposes a box (a fixed-size box at the pixel, refined by the encoder box head), the top-k
proposals by foreground score become the decoder's reference boxes and, through a sine embedding
(``pos_trans``), its queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from detr.errors import InvalidInputError
from detr.models.deformable_layers import (
    DeformableTransformerDecoder,
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
)
from detr.models.ms_deform_attn import MSDeformAttn
from detr.models.proposals import box_sine_embedding, grid_proposals


class DeformableTransformer(nn.Module):
    """Args:
        d_model: width C.  nhead: heads M.  dim_feedforward: FFN width (the paper: 1024).
        num_encoder_layers, num_decoder_layers: depths.  dropout: in attention and FFN.
        num_feature_levels: L.  dec_n_points, enc_n_points: sampling points P per head and level.
        two_stage: generate queries from encoder proposals instead of learned queries.
        two_stage_num_proposals: how many proposals become decoder queries.
        encoder_content: two-stage only: a query's content is the sine embedding of its proposal box
            plus the encoder feature at the proposal's position (Efficient DETR, RT-DETR), so what
            the encoder head saw there reaches the decoder directly; off in the paper.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        dec_n_points: int = 4,
        enc_n_points: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
        encoder_content: bool = False,
    ) -> None:
        super().__init__()
        if encoder_content and not two_stage:
            raise ValueError("encoder_content needs two_stage: learned queries have no encoder position")
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.encoder_content = encoder_content
        enc_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead,
                                                      enc_n_points)
        self.encoder = DeformableTransformerEncoder(enc_layer, num_encoder_layers)
        dec_layer = DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead,
                                                      dec_n_points)
        self.decoder = DeformableTransformerDecoder(dec_layer, num_decoder_layers)
        # Which level a flattened position comes from (the position encoding alone does not say).
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
        """mask [B, H, W] (True = padding) -> [B, 2] (w, h) fraction of the map that is image."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).float()
        valid_w = (~mask[:, 0, :]).sum(1).float()
        return torch.stack([valid_w / w, valid_h / h], -1)

    def proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """Sine embedding of proposal boxes: [B, K, 4] logits -> [B, K, 2C] (C / 2 features per coordinate)."""
        return box_sine_embedding(proposals, self.d_model // 2)

    def encoder_output_proposals(
        self, memory: torch.Tensor, padding_mask: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One proposal per encoder position: a box centred on the pixel, 0.05 * 2^level wide.

        Returns:
            output_memory [B, S, C] (zeroed where invalid, then ``enc_output`` + norm),
            proposals [B, S, 4] cxcywh in logit space (+inf where invalid),
            invalid [B, S, 1] bool: padding, or a proposal too close to the border to be trusted.
        """
        sizes = [0.05 * 2.0**lvl for lvl in range(len(spatial_shapes))]
        output_proposals, invalid = grid_proposals(padding_mask, spatial_shapes, sizes)
        output_memory = memory.masked_fill(invalid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, output_proposals, invalid

    def forward(
        self,
        srcs: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        pos_embeds: Sequence[torch.Tensor],
        query_embed: torch.Tensor | None = None,
        bbox_embed: Sequence[nn.Module] | None = None,
        enc_class_embed: nn.Module | None = None,
        enc_bbox_embed: nn.Module | None = None,
        *,
        num_proposals: int | None = None,
        extra_box_queries: tuple[torch.Tensor, torch.Tensor] | None = None,
        self_attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """
        Args:
            srcs, pos_embeds: per level [B, C, H_l, W_l]; masks: per level [B, H_l, W_l] (True = padding).
            query_embed: [Q, 2C] learned queries (single-stage), None for two-stage.
            bbox_embed: per-decoder-layer box heads for iterative refinement, or None.
            enc_class_embed, enc_bbox_embed: two-stage heads scoring and refining the proposals.
            num_proposals: two-stage, proposals that become queries (default ``two_stage_num_proposals``;
                the training aids' one-to-many queries take the next ones).
            extra_box_queries: two-stage, queries appended after the proposals (denoising): content
                [B, E, C] and reference boxes [B, E, 4] in logit space, embedded as proposals are.
            self_attn_mask: [B * nhead, T, T] bool between the decoder's queries, or None.

        Returns:
            hs [L_dec, B, Q, C]; init_reference [B, Q, 2 or 4]; inter_references [L_dec, B, Q, 2 or 4];
            two-stage only (else None): enc_outputs_class [B, S, K] and enc_outputs_coord_unact
            [B, S, 4] (logits; +inf at invalid positions).
        """
        src_flat, mask_flat, pos_flat, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            h, w = src.shape[-2:]
            shapes.append((int(h), int(w)))
            src_flat.append(src.flatten(2).transpose(1, 2))  # [B, HW, C]
            mask_flat.append(mask.flatten(1))  # [B, HW]
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flat, 1)  # [B, S, C]
        mask_flatten = torch.cat(mask_flat, 1)  # [B, S]
        lvl_pos_embed = torch.cat(pos_flat, 1)  # [B, S, C]
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flatten.device)  # [L, 2]
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        level_start_index = torch.as_tensor(starts, dtype=torch.long, device=src_flatten.device)  # [L]
        valid_ratios = torch.stack([self.valid_ratios(m) for m in masks], 1)  # [B, L, 2] float32, even under autocast

        memory = self.encoder(src_flatten, shapes, spatial_shapes, level_start_index, valid_ratios, lvl_pos_embed,
                              mask_flatten)
        b, s, c = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            if enc_class_embed is None or enc_bbox_embed is None:
                raise ValueError("two-stage needs the encoder class and box heads")
            k = self.two_stage_num_proposals if num_proposals is None else num_proposals
            if k > s:
                raise InvalidInputError(
                    f"two-stage selects {k} proposals but the image gives only {s} encoder positions "
                    f"(feature maps {shapes}); use larger images or fewer model.num_queries "
                    "(and model.training_aids.one_to_many.num_queries)"
                )
            output_memory, output_proposals, _ = self.encoder_output_proposals(memory, mask_flatten, shapes)
            enc_outputs_class = enc_class_embed(output_memory)  # [B, S, K]
            enc_outputs_coord_unact = enc_bbox_embed(output_memory) + output_proposals  # [B, S, 4]
            # Rank every position by the foreground (class 0) logit of the binary encoder targets, as
            # the official implementation does: padding and border positions are not excluded (their
            # memory is zeroed, so they share one logit that training pushes down), which keeps the
            # outputs of converted official / Hugging Face checkpoints identical.
            topk = torch.topk(enc_outputs_class[..., 0], k, dim=1)[1]  # [B, k]
            topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1, topk.unsqueeze(-1).expand(-1, -1, 4))
            topk_coords_unact = topk_coords_unact.detach()  # proposals are targets, not a gradient path
            reference_points = topk_coords_unact.sigmoid()  # [B, k, 4]
            pos_trans_out = self.pos_trans_norm(self.pos_trans(self.proposal_pos_embed(topk_coords_unact)))
            query_pos, tgt = torch.split(pos_trans_out, c, dim=2)  # [B, k, C] each
            if self.encoder_content:
                tgt = tgt + torch.gather(output_memory, 1, topk.unsqueeze(-1).expand(-1, -1, c))  # [B, k, C]
            if extra_box_queries is not None:
                extra_content, extra_boxes_unact = extra_box_queries
                extra_pos = self.pos_trans_norm(self.pos_trans(self.proposal_pos_embed(extra_boxes_unact)))[..., :c]
                tgt = torch.cat([tgt, extra_content], 1)
                query_pos = torch.cat([query_pos, extra_pos], 1)
                reference_points = torch.cat([reference_points, extra_boxes_unact.sigmoid()], 1)
        else:
            if query_embed is None:
                raise ValueError("single-stage Deformable DETR needs learned query embeddings")
            query_pos, tgt = torch.split(query_embed, c, dim=1)  # [Q, C] each
            query_pos = query_pos.unsqueeze(0).expand(b, -1, -1)
            tgt = tgt.unsqueeze(0).expand(b, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()  # [B, Q, 2]
        init_reference = reference_points
        hs, inter_references = self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index,
                                            valid_ratios, query_pos, mask_flatten, bbox_embed, self_attn_mask)
        return hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact
