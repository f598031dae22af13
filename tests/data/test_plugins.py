"""A team's own format as a plugin: a real package (tests/data/plugin_package) installed with pip,
found through its entry point by the CLI in a fresh process, converted to, inspected and trained on;
and the same class named as ``module:Class``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detr.config import RepairPolicy
from detr.data import load_dataset, write_dataset
from detr.data.formats.external import ENTRY_POINT_GROUP, available_plugins
from detr.data.synth import generate_synthetic_dataset
from detr.errors import DatasetFormatError, InvalidInputError

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(__file__).resolve().parent / "plugin_package"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The plugin package installed by pip into its own site directory (built from a copy, so the
    source tree gets no build/ or egg-info)."""
    work = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(PACKAGE, work / "src")
    site = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(source)],
        check=True, capture_output=True, text=True,
    )
    assert (site / "acme_formats" / "__init__.py").is_file()
    return site


@pytest.fixture(scope="module")
def synth_coco(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synth"
    generate_synthetic_dataset(out, format="coco", num_images=4, seed=2, image_size=(64, 64), val_fraction=0.5,
                               progress=False)
    return out


def run_cli(site: Path, *args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "detr.cli", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_installed_plugin_converts_inspects_and_trains(plugin_site, synth_coco, tmp_path):
    acme = tmp_path / "acme"
    out = run_cli(plugin_site, "data", "convert", str(synth_coco), "--to", "acme", "--out", str(acme), cwd=tmp_path)
    assert "-> " + str(acme) + " (acme)" in out
    assert sorted(p.name for p in acme.iterdir()) == ["classes.txt", "pics", "train.jsonl", "val.jsonl"]
    stats = run_cli(plugin_site, "data", "stats", str(acme), "--format", "acme", "--split", "train", cwd=tmp_path)
    source = load_dataset(synth_coco, split="train")
    assert f"{len(source)} images, {source.num_boxes} boxes" in stats

    checkpoints = tmp_path / "checkpoints"
    overrides = {
        "data.train": f"{{sources: [{{path: {acme}, format: acme, split: train}}]}}",
        "data.val": f"{{sources: [{{path: {acme}, format: acme, split: val}}]}}",
        "data.transforms.train": "[{name: resize, args: {size: 64, max_size: 96}}, {name: normalize}]",
        "data.transforms.val": "[{name: resize, args: {size: 64, max_size: 96}}, {name: normalize}]",
        "model.backbone.name": "resnet18", "model.hidden_dim": 32, "model.nheads": 4, "model.enc_layers": 1,
        "model.dec_layers": 1, "model.dim_feedforward": 64, "model.num_queries": 5,
        "train.batch_size": 2, "train.epochs": 1, "train.checkpoint.dir": str(checkpoints),
    }
    args = [a for k, v in overrides.items() for a in ("-o", f"{k}={v}")]
    run_cli(plugin_site, "train", "--no-track", *args, cwd=tmp_path)
    saved = sorted(checkpoints.glob("step-*.pt"))
    assert [p.name for p in saved] == ["step-00000001.pt"]  # 2 images, batch 2: one step
    payload = torch.load(saved[0], map_location="cpu", weights_only=True)
    classes = (acme / "classes.txt").read_text().split()
    assert payload["label_map"]["names"] == classes == list(source.label_map.names)


def test_entry_point_and_module_class_read_the_same_boxes(plugin_site, synth_coco, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    assert available_plugins()["acme"].value == "acme_formats:AcmeFormat"
    source = load_dataset(synth_coco, split="val")
    acme = write_dataset(source, tmp_path / "acme", "acme", split="val")
    for name in ("acme", "acme_formats:AcmeFormat"):
        dataset = load_dataset(acme, name)
        assert dataset.format == name and dataset.label_map == source.label_map
        for got, expected in zip(dataset, source, strict=True):
            np.testing.assert_array_equal(got.boxes, expected.boxes)
            np.testing.assert_array_equal(got.labels, expected.labels)
            assert got.image_path == acme / "pics" / expected.image_path.name


def test_plugin_data_gets_the_package_checks_and_messages(plugin_site, synth_coco, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    acme = write_dataset(load_dataset(synth_coco, split="val"), tmp_path / "acme", "acme", split="val")
    listing = acme / "val.jsonl"
    entry = json.loads(listing.read_text().splitlines()[0])
    x, y, w, h = entry["objects"][0]["xywh"]
    entry["objects"][0]["xywh"] = [64 - w + 0.5, y, w, h]  # 0.5 px outside the 64x64 image
    listing.write_text(json.dumps(entry) + "\n")
    with pytest.raises(DatasetFormatError, match=rf"^{listing}:1: objects\[0\]: box .* lies 0.5 px outside"):
        load_dataset(acme, "acme")
    dataset = load_dataset(acme, "acme", repair=RepairPolicy(clip_boxes_px=1))
    assert dataset.report.counts == {"repair: box clipped to the image (<= 1 px outside)": 1}
    entry["objects"][0]["class"] = "hexagon"
    listing.write_text(json.dumps(entry) + "\n")
    with pytest.raises(DatasetFormatError, match=rf"^{listing}:1: objects\[0\]: unknown class 'hexagon'"):
        load_dataset(acme, "acme")
    entry["objects"] = []
    entry["size"] = [65, 64]
    listing.write_text(json.dumps(entry) + "\n")
    with pytest.raises(DatasetFormatError, match=rf"^{listing}:1: annotated image size 65x64 does not match"):
        load_dataset(acme, "acme")


def test_format_names_that_resolve_to_nothing_are_named_errors(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(PACKAGE))
    with pytest.raises(InvalidInputError, match=rf"unknown dataset format 'acmee'.*entry points in '{ENTRY_POINT_GROUP}'"):
        load_dataset(tmp_path, "acmee")
    with pytest.raises(InvalidInputError, match=r"'no_such_module:X': cannot import module 'no_such_module'"):
        load_dataset(tmp_path, "no_such_module:X")
    with pytest.raises(InvalidInputError, match=r"module 'acme_formats' has no 'Nope'"):
        load_dataset(tmp_path, "acme_formats:Nope")
    with pytest.raises(InvalidInputError, match=r"'acme_formats:json': .* is not a subclass of .*DatasetFormat"):
        load_dataset(tmp_path, "acme_formats:json")
