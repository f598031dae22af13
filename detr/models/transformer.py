"""DETR's encoder-decoder transformer (Carion et al. 2020).

Encoder: self-attention over the flattened feature map with the position encoding added to queries
and keys. Decoder: self-attention between object queries, then cross-attention to the encoder
memory; it returns the (normed) output of every layer so the auxiliary losses can supervise them.
Post-norm by default as the paper; ``normalize_before`` switches to pre-norm (with a final encoder
LayerNorm). Attention is ``nn.MultiheadAttention`` (batch-first here; the parameter names are those
of the official code: ``self_attn``, ``multihead_attn``, ``linear1``, ``norm1`` ...).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from detr.models import inplace


class TransformerEncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, normalize_before: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(inplace.relu(self.linear1(x))))

    def forward(self, src: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        """src, pos [B, S, C]; key_padding_mask [B, S] (True = padding) -> [B, S, C]."""
        if self.normalize_before:
            x = self.norm1(src)
            q = k = x + pos
            src = src + self.dropout1(self.self_attn(q, k, x, key_padding_mask=key_padding_mask, need_weights=False)[0])
            return src + self.dropout2(self._ffn(self.norm2(src)))
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, key_padding_mask=key_padding_mask,
                                                            need_weights=False)[0]))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, normalize_before: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(inplace.relu(self.linear1(x))))

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        memory_key_padding_mask: torch.Tensor,
        self_attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tgt, query_pos [B, Q, C]; memory, pos [B, S, C]; mask [B, S]; self_attn_mask
        [B * nhead, Q, Q] bool (True = may not attend; training aids only) -> [B, Q, C]."""
        kpm = memory_key_padding_mask
        am = self_attn_mask
        if self.normalize_before:
            x = self.norm1(tgt)
            q = k = x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(q, k, x, attn_mask=am, need_weights=False)[0])
            x = self.norm2(tgt)
            attn = self.multihead_attn(x + query_pos, memory + pos, memory, key_padding_mask=kpm, need_weights=False)[0]
            tgt = tgt + self.dropout2(attn)
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, attn_mask=am, need_weights=False)[0]))
        attn = self.multihead_attn(tgt + query_pos, memory + pos, memory, key_padding_mask=kpm, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


class TransformerEncoder(nn.Module):
    def __init__(self, layer: TransformerEncoderLayer, num_layers: int, norm: nn.Module | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, src: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return self.norm(src) if self.norm is not None else src


class TransformerDecoder(nn.Module):
    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, norm: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        memory_key_padding_mask: torch.Tensor,
        self_attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> [L, B, Q, C]: the shared final LayerNorm applied to every layer's output."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, memory_key_padding_mask, self_attn_mask)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    """DETR transformer.

    Args:
        d_model: width C of features, queries and attention.
        nhead: attention heads (C must be divisible by it).
        num_encoder_layers, num_decoder_layers: depth of each stack (the encoder may be empty).
        dim_feedforward: hidden width of the feed-forward blocks.
        dropout: dropout in attention and feed-forward blocks.
        normalize_before: pre-norm layers (and a final encoder LayerNorm) instead of post-norm.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        enc_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        enc_norm = nn.LayerNorm(d_model) if normalize_before else None  # pre-norm leaves the last output unnormed
        self.encoder = TransformerEncoder(enc_layer, num_encoder_layers, enc_norm)
        dec_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.decoder = TransformerDecoder(dec_layer, num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, src: torch.Tensor, mask: torch.Tensor, query_embed: torch.Tensor, pos_embed: torch.Tensor,
        self_attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """src [B, C, H, W], mask [B, H, W] (True = padding), query_embed [Q, C], pos_embed [B, C, H, W],
        self_attn_mask [B * nhead, Q, Q] or None -> decoder outputs [L, B, Q, C], encoder memory [B, C, H, W]."""
        b, c, h, w = src.shape
        memory, pos_seq, mask_seq = self.encode(src, mask, pos_embed)
        query_pos = query_embed.unsqueeze(0).expand(b, -1, -1)  # [B, Q, C]
        # The decoder input starts at zero; the queries enter only as positional embeddings.
        hs = self.decoder(torch.zeros_like(query_pos), memory, pos_seq, query_pos, mask_seq, self_attn_mask)
        return hs, memory.transpose(1, 2).reshape(b, c, h, w)

    def encode(
        self, src: torch.Tensor, mask: torch.Tensor, pos_embed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The encoder alone, on flattened maps: src, pos_embed [B, C, H, W], mask [B, H, W] ->
        memory [B, HW, C], pos [B, HW, C], mask [B, HW] (what ``decoder`` takes)."""
        src_seq = src.flatten(2).transpose(1, 2)  # [B, HW, C]
        pos_seq = pos_embed.flatten(2).transpose(1, 2)  # [B, HW, C]
        mask_seq = mask.flatten(1)  # [B, HW]
        return self.encoder(src_seq, pos_seq, mask_seq), pos_seq, mask_seq
