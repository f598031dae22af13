"""In-place ReLU and masked fill only where autograd does not record them (detr.models.inplace): under
autograd an in-place op on a linear layer's (view) output becomes a CopySlices node, whose backward
clones the whole gradient."""

from __future__ import annotations

import torch
from torch import nn

from detr.models import inplace
from detr.models.deformable_layers import DeformableTransformerEncoderLayer
from detr.models.transformer import TransformerEncoderLayer


def _graph_nodes(output: torch.Tensor) -> set[str]:
    seen, names, stack = set(), set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_relu_runs_in_place_only_where_nothing_records_it():
    linear = nn.Linear(4, 6)
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        hidden = linear(x)
        assert inplace.relu(hidden) is hidden and hidden.min() >= 0
    hidden = linear(x)
    out = inplace.relu(hidden)
    assert out is not hidden and hidden.min() < 0  # the recorded output is left as it was
    assert "CopySlices" not in _graph_nodes(out)
    torch.testing.assert_close(out, torch.relu(hidden), rtol=0, atol=0)


def test_masked_fill_runs_in_place_only_where_nothing_records_it():
    linear = nn.Linear(4, 6)
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[True], [False], [True]])
    with torch.no_grad():
        hidden = linear(x)
        assert inplace.masked_fill(hidden, mask, 0.0) is hidden and not hidden[:, 0].any()
    hidden = linear(x)
    out = inplace.masked_fill(hidden, mask, 0.0)
    assert out is not hidden and hidden[:, 0].all()
    assert "CopySlices" not in _graph_nodes(out)
    torch.testing.assert_close(out, hidden.masked_fill(mask, 0.0), rtol=0, atol=0)


def test_training_graphs_of_the_encoder_layers_have_no_copy_slices():
    torch.manual_seed(0)
    src = torch.randn(2, 12, 32)
    pos = torch.randn(2, 12, 32)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, -3:] = True
    detr_layer = TransformerEncoderLayer(32, 4, 64, dropout=0.0, normalize_before=False)
    out = detr_layer(src, pos, padding)
    assert "CopySlices" not in _graph_nodes(out)

    layer = DeformableTransformerEncoderLayer(32, 64, dropout=0.0, n_levels=2, n_heads=4, n_points=2)
    shapes = torch.tensor([[3, 2], [2, 3]])
    starts = torch.tensor([0, 6])
    reference = torch.rand(2, 12, 2, 2)
    out = layer(src, pos, reference, shapes, starts, padding)
    assert "CopySlices" not in _graph_nodes(out)
    out.sum().backward()
    with torch.no_grad():  # inference takes the in-place forms and gives the same output
        again = layer(src, pos, reference, shapes, starts, padding)
    torch.testing.assert_close(again, out.detach(), rtol=0, atol=0)
