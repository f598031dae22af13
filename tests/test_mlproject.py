"""The MLflow Project: conda.yaml in step with pyproject.toml, entry points whose commands reach the
CLI intact, and `mlflow run` attaching training and evaluation to the run it starts."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from detr.cli import _parser
from detr.cli.common import _overrides
from detr.config import load_config
from detr.data.synth import generate_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PINNED = {"torch", "torchvision"}  # exact versions in conda.yaml, ranges in pyproject.toml


def conda_pip_requirements() -> dict[str, Requirement]:
    environment = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_lists = [entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict)]
    assert len(pip_lists) == 1
    requirements = [Requirement(line) for line in pip_lists[0]]
    return {r.name.lower(): r for r in requirements}


def test_conda_env_lists_the_pyproject_dependencies_with_the_same_versions():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {r.name.lower(): r for r in map(Requirement, project["dependencies"])}
    conda = conda_pip_requirements()
    assert conda.keys() == declared.keys(), {"missing": declared.keys() - conda.keys(),
                                             "extra": conda.keys() - declared.keys()}
    for name, requirement in declared.items():
        listed = conda[name]
        assert listed.extras == requirement.extras, name
        if name in PINNED:
            (spec,) = listed.specifier
            assert spec.operator == "==" and requirement.specifier.contains(spec.version), (name, str(listed))
        else:
            assert listed.specifier == requirement.specifier, (name, str(listed), str(requirement))

    # The pins are the ones the Makefile installs (and the native kernels are built against).
    makefile_pins = re.search(r"^TORCH_PINS := (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    assert sorted(makefile_pins.split()) == sorted(str(conda[name]) for name in PINNED)

    environment = yaml.safe_load((REPO / "conda.yaml").read_text())
    assert "python=3.11" in environment["dependencies"]
    assert project["requires-python"] == ">=3.10,<3.13"


def load_mlproject():
    from mlflow.projects._project_spec import load_project

    return load_project(str(REPO))


def test_entry_points_take_a_config_and_overrides_but_no_hyperparameters():
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    assert spec["conda_env"] == "conda.yaml"
    entry_points = spec["entry_points"]
    assert {"main", "train", "evaluate"} <= entry_points.keys()
    # Hyperparameters are changed only through `overrides` (validated by the config schema).
    assert set(entry_points["train"]["parameters"]) == {"config", "overrides"}
    assert set(entry_points["evaluate"]["parameters"]) == {"checkpoint", "config", "overrides", "split"}


@pytest.mark.parametrize("overrides", [
    "",
    "train.epochs=1",
    "train.lr=2e-4 model.hidden_dim=64 'data.transforms.val=[{name: resize, args: {size: 64}}]'",
    "tracking.run_name=\"it's a run\"",
])
def test_train_command_reaches_the_cli_with_the_same_overrides(overrides, tmp_path):
    config = tmp_path / "my config.yaml"  # a space: MLflow's quoting must keep it one argument
    config.write_text("train: {epochs: 3}\n")
    command = load_mlproject().get_entry_point("train").compute_command(
        {"config": str(config), "overrides": overrides}, storage_dir=None)
    tokens = shlex.split(command)
    assert tokens[:3] == ["python", "-m", "detr.cli"]
    args = _parser().parse_args(tokens[3:])
    assert args.command == "train" and args.config == config
    assert _overrides(args) == shlex.split(overrides)
    load_config(args.config, _overrides(args))  # valid for the config schema


def test_register_command_reaches_the_cli(tmp_path):
    command = load_mlproject().get_entry_point("register").compute_command(
        {"checkpoint": str(tmp_path / "best.pt"), "name": "shapes"}, storage_dir=None)
    args = _parser().parse_args(shlex.split(command)[3:])
    assert args.command == "register" and args.checkpoint == tmp_path / "best.pt"
    assert (args.name, args.alias) == ("shapes", "champion")


def test_evaluate_command_reaches_the_cli(tmp_path):
    command = load_mlproject().get_entry_point("evaluate").compute_command(
        {"checkpoint": str(tmp_path / "best.pt"), "config": "configs/detr_tiny.yaml",
         "overrides": "data.num_workers=0", "split": "train"}, storage_dir=None)
    args = _parser().parse_args(shlex.split(command)[3:])
    assert args.command == "evaluate" and args.checkpoint == tmp_path / "best.pt"
    assert args.config == Path("configs/detr_tiny.yaml") and args.split == "train"
    assert _overrides(args) == ["data.num_workers=0"]


def test_tune_command_reaches_the_cli():
    command = load_mlproject().get_entry_point("tune").compute_command(
        {"config": "configs/detr_tiny.yaml", "space": "configs/tune/tiny_lr.yaml", "samples": "4",
         "overrides": "train.epochs=2 data.num_workers=0"}, storage_dir=None)
    args = _parser().parse_args(shlex.split(command)[3:])
    assert args.command == "tune" and args.config == Path("configs/detr_tiny.yaml")
    assert args.space == Path("configs/tune/tiny_lr.yaml") and args.samples == 4
    assert _overrides(args) == ["train.epochs=2", "data.num_workers=0"]
    # The search's parameters are the space file's, not the entry point's.
    assert set(yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["tune"]["parameters"]) == {
        "config", "space", "samples", "overrides"}


# ---------------------------------------------------------------------------------------------
# `mlflow run` end to end
# ---------------------------------------------------------------------------------------------


def micro_config_yaml(data: Path, checkpoints: Path) -> str:
    config = {
        "data": {
            "train": {"sources": [{"path": str(data), "format": "coco", "split": "train"}]},
            "val": {"sources": [{"path": str(data), "format": "coco", "split": "val"}]},
            "transforms": {
                "train": [{"name": "resize", "args": {"size": 64, "max_size": 80}}, {"name": "normalize"}],
                "val": [{"name": "resize", "args": {"size": 64, "max_size": 80}}, {"name": "normalize"}],
            },
        },
        "model": {"backbone": {"name": "resnet18", "trainable_layers": 0}, "hidden_dim": 32, "nheads": 4,
                  "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 64, "num_queries": 6},
        "train": {"epochs": 3, "batch_size": 2, "device": "cpu", "checkpoint": {"dir": str(checkpoints)}},
        "tracking": {"log_system_metrics": False, "num_overlay_images": 0},
    }
    return yaml.safe_dump(config)


def project_experiment(tmp_path: Path) -> str:
    """A tracking URI in ``tmp_path`` with the experiment "project", whose artifacts stay in ``tmp_path``
    (created on the fly by ``mlflow run``, they would go to ./mlruns of the repository)."""
    import mlflow

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri).create_experiment("project", artifact_location=str(tmp_path / "artifacts"))
    return tracking_uri


def mlflow_run(entry_point: str, params: dict[str, str], tracking_uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [str(VENV_BIN / "mlflow"), "run", ".", "-e", entry_point, "--env-manager", "local",
               "--experiment-name", "project", *[a for k, v in params.items() for a in ("-P", f"{k}={v}")]]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.slow
def test_mlflow_run_train_then_evaluate_log_into_the_project_runs(tmp_path):
    import mlflow

    data = generate_synthetic_dataset(tmp_path / "synth", format="coco", num_images=6, seed=5, image_size=(96, 96),
                                      val_fraction=1 / 3, progress=False)
    checkpoints = tmp_path / "checkpoints"
    config = tmp_path / "micro.yaml"
    config.write_text(micro_config_yaml(data, checkpoints))
    tracking_uri = project_experiment(tmp_path)
    overrides = "train.epochs=1 tracking.run_name=from-mlproject"
    mlflow_run("train", {"config": str(config), "overrides": overrides}, tracking_uri)

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("project")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "detr train opened its own run instead of attaching to the project's"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    # MLflow's parameters and the resolved config's, in the one run; the override won over the file.
    # (MLflow logs parameter values as it quoted them for the shell.)
    assert run.data.params["overrides"] == shlex.quote(overrides) and run.data.params["config"] == str(config)
    assert run.data.params["train.epochs"] == "1" and run.data.params["model.hidden_dim"] == "32"
    assert {"train/loss", "coco/AP", "epoch"} <= run.data.metrics.keys()
    assert "checkpoints/last.pt" in {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert (tmp_path / "artifacts" / run.info.run_id / "artifacts" / "checkpoints" / "last.pt").is_file()

    last = sorted(checkpoints.glob("step-*.pt"))[-1]
    mlflow_run("evaluate", {"checkpoint": str(last), "config": str(config)}, tracking_uri)
    evaluation = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_id != run.info.run_id]
    assert len(evaluation) == 1
    evaluated = evaluation[0]
    assert evaluated.data.tags["mlflow.project.entryPoint"] == "evaluate"
    assert evaluated.data.tags["evaluated_checkpoint"] == str(last) and evaluated.data.tags["evaluated_split"] == "val"
    # The same weights on the same images: the numbers training reported for its last epoch.
    for key in ("coco/AP", "coco/AP50", "voc/mAP50", "eval/images", "eval/detections"):
        assert evaluated.data.metrics[key] == pytest.approx(run.data.metrics[key], abs=1e-6), key


# The demo's preset shrunk to seconds: the same pipeline, a micro model, one epoch.
MICRO_DEMO_OVERRIDES = ("model.hidden_dim=32 model.nheads=4 model.enc_layers=1 model.dec_layers=1 "
                        "model.dim_feedforward=64 model.num_queries=6 model.deformable.n_levels=2 "
                        "model.backbone.trainable_layers=0 train.epochs=1 train.batch_size=2 "
                        "tracking.log_system_metrics=false tracking.num_overlay_images=1")


@pytest.mark.slow
def test_mlflow_run_main_is_the_demo_job(tmp_path):
    """synth -> train -> evaluate, one run holding the per-epoch and the final evaluation."""
    import mlflow

    out, data = tmp_path / "demo", tmp_path / "synth"
    tracking_uri = project_experiment(tmp_path)
    result = mlflow_run("main", {"out": str(out), "data": str(data), "images": "6", "seed": "1",
                                 "overrides": MICRO_DEMO_OVERRIDES}, tracking_uri)
    assert (out / "sample.png").is_file() and (out / "checkpoints" / "best.pt").is_file()
    assert sorted(p.name for p in (data / "annotations").iterdir()) == ["train.json", "val.json"]
    assert "(coco): 5 images" in result.stdout  # the training split's statistics were printed
    assert "mlflow ui --backend-store-uri" in result.stdout  # the command to look at the result

    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("project").experiment_id])
    assert len(runs) == 1, "training or evaluation opened a run of its own"
    run = runs[0]
    assert run.data.tags["mlflow.project.entryPoint"] == "main" and run.info.status == "FINISHED"
    assert run.data.params["model.arch"] == "deformable_detr" and run.data.params["train.epochs"] == "1"
    # The best checkpoint is the only epoch's: evaluating it again gives the numbers training logged.
    final = {k: v for k, v in json.loads((out / "metrics.json").read_text()).items() if v == v}
    for key in ("coco/AP", "coco/AP50", "voc/mAP50"):
        assert run.data.metrics[f"evaluate/val/{key}"] == pytest.approx(final[key], abs=1e-9), key
        assert run.data.metrics[key] == pytest.approx(final[key], abs=1e-6), key
    # Why it fails: the diagnostics of the evaluation, printed, written next to the metrics and logged.
    assert "at score >= 0.50 and IoU 0.50" in result.stdout
    assert (out / "report" / "confusion_matrix.png").is_file() and (out / "report" / "tide_errors.png").is_file()
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate/val")}
    assert {"evaluate/val/confusion_matrix.json", "evaluate/val/summary.txt"} <= logged
    assert run.data.metrics["evaluate/val/tide/AP50"] == pytest.approx(final["tide/AP50"], abs=1e-9)

