"""Search-space files: every distribution parsed into its type, and every mistake a ConfigError
that names the file, the key and what is accepted, before Ray or any trial starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from detr.config import apply_overrides, load_config
from detr.errors import ConfigError
from detr.search.space import (Choice, Fixed, Grid, LogUniform, RandInt, Uniform, load_search_space,
                               search_space_from_dict)

REPO = Path(__file__).resolve().parents[2]


def write_space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_every_distribution_is_parsed_in_file_order(tmp_path):
    space = load_search_space(write_space(tmp_path, """
train.lr: {loguniform: [1.0e-5, 1.0e-3]}
model.dropout: {uniform: [0.0, 0.2]}
model.dec_layers: {randint: [1, 4]}
train.weight_decay: {choice: [0.0, 1.0e-4]}
train.batch_size: {grid: [2, 4]}
model.num_queries: {grid: [10, 20, 30]}
train.epochs: 6
data.num_workers: {fixed: 1}
train.schedule.milestones: [4]
"""))
    assert list(space.parameters) == ["train.lr", "model.dropout", "model.dec_layers", "train.weight_decay",
                                      "train.batch_size", "model.num_queries", "train.epochs", "data.num_workers",
                                      "train.schedule.milestones"]
    assert space.parameters["train.lr"] == LogUniform(1e-5, 1e-3)
    assert space.parameters["model.dropout"] == Uniform(0.0, 0.2)
    assert space.parameters["model.dec_layers"] == RandInt(1, 4)
    assert space.parameters["train.weight_decay"] == Choice((0.0, 1e-4))
    assert space.parameters["train.batch_size"] == Grid((2, 4))
    assert space.fixed == {"train.epochs": 6, "data.num_workers": 1, "train.schedule.milestones": [4]}
    assert set(space.searched) == {"train.lr", "model.dropout", "model.dec_layers", "train.weight_decay",
                                   "train.batch_size", "model.num_queries"}
    assert space.grid_size() == 6  # Ray runs every grid combination once per sample
    assert space.to_dict()["model.dec_layers"] == {"randint": [1, 4]}
    assert isinstance(space.parameters["data.num_workers"], Fixed)
    # Each trial starts from the config with the fixed values.
    start = space.check_against(load_config(REPO / "configs/detr_tiny.yaml"))
    assert start.train.epochs == 6 and start.data.num_workers == 1 and start.train.schedule.milestones == [4]


@pytest.mark.parametrize("preset", ["detr_tiny", "deformable_detr_tiny"])
def test_the_shipped_space_fits_the_tiny_presets(preset):
    space = load_search_space(REPO / "configs/tune/tiny_lr.yaml")
    assert isinstance(space.parameters["train.lr"], LogUniform)
    space.check_against(load_config(REPO / f"configs/{preset}.yaml"))


def test_overrides_are_python_values_checked_by_the_schema():
    config = load_config(REPO / "configs/detr_tiny.yaml")
    changed = apply_overrides(config, {"train.lr": 1e-10, "train.schedule.milestones": [3, 5]}, source="test")
    assert changed.train.lr == 1e-10 and changed.train.schedule.milestones == [3, 5]  # 1e-10 stays a float
    assert changed.model == config.model
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr' \(did you mean 'lr'\?\); accepted keys here"):
        apply_overrides(config, {"train.lrr": 1e-4}, source="test")


@pytest.mark.parametrize(("text", "expected"), [
    ("train.lr: {logunifrom: [1.0e-5, 1.0e-3]}",
     r"'train\.lr': unknown distribution 'logunifrom' \(did you mean 'loguniform'\?\); accepted: loguniform, "
     r"uniform, randint, choice, grid, fixed"),
    ("train.lr: {loguniform: [1.0e-3, 1.0e-5]}", r"'train\.lr': loguniform: low \(0\.001\) must be below high"),
    ("train.lr: {uniform: [0.1, 0.1]}", r"'train\.lr': uniform: low \(0\.1\) must be below high \(0\.1\)"),
    ("train.lr: {loguniform: [0.0, 1.0e-3]}", r"loguniform: bounds must be positive .* got low 0\.0"),
    ("train.lr: {loguniform: [-1.0, 1.0e-3]}", r"loguniform: bounds must be positive"),
    ("train.lr: {loguniform: [1e-5, 1.0e-3]}",
     r"bound '1e-5' is not one of the numbers it takes \(YAML reads '1e-5' as text: write it with a dot"),
    ("train.lr: {loguniform: [1.0e-5]}", r"loguniform takes \[low, high\] \(numbers\)"),
    ("train.lr: {loguniform: 1.0e-5}", r"loguniform takes \[low, high\]"),
    ("train.lr: {uniform: [0.0, .inf]}", r"bound inf is not finite"),
    ("model.dec_layers: {randint: [1.5, 4]}", r"randint: bound 1\.5 is not one of the integers it takes"),
    ("model.dec_layers: {randint: [4, 4]}", r"randint: low \(4\) must be below high \(4\); high is exclusive"),
    ("model.dec_layers: {randint: [true, 4]}", r"randint: bound True is not one of the integers"),
    ("train.weight_decay: {choice: []}", r"'train\.weight_decay': choice takes a non-empty list of options"),
    ("train.batch_size: {grid: 4}", r"grid takes a non-empty list of options"),
    ("train.lr: {loguniform: [1.0e-5, 1.0e-3], choice: [1]}", r"a distribution is a mapping with one key"),
    ("train.lr: 1.0e-4", r"nothing to search: every key has a fixed value"),
    ("", r"a search space is a mapping of dotted config keys to distributions.*got an empty file"),
    ("- train.lr", r"a search space is a mapping .* got list"),
    ("train.lr: {loguniform: [1.0e-5, 1.0e-3]\n", r"space\.yaml:\d+:\d+: not valid YAML"),
    ("'train lr': {choice: [1]}", r"key 'train lr' is not a dotted config key"),
    ("train.checkpoint.dir: {choice: [a, b]}", r"'train\.checkpoint\.dir' is set by the search"),
    ("tracking.experiment: {choice: [a, b]}", r"trials do not log to MLflow themselves"),
    ("train.epochs: {choice: [2, 4]}", r"'train\.epochs' cannot be searched: ASHA decides how long"),
    ("train.eval_every_epochs: {grid: [1, 2]}", r"'train\.eval_every_epochs' cannot be searched"),
])
def test_bad_spaces_name_the_file_the_key_and_what_is_accepted(tmp_path, text, expected):
    path = write_space(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as error:
        load_search_space(path)
    assert str(error.value).startswith(str(path))


@pytest.mark.parametrize(("raw", "expected"), [
    ({"train.lrr": {"loguniform": [1e-5, 1e-3]}},
     r"'train\.lrr' = 1e-05 \(from \{'loguniform': \[1e-05, 0\.001\]\}\) is rejected by the config schema: unknown "
     r"key 'train\.lrr' \(did you mean 'lr'\?\)"),
    ({"modle.dropout": {"uniform": [0.0, 0.2]}}, r"unknown key 'modle' \(did you mean 'model'\?\)"),
    # Each edge is checked, not only the first value: 2.0 is no dropout probability.
    ({"model.dropout": {"uniform": [0.0, 2.0]}}, r"'model\.dropout' = 2\.0 .* less than or equal to 1"),
    ({"model.backbone.name": {"choice": ["resnet18", "resnet200"]}}, r"'model\.backbone\.name' = 'resnet200'"),
    ({"model.nheads": {"randint": [3, 9]}}, r"'model\.nheads' = 3 .*hidden_dim \(128\) must be divisible by nheads"),
    ({"train.lr.value": {"choice": [1.0]}}, r"'train\.lr' is not a section, cannot set 'train\.lr\.value'"),
    ({"train.lr": {"choice": [1e-4]}, "train.amp": "fp32"}, r"'train\.amp' = 'fp32' is rejected .* 'none', 'bf16'"),
])
def test_keys_and_edge_values_the_config_rejects(raw, expected):
    space = search_space_from_dict(raw, source="my_space.yaml")
    with pytest.raises(ConfigError, match=expected) as error:
        space.check_against(load_config(REPO / "configs/detr_tiny.yaml"))
    assert str(error.value).startswith("my_space.yaml: ")


def test_a_missing_space_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: search space file not found"):
        load_search_space(tmp_path / "nope.yaml")
