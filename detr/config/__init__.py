"""Typed, validated configuration: the schema (``schema``) and how a config is loaded (``loading``).

A YAML file is parsed with ``yaml.safe_load``, dotted overrides (``train.lr=2e-4``) are applied,
and the result is validated into frozen pydantic models. Hyperparameters are declared once, in the
schema. Only the boundary (``detr.run``, the CLI) sees the whole ``Config``.
"""

from detr.config.loading import apply_overrides, config_from_dict, load_config, read_yaml, set_dotted
from detr.config.schema import (
    MODEL_ALIAS_RULE,
    BackboneConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    DeformableConfig,
    DetrConfig,
    DropSpec,
    EmaConfig,
    LabelSpec,
    LossConfig,
    MatcherConfig,
    ModelConfig,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    RepairPolicy,
    ScheduleConfig,
    Section,
    SourceSpec,
    SplitSpec,
    TrackingConfig,
    TrainConfig,
    TransformsSpec,
    TransformStep,
    ViewSpec,
    is_valid_model_alias,
)

__all__ = [
    "MODEL_ALIAS_RULE", "BackboneConfig", "CheckpointConfig", "Config", "DataConfig", "DeformableConfig",
    "DetrConfig", "DropSpec", "EmaConfig", "LabelSpec", "LossConfig", "MatcherConfig", "ModelConfig", "NonNegInt",
    "PositiveFloat", "PositiveInt", "Probability", "RepairPolicy", "ScheduleConfig", "Section", "SourceSpec",
    "SplitSpec", "TrackingConfig", "TrainConfig", "TransformsSpec", "TransformStep", "ViewSpec", "apply_overrides",
    "config_from_dict", "is_valid_model_alias", "load_config", "read_yaml", "set_dotted",
]
