"""Dataset health on a hand-built dataset (counts worked out by hand), in `detr data stats` (text and
plot) and in what training logs to MLflow."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from detr.data.dataset import DetectionDataset
from detr.data.health import compute_health, plot_health
from detr.data.labelmap import LabelMap
from detr.errors import InvalidInputError
from tests.data.test_stats_show import make_record


@pytest.fixture
def handmade(tmp_path) -> DetectionDataset:
    a = make_record(tmp_path, "a", 200, 100, [
        [0, 0, 10, 40],      # cat, 10 px wide: small for stride 32 and 16, not for 8
        [50, 50, 150, 100],  # cat
        [51, 50, 150, 100],  # cat, IoU 0.99 with the previous one: a near-duplicate
        [50, 50, 150, 100],  # dog, the same box in another class: not a duplicate
    ], [0, 0, 0, 1])
    b = make_record(tmp_path, "b", 60, 40, [], [])
    c = make_record(tmp_path, "c", 300, 300, [[0, 0, 200, 20], [10, 10, 210, 200]], [0, 0])  # 20 px high: small
    return DetectionDataset((a, b, c), LabelMap(("cat", "dog", "bird")), "hand", "mixed")


def test_counts_by_hand(handmade):
    health = compute_health(handmade, stride=32)
    assert health.boxes_per_class.tolist() == [5, 1, 0]
    assert health.small_per_class.tolist() == [2, 0, 0]
    assert health.small_examples == ("a box 0", "c box 0")
    assert health.near_duplicates == 1 and health.duplicate_examples == ("a box 2",)
    assert health.images_without_boxes == 1 and health.empty_examples[0].endswith("b.png")
    assert health.imbalance == math.inf
    quantiles = health.size_quantiles()
    assert list(quantiles) == ["cat", "dog"]
    cat = sorted([20.0, math.sqrt(100 * 50), math.sqrt(99 * 50), math.sqrt(200 * 20), math.sqrt(200 * 190)])
    assert quantiles["cat"][0] == pytest.approx(cat[0]) and quantiles["cat"][2] == pytest.approx(cat[2])
    assert quantiles["cat"][4] == pytest.approx(cat[4])
    warnings = health.warnings()
    assert warnings[0].startswith("2 of 6 boxes are smaller than the model's output stride (32 px wide or high): 2 cat")
    assert warnings[1].startswith("1 near-duplicate boxes (same class, IoU >= 0.9")
    assert warnings[2].startswith("1 of 3 images have no boxes")
    assert warnings[3] == "1 classes have no boxes: ['bird']"
    assert compute_health(handmade, stride=16).small_boxes == 1
    assert compute_health(handmade, stride=8).small_boxes == 0
    assert health.metrics() == {"small_boxes": 2.0, "near_duplicate_boxes": 1.0, "images_without_boxes": 1.0,
                                "class_imbalance": 6.0}


def test_imbalance_and_a_healthy_dataset(tmp_path):
    many = [make_record(tmp_path, f"m{i}", 100, 100, [[i, 0, i + 50, 50]], [0]) for i in range(11)]
    one = make_record(tmp_path, "one", 100, 100, [[0, 0, 50, 50]], [1])
    unbalanced = compute_health(DetectionDataset((*many, one), LabelMap(("a", "b")), "u", "coco"))
    assert unbalanced.imbalance == 11.0
    assert unbalanced.warnings() == ["class imbalance 11.0:1 (> 10): 'a' has 11 boxes, 'b' 1"]
    balanced = compute_health(DetectionDataset((*many[:2], one), LabelMap(("a", "b")), "ok", "coco"))
    assert balanced.warnings() == [] and "no warnings" in balanced.format()
    with pytest.raises(InvalidInputError, match="stride=0"):
        compute_health(DetectionDataset((), LabelMap(("a",)), "e", "coco"), stride=0)


def test_stats_command_prints_health_and_saves_both_plots(handmade, tmp_path, capsys):
    from detr.cli import main
    from detr.data import write_dataset

    root = write_dataset(handmade, tmp_path / "coco", "coco", split="train")
    plot = tmp_path / "plots" / "stats.png"
    assert main(["data", "stats", str(root), "--stride", "16", "--plot", str(plot)]) in (0, None)
    out = capsys.readouterr().out
    assert "health of" in out and "output stride 16 px" in out
    assert "1 of 6 boxes are smaller than the model's output stride (16 px wide or high): 1 cat" in out
    assert "1 near-duplicate boxes" in out and "box size per class" in out
    for path in (plot, tmp_path / "plots" / "stats_health.png"):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 500


def test_plot_returns_a_figure_and_writes_png(handmade, tmp_path):
    figure = plot_health(compute_health(handmade), tmp_path / "health.png")
    assert len(figure.axes) == 2
    assert (tmp_path / "health.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_logs_health_with_the_models_stride(handmade, tmp_path, monkeypatch):
    import mlflow

    from detr.tracking import MlflowCallback

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    model = torch.nn.Sequential(torch.nn.Linear(1, 1))
    model[0].strides = [16, 32]  # what a backbone carries
    callback = MlflowCallback(config={"a": 1}, label_map=handmade.label_map.to_dict(),
                              datasets={"training": (handmade, [tmp_path])})
    with mlflow.start_run() as run:
        callback.on_train_start(SimpleNamespace(is_main=True, model=model), SimpleNamespace(step=0))
    client = mlflow.MlflowClient(uri)
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["data/training/small_boxes"] == 1.0  # stride 16: only the 10 px wide box
    assert metrics["data/training/near_duplicate_boxes"] == 1.0
    files = {f.path for f in client.list_artifacts(run.info.run_id, "data")}
    assert files == {"data/training_health.txt", "data/training_health.png"}
    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/data/training_health.txt")
    assert "output stride 16 px" in text and np.isfinite(metrics["data/training/class_imbalance"])
