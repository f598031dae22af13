"""Config: YAML -> frozen pydantic models, dotted overrides, and errors that name key, value, accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from detr.cli import main
from detr.config import Config, load_config
from detr.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_papers():
    config = load_config()
    assert config.model.arch == "detr"
    assert config.model.hidden_dim == 256 and config.model.nheads == 8
    assert config.model.num_queries == 100
    assert config.train.lr == pytest.approx(1e-4) and config.train.lr_backbone == pytest.approx(1e-5)
    assert config.model.loss.eos_coef == pytest.approx(0.1)


def test_yaml_values_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "train:\n  lr: 3.0e-4\n  epochs: 7\nmodel:\n  arch: deformable_detr\n")
    config = load_config(path, ["train.lr=2e-4", "model.deformable.with_box_refine=true",
                                "data.labels.keep=[Car, Pedestrian]", "data.labels.rename.Van=Car"])
    assert config.train.lr == pytest.approx(2e-4)  # the override wins over the file
    assert config.train.epochs == 7
    assert config.model.arch == "deformable_detr"
    assert config.model.deformable.with_box_refine is True
    assert config.data.labels.keep == ["Car", "Pedestrian"]
    assert config.data.labels.rename == {"Van": "Car"}


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(ValidationError):
        config.train.lr = 1.0  # type: ignore[misc]


def test_unknown_key_in_file_names_path_and_suggests(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 1e-4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "train.lrr" in message and "did you mean 'lr'" in message
    assert "lr_backbone" in message  # the accepted keys are listed


def test_unknown_key_in_list_item_names_index(tmp_path):
    path = write(tmp_path, "data:\n  train:\n    sources:\n      - {path: a, fromat: coco}\n")
    with pytest.raises(ConfigError, match=r"data\.train\.sources\.0\.fromat.*did you mean 'format'"):
        load_config(path)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"unknown key 'model\.hiden_dim' \(did you mean 'hidden_dim'\?\)"):
        load_config(None, ["model.hiden_dim=64"])


def test_bad_value_names_key_value_and_accepted():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.arch=detrr"])
    message = str(info.value)
    assert "model.arch" in message and "'detrr'" in message
    assert "'detr'" in message and "'deformable_detr'" in message

    with pytest.raises(ConfigError, match=r"train\.lr' = -1.*greater than 0"):
        load_config(None, ["train.lr=-1"])


def test_cross_field_check():
    with pytest.raises(ConfigError, match="divisible by nheads"):
        load_config(None, ["model.hidden_dim=100", "model.nheads=8"])


def test_training_aids_are_off_by_default_and_checked_against_the_query_path():
    aids = load_config(None).model.training_aids
    assert not aids.denoising.enabled and aids.query_groups == 1 and aids.one_to_many.num_queries == 0
    config = load_config(None, ["model.detr.two_stage=true", "model.training_aids.denoising.enabled=true",
                                "model.training_aids.denoising.contrastive=true",
                                "model.training_aids.one_to_many={num_queries: 50, repeats: 3, loss_weight: 0.5}"])
    assert config.model.training_aids.denoising.contrastive and config.model.training_aids.one_to_many.repeats == 3
    with pytest.raises(ConfigError, match=r"denoising.enabled=true needs box-conditioned queries.*"
                                          r"model\.detr\.two_stage=true"):
        load_config(None, ["model.training_aids.denoising.enabled=true"])
    with pytest.raises(ConfigError, match=r"model\.deformable\.two_stage=true"):
        load_config(None, ["model.arch=deformable_detr", "model.training_aids.denoising.enabled=true"])
    with pytest.raises(ConfigError, match=r"query_groups=4 needs learned queries.*model\.detr\.two_stage=true"):
        load_config(None, ["model.detr.two_stage=true", "model.training_aids.query_groups=4"])
    with pytest.raises(ConfigError, match=r"label_noise_ratio' = 1.5.*less than or equal to 1"):
        load_config(None, ["model.training_aids.denoising.label_noise_ratio=1.5"])
    with pytest.raises(ConfigError, match=r"query_groups' = 0.*greater than 0"):
        load_config(None, ["model.training_aids.query_groups=0"])
    with pytest.raises(ConfigError, match=r"training_aids.one_to_many.repets"):
        load_config(None, ["model.training_aids.one_to_many.repets=2"])


@pytest.mark.parametrize(
    "override, expected",
    [("train.lr", "must look like"), ("=3", "must look like"), ("train.lr=[1,", "not valid YAML"),
     ("train.lr.x=1", "not a section")],
)
def test_malformed_overrides(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["train.lr=1e-4", override] if "not a section" in expected else [override])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    path = write(tmp_path, "train:\n  lr: [1e-4\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+:\d+: not valid YAML"):
        load_config(path)
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_resolved_config_round_trips_through_yaml_and_json(tmp_path):
    config = load_config(None, ["train.lr=5e-4", "model.arch=deformable_detr"])
    again = load_config(write(tmp_path, config.to_yaml()))
    assert again == config
    assert Config.model_validate(json.loads(config.to_json())) == config


def test_cli_config_show_and_validate(tmp_path, capsys):
    assert main(["config", "show", "-o", "train.lr=2e-4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == pytest.approx(2e-4)

    assert main(["config", "validate"]) == 0
    assert "valid" in capsys.readouterr().out

    bad = write(tmp_path, "train:\n  epoch: 3\n")
    assert main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("detr: error:") and "train.epoch" in err and err.count("\n") == 1


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    load_config(path)
