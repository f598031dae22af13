"""`detr register` and `detr predict` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from mlflow import MlflowClient
from PIL import Image

from deploy.detector import DetectionParams, Detector
from detr.cli import main
from tests.deploy.odd_images import odd_images


def test_register_then_predict_with_the_alias(detr_checkpoint, tracking_uri, request_images, tmp_path, capsys):
    assert main(["register", str(detr_checkpoint), "--name", "cli-shapes", "--alias", "prod"]) == 0
    out = capsys.readouterr().out
    assert "registered as 'cli-shapes' version 1, alias 'prod'" in out
    assert "mlflow models serve -m models:/cli-shapes@prod --env-manager local" in out
    assert str(MlflowClient().get_model_version_by_alias("cli-shapes", "prod").version) == "1"

    paths = []
    for i, pixels in enumerate(request_images[:2]):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    result, drawn = tmp_path / "out" / "detections.json", tmp_path / "drawn"
    argv = ["predict", "models:/cli-shapes@prod", *map(str, paths), "--score-threshold", "0.2",
            "--json", str(result), "--draw", str(drawn)]
    assert main(argv) == 0
    records = json.loads(result.read_text())
    expected = Detector.from_checkpoint(detr_checkpoint).detect(
        [torch.from_numpy(p).permute(2, 0, 1) for p in request_images[:2]], DetectionParams(score_threshold=0.2))
    assert [r["image"] for r in records] == [str(p) for p in paths]
    for got, want in zip(records, expected):
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6)
        assert got["labels"] == want["labels"]
    for path, pixels in zip(paths, request_images):
        with Image.open(drawn / path.name) as image:
            assert image.size == (pixels.shape[1], pixels.shape[0])


def test_predict_from_a_checkpoint_prints_json(detr_checkpoint, request_images, tmp_path, capsys):
    path = tmp_path / "a.png"
    Image.fromarray(request_images[2]).save(path)
    assert main(["predict", str(detr_checkpoint), str(path), "--score-threshold", "0", "--max-detections", "2"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert len(record["scores"]) == 2 and record["image_size"] == [90, 150]


def test_cli_errors_name_the_problem(detr_checkpoint, tracking_uri, tmp_path, capsys):
    assert main(["predict", str(detr_checkpoint), str(tmp_path / "missing.png")]) == 2
    assert "missing.png: image file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["predict", str(detr_checkpoint), str(broken)]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main(["predict", "models:/no-such-model@champion", str(broken)]) == 2
    assert "cannot load model models:/no-such-model@champion" in capsys.readouterr().err
    assert main(["register", str(tmp_path / "nope.pt"), "--name", "x"]) == 2
    assert "nope.pt: checkpoint file not found" in capsys.readouterr().err
    assert main(["predict", str(detr_checkpoint), str(broken), "--box-format", "xyxy",
                 "--score-threshold", "7"]) == 2
    assert "score_threshold must be a number in [0, 1]" in capsys.readouterr().err


def test_predict_answers_every_kind_of_image(detr_checkpoint, tmp_path, capsys):
    """Strips, grayscale, 16-bit, CMYK, RGBA, palette, EXIF-rotated: a record each, in displayed pixels."""
    images = odd_images()
    paths = []
    for odd in images:
        paths.append(tmp_path / f"{odd.name}{odd.suffix}")
        paths[-1].write_bytes(odd.data)
    result = tmp_path / "detections.json"
    assert main(["predict", str(detr_checkpoint), *map(str, paths), "--score-threshold", "0",
                 "--json", str(result), "--draw", str(tmp_path / "drawn")]) == 0
    records = json.loads(result.read_text())
    assert [r["image"] for r in records] == [str(p) for p in paths]
    for odd, record in zip(images, records):
        assert record["image_size"] == list(odd.size), odd.name
        assert len(record["scores"]) > 0, odd.name  # threshold 0: every query's best class is kept
        for box in record["boxes"]:
            assert 0 <= box[0] <= box[2] <= odd.size[0] and 0 <= box[1] <= box[3] <= odd.size[1]
        with Image.open(tmp_path / "drawn" / f"{odd.name}.png") as drawn:
            assert drawn.size == odd.size


def test_predict_draw_without_detections_is_quiet(detr_checkpoint, request_images, tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(request_images[0]).save(path)
    code = subprocess.run(
        [sys.executable, "-W", "default", "-m", "detr.cli", "predict", str(detr_checkpoint), str(path),
         "--score-threshold", "1", "--json", str(tmp_path / "d.json"), "--draw", str(tmp_path / "drawn")],
        capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stderr
    assert json.loads((tmp_path / "d.json").read_text())[0]["scores"] == []
    assert "warn" not in code.stderr.lower(), code.stderr
    with Image.open(tmp_path / "drawn" / "a.png") as drawn:
        np.testing.assert_array_equal(np.asarray(drawn), request_images[0])
