"""Training aids leave the matching queries and the inference model alone.

No information flows from the denoising queries, the other query groups or the one-to-many queries
into the matching queries (their attention mask): perturbing everything they are made of leaves
the matching outputs equal, and equal to the same model's training forward without aids. In eval
mode the model is the plain one: same parameters in use, same outputs, and checkpoints load
across (with aids -> without, and back).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.models import aids_cases
from tests.models.conftest import random_targets

CASES = sorted(aids_cases.CASES)


def _matching(out: dict, q: int) -> list[torch.Tensor]:
    """The group-0 predictions of every decoder layer (what inference decodes)."""
    sets = [out, *out.get("aux_outputs", [])]
    return [s[key][:, :q] for s in sets for key in ("pred_logits", "pred_boxes")]


def _max_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("case", CASES)
def test_matching_queries_see_nothing_of_the_other_queries(case):
    model = aids_cases.model(case).train()
    q = model.num_queries
    x = aids_cases.images()
    first_targets = random_targets([3, 1], aids_cases.NUM_CLASSES, seed=0)
    with torch.no_grad():
        torch.manual_seed(0)
        first = model(x, None, first_targets)
        # Change every input of the extra queries: other targets (other denoising boxes, labels and
        # counts, hence other padding), other noise, other group and one-to-many queries, another
        # label embedding.
        for name, p in model.training_aids.named_parameters():
            p.add_(torch.randn_like(p) * 3.0)
        torch.manual_seed(1)
        second = model(x, None, random_targets([1, 4], aids_cases.NUM_CLASSES, seed=5))
        plain = aids_cases.model(case, aids=False).train()
        plain.load_state_dict(model.state_dict())
        reference = plain(x)
    extras = [k for k in ("one_to_many", "denoising", "query_groups") if k in first]
    assert len(extras) == 2, extras  # the case exercises the extra queries it claims to
    assert _max_gap(_matching(first, q), _matching(second, q)) <= 1e-6
    assert _max_gap(_matching(first, q), _matching(reference, q)) <= 1e-5
    # The extra queries did change: the perturbation reached them (two-stage one-to-many queries
    # are encoder proposals, untouched; there the denoising queries are the ones that changed).
    changed = [first[k]["pred_logits"] for k in ("denoising", "one_to_many") if k in first][0]
    changed_too = [second[k]["pred_logits"] for k in ("denoising", "one_to_many") if k in second][0]
    assert changed.shape != changed_too.shape or float((changed - changed_too).abs().max()) > 1e-3


def test_query_groups_and_one_to_many_do_not_see_each_other():
    model = aids_cases.model("detr").train()
    q = model.num_queries
    x = aids_cases.images()
    with torch.no_grad():
        before = model(x)
        group_queries = model.training_aids.group_queries.weight
        group_queries[q:].add_(5.0)  # group 2 only (group 1 is rows 0..q-1 of the extra groups)
        after = model(x)
    assert float((before["pred_logits"][:, : 2 * q] - after["pred_logits"][:, : 2 * q]).abs().max()) <= 1e-6
    assert float((before["pred_logits"][:, 2 * q :] - after["pred_logits"][:, 2 * q :]).abs().max()) > 1e-3
    gap = (before["one_to_many"]["pred_logits"] - after["one_to_many"]["pred_logits"]).abs().max()
    assert float(gap) <= 1e-6


def test_denoising_queries_see_only_their_group_and_not_the_padding():
    """A denoising query's output depends on its own group (and group 0) only: perturbing the
    other group's boxes, or padding it out with another image's targets, changes nothing."""
    model = aids_cases.model("detr_two_stage").train()
    x = aids_cases.images(batch=1)
    targets = random_targets([2], aids_cases.NUM_CLASSES, seed=3)
    dn = model.training_aids.denoising
    with torch.no_grad():
        torch.manual_seed(0)
        batch = dn(targets)
        model.training_aids.denoising = _Fixed(batch)
        first = model(x, None, targets)["denoising"]
        moved = batch.boxes_unact.clone()
        moved[:, batch.slots :] += 2.0  # group 1's copies
        model.training_aids.denoising = _Fixed(_replace(batch, boxes_unact=moved))
        second = model(x, None, targets)["denoising"]
    # Padding: beside an image with more targets (hence padding slots in its groups), an image's
    # denoising outputs are those it gets alone (the noise is drawn image by image, in order).
    model.training_aids.denoising = dn
    two_images = torch.cat([x, aids_cases.images(batch=1, seed=7)])
    with torch.no_grad():
        torch.manual_seed(3)
        alone = model(x, None, targets)["denoising"]
        torch.manual_seed(3)
        beside = model(two_images, None, targets + random_targets([4], aids_cases.NUM_CLASSES, seed=4))["denoising"]
    assert beside["pred_logits"].shape[1] > alone["pred_logits"].shape[1]
    assert not beside["valid"][0].all()  # image 0 has padding slots in the pair
    got = beside["pred_logits"][0][beside["valid"][0]]
    assert float((got - alone["pred_logits"][0][alone["valid"][0]]).abs().max()) <= 1e-5
    # Logits: a fresh two-stage box head predicts zero offsets, its boxes would be the inputs.
    s = batch.slots
    assert float((first["pred_logits"][:, :s] - second["pred_logits"][:, :s]).abs().max()) <= 1e-6
    assert float((first["pred_logits"][:, s:] - second["pred_logits"][:, s:]).abs().max()) > 1e-3


class _Fixed(torch.nn.Module):
    """Stands in for DenoisingQueries: hands out a prepared batch."""

    def __init__(self, batch) -> None:
        super().__init__()
        self.batch = batch

    def forward(self, targets):
        return self.batch


def _replace(batch, **changes):
    return dataclasses.replace(batch, **changes)


@pytest.mark.parametrize("case", CASES)
def test_inference_model_is_unchanged(case):
    """Same seed: the parameters of the plain model are exactly the aided model's minus its
    ``training_aids.`` entries; eval outputs are equal; checkpoints load both ways (strict)."""
    aided = aids_cases.model(case, seed=4).eval()
    plain = aids_cases.model(case, aids=False, seed=4).eval()
    aided_state, plain_state = aided.state_dict(), plain.state_dict()
    extra = sorted(set(aided_state) - set(plain_state))
    assert extra and all(k.startswith("training_aids.") for k in extra)
    assert set(plain_state) <= set(aided_state)
    for key, value in plain_state.items():
        assert torch.equal(value, aided_state[key]), key
    x = aids_cases.images()
    with torch.no_grad():
        expected = plain(x)
        got = aided(x)
        assert sorted(got) == sorted(expected)
        assert torch.equal(got["pred_logits"], expected["pred_logits"])
        assert torch.equal(got["pred_boxes"], expected["pred_boxes"])
        # A checkpoint trained with the aids loads into a model built without them, and back.
        for p in aided.parameters():
            p.add_(0.01)
        fresh_plain = aids_cases.model(case, aids=False, seed=9).eval()
        assert fresh_plain.load_state_dict(aided.state_dict()) is not None
        assert torch.equal(fresh_plain(x)["pred_logits"], aided(x)["pred_logits"])
        fresh_aided = aids_cases.model(case, seed=9).eval()
        label_embed_before = {k: v.clone() for k, v in fresh_aided.training_aids.state_dict().items()}
        fresh_aided.load_state_dict(fresh_plain.state_dict())
        assert torch.equal(fresh_aided(x)["pred_logits"], aided(x)["pred_logits"])
        for k, v in fresh_aided.training_aids.state_dict().items():
            assert torch.equal(v, label_embed_before[k])  # kept their fresh values


def test_other_missing_or_unexpected_keys_still_fail():
    plain = aids_cases.model("detr", aids=False)
    state = plain.state_dict()
    state["training_aid.typo"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="training_aid.typo"):
        plain.load_state_dict(state)
    aided = aids_cases.model("detr")
    state = aided.state_dict()
    del state["class_embed.weight"]
    with pytest.raises(RuntimeError, match="class_embed.weight"):
        aided.load_state_dict(state)


def test_onnx_export_of_a_model_trained_with_aids_is_the_plain_model(tmp_path):
    """Exported from training mode (as a trainer would leave it), the graph is the eval model's:
    onnxruntime reproduces the plain model's outputs."""
    ort = pytest.importorskip("onnxruntime")
    from detr.models.export import export_onnx

    aided = aids_cases.model("detr_two_stage", seed=2).train()
    plain = aids_cases.model("detr_two_stage", aids=False, seed=2).eval()
    path = export_onnx(aided, tmp_path / "aided.onnx", (aids_cases.IMAGE, aids_cases.IMAGE))
    assert aided.training  # the export restores the mode
    x = aids_cases.images()
    logits, boxes = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = plain(x)
    assert logits.shape == tuple(expected["pred_logits"].shape)
    assert float(abs(torch.from_numpy(logits) - expected["pred_logits"]).max()) <= 1e-4
    assert float(abs(torch.from_numpy(boxes) - expected["pred_boxes"]).max()) <= 1e-4
