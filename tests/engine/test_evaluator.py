"""The Evaluator facade: batching invariance, input checks, distributed gather, speed."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detr.engine.evaluation import Evaluator
from detr.errors import ConfigError, InvalidInputError


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    np.testing.assert_array_equal(np.array(list(a.values())), np.array(list(b.values())))


def _feed(evaluator: Evaluator, predictions: list, batch_size: int) -> dict:
    for start in range(0, len(predictions), batch_size):
        evaluator.update(predictions[start : start + batch_size])
    return evaluator.compute()


def test_results_do_not_depend_on_batch_size_or_order(random_problem):
    dataset, predictions = random_problem(0, num_images=24, num_classes=3)
    by_one = _feed(Evaluator(dataset), predictions, 1)
    by_four = _feed(Evaluator(dataset), predictions, 4)
    order = np.random.default_rng(1).permutation(len(predictions))
    shuffled = _feed(Evaluator(dataset), [predictions[i] for i in order], 4)
    _same(by_one, by_four)
    _same(by_one, shuffled)
    assert by_one["eval/images"] == 24.0
    assert by_one["coco/AP50"] > 0.1 and by_one["voc/mAP50"] > 0.1
    names = {"coco/AP", "coco/AR_large", "coco/AP/class2", "voc/mAP50", "voc/mAP50_11pt", "voc/AP50/class0"}
    assert names <= set(by_one)


def test_tensors_and_arrays_give_the_same_numbers(random_problem):
    dataset, arrays = random_problem(2, num_images=10)
    _, tensors = random_problem(2, num_images=10, as_tensors=True)
    tensors = [{**p, "image_id": torch.tensor(p["image_id"])} for p in tensors]  # as a loader collates it
    _same(_feed(Evaluator(dataset), arrays, 3), _feed(Evaluator(dataset), tensors, 3))


def test_postprocess_output_names_and_half_precision_tensors_are_accepted(make_record, make_dataset):
    # The postprocess names the class ids "label_ids"; under autocast tensors may be bfloat16.
    dataset = make_dataset([make_record(1, [[0, 0, 32, 32]], [1])], ["a", "b"])
    evaluator = Evaluator(dataset)
    half = torch.bfloat16
    evaluator.update([{"image_id": torch.tensor([1]), "boxes": torch.tensor([[0.0, 0, 32, 32]], dtype=half),
                       "scores": torch.tensor([0.5], dtype=half), "label_ids": torch.tensor([1])}])  # fmt: skip
    metrics = evaluator.compute()
    assert metrics["coco/AP"] == pytest.approx(1.0) and metrics["voc/AP50/b"] == 1.0


def test_metric_subsets_and_unknown_metric(random_problem):
    dataset, predictions = random_problem(3, num_images=6)
    coco_only = _feed(Evaluator(dataset, metrics=("coco",)), predictions, 6)
    assert any(k.startswith("coco/") for k in coco_only) and not any(k.startswith("voc/") for k in coco_only)
    voc_only = _feed(Evaluator(dataset, metrics="voc"), predictions, 6)
    assert not any(k.startswith("coco/") for k in voc_only)
    with pytest.raises(ConfigError, match="'coco', 'voc'"):
        Evaluator(dataset, metrics=("coco", "map"))


def test_unknown_and_duplicate_image_ids_are_errors(random_problem):
    dataset, predictions = random_problem(4, num_images=5)
    evaluator = Evaluator(dataset)
    bad = {**predictions[0], "image_id": 999}
    with pytest.raises(InvalidInputError, match="image id 999"):
        evaluator.update([predictions[1], bad])
    assert evaluator.num_images == 0  # the rejected batch left nothing behind
    with pytest.raises(InvalidInputError, match="predicted twice"):
        evaluator.update([predictions[1], predictions[1]])
    evaluator.update([predictions[1]])
    with pytest.raises(InvalidInputError, match=f"image id {predictions[1]['image_id']!r} was predicted twice"):
        evaluator.update([predictions[1]])
    evaluator.reset()
    evaluator.update([predictions[1]])  # a new pass accepts it again
    assert evaluator.num_images == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"boxes": np.zeros((2, 3))}, r"shape \[K, 4\]"),
        ({"scores": np.zeros(5)}, "must have shape"),
        ({"labels": np.array([0, 7])}, "label 7 is outside"),
        ({"labels": np.array([0.0, 1.0])}, "integer class ids"),
        ({"scores": np.array([0.5, np.nan])}, "finite"),
        ({"boxes": np.array([[0, 0, 10, 10], [10, 0, 5, 10]])}, "x2 < x1"),
        ({"image_id": 1.5}, "must be an int or str"),
    ],
)
def test_malformed_predictions_name_the_image_and_the_problem(make_record, make_dataset, change, message):
    dataset = make_dataset([make_record(1, [[0, 0, 10, 10]], [0])], ["a", "b"])
    prediction = {"image_id": 1, "boxes": np.array([[0, 0, 10, 10], [1, 1, 9, 9]]),
                  "scores": np.array([0.9, 0.8]), "labels": np.array([0, 1])}  # fmt: skip
    with pytest.raises(InvalidInputError, match=message):
        Evaluator(dataset).update([{**prediction, **change}])
    missing = {k: v for k, v in prediction.items() if k != "scores"}
    with pytest.raises(InvalidInputError, match="lacks \\['scores'\\]"):
        Evaluator(dataset).update([missing])
    with pytest.raises(InvalidInputError, match="list of per-image prediction dicts"):
        Evaluator(dataset).update(prediction)


def test_partial_passes_empty_predictions_and_nothing_at_all(random_problem, make_record, make_dataset):
    dataset, predictions = random_problem(5, num_images=8)
    evaluator = Evaluator(dataset)
    evaluator.update(predictions[:3])
    assert evaluator.compute()["eval/images"] == 3.0
    assert evaluator.missing_image_ids() == [r.image_id for r in dataset.records[3:]]
    empty = Evaluator(dataset).compute()  # nothing predicted: undefined, not a crash
    assert empty["eval/images"] == 0.0
    assert math.isnan(empty["coco/AP"]) and math.isnan(empty["voc/mAP50"])
    one = make_dataset([make_record("x", [[0, 0, 40, 40]], [0])], ["a"])
    evaluator = Evaluator(one)
    evaluator.update([{"image_id": "x", "boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}])
    metrics = evaluator.compute()
    assert metrics["coco/AP"] == 0.0 and metrics["voc/mAP50"] == 0.0 and metrics["eval/detections"] == 0.0


def test_gather_is_the_identity_without_torch_distributed(random_problem):
    assert not dist.is_initialized()
    dataset, predictions = random_problem(6, num_images=5)
    evaluator = Evaluator(dataset)
    evaluator.update(predictions)
    before = evaluator.compute()
    evaluator.gather()
    _same(before, evaluator.compute())


def _gather_worker(rank: int, world_size: int, store: str, payload: bytes, out_dir: str) -> None:
    dataset, predictions = pickle.loads(payload)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        evaluator = Evaluator(dataset)
        mine = predictions[rank::world_size]
        if rank == world_size - 1:
            mine = mine + [predictions[0]]  # DistributedSampler pads the last round with repeats
        for start in range(0, len(mine), 3):
            evaluator.update(mine[start : start + 3])
        evaluator.gather()
        result = (evaluator.compute(), evaluator.repeated_across_ranks)
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_gather_across_two_processes_equals_one_process(tmp_path, random_problem):
    dataset, predictions = random_problem(7, num_images=15, num_classes=3)
    payload = pickle.dumps((dataset, predictions))
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "store"), payload, str(tmp_path)), nprocs=2, join=True)
    expected = _feed(Evaluator(dataset), predictions, 15)
    for rank in range(2):
        metrics, repeated = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        _same(metrics, expected)
        assert repeated == 1


