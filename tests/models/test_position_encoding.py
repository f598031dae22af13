"""Position encodings against the formulas of the papers, and their behaviour under padding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detr.errors import InvalidInputError
from detr.models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine, build_position_encoding


def _sine_by_formula(h: int, w: int, feats: int, offset: float) -> np.ndarray:
    """Channel 2i of each axis = sin(p / 10000^(2i/F)), channel 2i+1 = cos(p / 10000^(2i/F)), with
    p = (index + 1 + offset) / size * 2pi; y channels first, then x."""
    out = np.zeros((2 * feats, h, w))
    for y in range(h):
        for x in range(w):
            for axis, (index, size) in enumerate(((y, h), (x, w))):
                p = (index + 1 + offset) / size * 2 * math.pi
                for i in range(feats // 2):
                    freq = 10000 ** (2 * i / feats)
                    out[axis * feats + 2 * i, y, x] = math.sin(p / freq)
                    out[axis * feats + 2 * i + 1, y, x] = math.cos(p / freq)
    return out


@pytest.mark.parametrize("offset", [0.0, -0.5])
def test_sine_matches_the_formula(offset):
    h, w, feats = 3, 5, 8
    enc = PositionEmbeddingSine(feats, normalize=True, offset=offset)
    pos = enc(torch.zeros(1, 1, h, w), torch.zeros(1, h, w, dtype=torch.bool))
    assert pos.shape == (1, 2 * feats, h, w)
    np.testing.assert_allclose(pos[0].numpy(), _sine_by_formula(h, w, feats, offset), atol=1e-5)


def test_sine_is_the_same_on_the_valid_part_of_a_padded_map():
    enc = PositionEmbeddingSine(16, normalize=True)
    alone = enc(torch.zeros(1, 1, 4, 6), torch.zeros(1, 4, 6, dtype=torch.bool))
    mask = torch.ones(1, 7, 9, dtype=torch.bool)
    mask[:, :4, :6] = False
    padded = enc(torch.zeros(1, 1, 7, 9), mask)
    torch.testing.assert_close(padded[..., :4, :6], alone)


def test_learned_concatenates_column_then_row_embeddings():
    enc = PositionEmbeddingLearned(num_pos_feats=4)
    pos = enc(torch.zeros(2, 1, 3, 5), torch.zeros(2, 3, 5, dtype=torch.bool))
    assert pos.shape == (2, 8, 3, 5)
    torch.testing.assert_close(pos[1, :4, 2, 4], enc.col_embed.weight[4])
    torch.testing.assert_close(pos[0, 4:, 2, 4], enc.row_embed.weight[2])


def test_learned_rejects_maps_larger_than_its_table():
    enc = PositionEmbeddingLearned(num_pos_feats=4, max_size=50)
    with pytest.raises(InvalidInputError, match="51x10.*50x50"):
        enc(torch.zeros(1, 1, 51, 10), torch.zeros(1, 51, 10, dtype=torch.bool))


def test_build_position_encoding_kinds():
    sine = build_position_encoding("sine", 64, deformable=True)
    assert isinstance(sine, PositionEmbeddingSine) and sine.num_pos_feats == 32 and sine.offset == -0.5
    assert build_position_encoding("sine", 64, deformable=False).offset == 0.0
    assert isinstance(build_position_encoding("learned", 64, deformable=False), PositionEmbeddingLearned)
    with pytest.raises(ValueError, match="sine, learned"):
        build_position_encoding("rope", 64, deformable=False)
