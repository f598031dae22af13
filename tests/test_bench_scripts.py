"""Smoke runs of the benchmarks (bench/train_step.py, bench/profile_step.py, ...; bench/msda.py in tests/ops) on the
CPU: they run, and print the rows their README describes. Their numbers are not checked: speed is for benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.slow
def test_train_step_bench_runs_a_preset_on_the_cpu():
    done = _run("train_step.py", "--configs", "configs/deformable_detr_tiny.yaml", "--size", "64x96", "--batch", "1",
                "--amp", "none", "--device", "cpu", "--warmup", "1", "--steps", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("deformable_detr_tiny"))
    preset, amp, params, step_ms, best_ms, images_per_s, _peak, finite = row.split()
    assert amp == "none" and float(params) > 1 and float(step_ms) > 0 and finite == "True"


@pytest.mark.slow
def test_profile_step_splits_a_step_into_its_parts():
    done = _run("profile_step.py", "configs/deformable_detr_tiny.yaml", "--image-size", "96x96", "--batch", "2",
                "--steps", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line[:50].strip(): float(line[50:].split()[0]) for line in done.stdout.splitlines()
            if line.startswith("  ")}
    for part in ("data loading", "forward (total)", "forward: backbone", "forward: encoder",
                 "forward:   of which deformable attention", "criterion:   of which matching", "backward (total)",
                 "backward:   convolutions", "backward:   deformable attention", "optimizer (clip + AdamW)"):
        assert rows[part] > 0, part
    # The parts of the forward (not counting the deformable attention inside them) add up to no more than it.
    forward_parts = [v for k, v in rows.items() if k.startswith("forward: ") and "of which" not in k]
    assert sum(forward_parts) <= rows["forward (total)"] * 1.001


@pytest.mark.slow
def test_convergence_bench_plots_every_variant_and_logs_one_run(tmp_path):
    from detr.data.synth import generate_synthetic_dataset

    data = tmp_path / "shapes"
    generate_synthetic_dataset(data, format="coco", num_images=8, seed=0, image_size=(96, 96), val_fraction=0.25,
                               progress=False)
    small = "model.hidden_dim=32;model.nheads=4;model.enc_layers=1;model.dec_layers=1;model.dim_feedforward=32"
    size = "{name: resize, args: {size: 96, max_size: 100}}"
    shared = [f"data.train={{sources: [{{path: {data}, format: coco, split: train}}]}}",
              f"data.val={{sources: [{{path: {data}, format: coco, split: val}}]}}",
              f"data.transforms.train=[{size}, {{name: normalize}}]", f"data.transforms.val=[{size}, {{name: normalize}}]",
              "train.batch_size=2", "train.device=cpu"]
    done = _run("convergence.py", "--minutes", "0.01", "--eval-minutes", "0.01", "--out", str(tmp_path / "out"),
                "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                "--variant", f"detr-aids=configs/detr_tiny.yaml;model.detr.two_stage=true;"
                             f"model.training_aids.denoising.enabled=true;model.num_queries=4;{small}",
                "--variant", f"deformable=configs/deformable_detr_tiny.yaml;model.num_queries=4;{small}",
                *[arg for o in shared for arg in ("-o", o)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "convergence.png").stat().st_size > 0
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("detr-aids ", "deformable "))]
    assert [row[0] for row in rows] == ["detr-aids", "deformable"]
    assert "MLflow run" in done.stdout


def test_frozen_batchnorm_bench_compares_equal_outputs():
    done = _run("frozen_batchnorm.py", "--size", "64", "--batch", "1", "--rounds", "1", "--channels-last")
    assert done.returncode == 0, done.stderr[-3000:]
    apart = done.stdout.split("(relative to the largest): ")[1].splitlines()[0]
    differences = dict(item.rsplit(" ", 1) for item in apart.split(", "))
    assert set(differences) == {"one pass", "folded"} and all(float(v) < 1e-5 for v in differences.values())
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("  ")]
    assert [row[0] for row in rows] == ["forward", "forward+backward"]
    assert all(row[1] == "torchvision" and "folded" in row for row in rows)


def test_strided_conv_bench_compares_equal_weight_gradients():
    done = _run("strided_conv.py", "--sizes", "512x512", "--batch", "2", "--rounds", "1", "--threads", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(" 512x512")]
    assert [(row[1], row[2]) for row in rows] == [(network, stage) for network in ("resnet50", "resnet18")
                                                  for stage in ("layer2", "layer3", "layer4")]
    for row in rows:
        onednn_ms, split_ms, ratio, apart, used = float(row[-5]), float(row[-4]), row[-3], float(row[-2]), row[-1]
        assert onednn_ms > 0 and split_ms > 0 and ratio.endswith("x") and apart < 1e-5
    # Only ResNet-50's layer2 input ([2, 128, 128, 128], 16 MiB) is large enough for the split.
    assert [row[-1] for row in rows] == ["yes", "no", "no", "no", "no", "no"]
    refused = _run("strided_conv.py", "--sizes", "512")
    assert refused.returncode == 2 and "--sizes '512': expected HEIGHTxWIDTH" in refused.stderr
