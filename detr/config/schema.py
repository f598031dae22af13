"""Typed, validated configuration.

A YAML file is parsed with ``yaml.safe_load``, dotted overrides (``train.lr=2e-4``) are applied,
and the result is validated into frozen pydantic models. Unknown keys and bad values are errors that
name the key path, the value and what is accepted. The resolved config is JSON-able (saved in
checkpoints, logged to MLflow). Only the boundary (CLI, trainer set-up) sees the whole ``Config``;
everything below it gets the section or the plain values it needs.

Hyperparameters are declared once, here. Defaults are those of the papers (DETR: Carion et al. 2020;
Deformable DETR: Zhu et al. 2021); presets in ``configs/`` change only what differs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]

# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


class SourceSpec(Section):
    """One dataset on disk."""

    path: Path
    # "auto", a built-in format (coco, voc, yolo, kitti), "datumaro:<fmt>", a format plugin's
    # entry-point name or "package.module:Class" (see detr.data.formats.external); checked on loading.
    format: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.-]*(:[A-Za-z_]\w*)?$")] = "auto"
    # Format-specific subset: the COCO annotation file name or VOC ImageSets/Main list (e.g.
    # "train"), the YOLO split directory; None means the format's default.
    split: str | None = None


class DropSpec(Section):
    """Boxes removed by a view because of their attributes (counted in the view report)."""

    difficult: bool = False
    crowd: bool = False
    # Drop boxes whose attribute is strictly above the level (KITTI occluded 0..3, truncated 0..1).
    occluded_above: float | None = None
    truncated_above: float | None = None


class ViewSpec(Section):
    """A filtered view of a dataset: which boxes and images it keeps."""

    include_labels: list[str] | None = None
    exclude_labels: list[str] = []
    drop: DropSpec = DropSpec()
    # Boxes with width or height below this many pixels are dropped.
    min_box_size: NonNegInt = 0
    # Image-level condition: keep an image only if it has at least this many boxes of each class
    # (after the box filters), e.g. {Car: 2, Pedestrian: 1}.
    require: dict[str, PositiveInt] = {}
    drop_empty_images: bool = False
    max_images: PositiveInt | None = None


class LabelSpec(Section):
    """Edits of the combined label map: rename (several to one merges), then keep a subset."""

    rename: dict[str, str] = {}
    keep: list[str] | None = None


class RepairPolicy(Section):
    """What bad annotations may be repaired instead of rejected. Repairs are counted and reported."""

    # Clip boxes that extend at most this many pixels beyond the image border; farther is an error.
    clip_boxes_px: Annotated[float, Field(ge=0)] = 0.0
    # Drop (and count) boxes with zero area instead of failing.
    drop_degenerate_boxes: bool = False


class SplitSpec(Section):
    """The datasets of one split (concatenated) and the view applied to them."""

    sources: list[SourceSpec] = Field(min_length=1)
    view: ViewSpec = ViewSpec()


class TransformStep(Section):
    """One step of a transform pipeline: a name plus its arguments.

    Valid names and arguments are checked when the pipeline is built (``detr.data.transforms``).
    """

    name: str
    args: dict[str, Any] = {}


class TransformsSpec(Section):
    train: list[TransformStep] = [
        TransformStep(name="random_horizontal_flip", args={"p": 0.5}),
        TransformStep(name="random_resize", args={"sizes": [480, 512, 544, 576, 608], "max_size": 1000}),
        TransformStep(name="normalize"),
    ]
    val: list[TransformStep] = [
        TransformStep(name="resize", args={"size": 544, "max_size": 1000}),
        TransformStep(name="normalize"),
    ]


class DataConfig(Section):
    train: SplitSpec | None = None
    val: SplitSpec | None = None
    labels: LabelSpec = LabelSpec()
    repair: RepairPolicy = RepairPolicy()
    transforms: TransformsSpec = TransformsSpec()
    num_workers: NonNegInt = 0


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


class BackboneConfig(Section):
    # resnet10: ResNet-18 with one block per stage instead of two (CPUs, from scratch).
    name: Literal["resnet10", "resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    # A local state dict for the backbone; never downloaded.
    weights: Path | None = None
    # Number of trainable ResNet stages counted from the top (0..5); DETR trains layer2..layer4.
    trainable_layers: Annotated[int, Field(ge=0, le=5)] = 3
    # DETR-DC5: layer4 dilated instead of strided (a stride-16 map instead of 32, the same weights).
    dilation: bool = False
    frozen_batchnorm: bool = True
    # The ResNet in channels-last (NHWC) memory: the same model and weights, faster convolutions on
    # CPUs (oneDNN, above all with train.amp=bf16) and on tensor-core GPUs.
    channels_last: bool = False


class DeformableConfig(Section):
    n_levels: Annotated[int, Field(ge=1, le=5)] = 4
    n_points: Annotated[int, Field(ge=1, le=16)] = 4
    with_box_refine: bool = False
    two_stage: bool = False
    # Encoder proposals that become decoder queries; None: model.num_queries (as the paper).
    two_stage_num_proposals: PositiveInt | None = None
    # Two-stage: a query's content also takes the encoder feature of its proposal's position (as
    # model.detr.encoder_content), not only the sine embedding of its box; official checkpoints: off.
    encoder_content: bool = False

    @model_validator(mode="after")
    def _encoder_content_needs_two_stage(self) -> DeformableConfig:
        if self.encoder_content and not self.two_stage:
            raise ValueError("model.deformable.encoder_content needs model.deformable.two_stage: true "
                             "(learned queries have no encoder position)")
        return self


class DetrConfig(Section):
    # Queries from the top encoder proposals instead of learned ones (detr/models/detr.py says
    # how); learns in far fewer steps, but official DETR checkpoints have no such heads.
    two_stage: bool = False
    # Two-stage: a query's content also takes the encoder feature of its position (Efficient DETR,
    # RT-DETR), so the class the encoder head sees there reaches the decoder directly.
    encoder_content: bool = False

    @model_validator(mode="after")
    def _encoder_content_needs_two_stage(self) -> DetrConfig:
        if self.encoder_content and not self.two_stage:
            raise ValueError("encoder_content needs two_stage: true (learned queries have no encoder position)")
        return self


class MatcherConfig(Section):
    cost_class: Annotated[float, Field(ge=0)] = 1.0
    cost_bbox: Annotated[float, Field(ge=0)] = 5.0
    cost_giou: Annotated[float, Field(ge=0)] = 2.0


class LossConfig(Section):
    class_loss_coef: Annotated[float, Field(ge=0)] = 1.0
    bbox_loss_coef: Annotated[float, Field(ge=0)] = 5.0
    giou_loss_coef: Annotated[float, Field(ge=0)] = 2.0
    # DETR: relative weight of the no-object class in the cross-entropy.
    eos_coef: Probability = 0.1
    # Deformable DETR: sigmoid focal loss (and the matcher's focal cost) parameters.
    focal_alpha: Probability = 0.25
    focal_gamma: Annotated[float, Field(ge=0)] = 2.0


class DenoisingConfig(Section):
    """DN-DETR (Li et al. 2022) denoising queries: noised copies of the ground-truth boxes and labels
    decoded next to the matching queries (which cannot see them), each trained to reconstruct its
    box and class. Training only. Defaults: DN-DETR's recipe; DINO (Zhang et al. 2022) uses label
    noise 0.5, box noise 1.0 and contrastive negatives."""

    enabled: bool = False
    # Noised copies of every target box per image (DN-DETR: 5 groups). A fixed number, so that the
    # loss normalizers are known from the targets alone (exact under gradient accumulation).
    groups: PositiveInt = 5
    # Probability that a copy's label is replaced by a random class.
    label_noise_ratio: Probability = 0.2
    # Each box edge moves by up to box_noise_scale * half the box's width/height (positives).
    box_noise_scale: Annotated[float, Field(ge=0, le=2)] = 0.4
    # DINO's contrastive negatives: one more copy per box, moved by 1-2x that, trained as "no object".
    contrastive: bool = False


class OneToManyConfig(Section):
    """H-DETR (Jia et al. 2023) hybrid matching: an extra set of queries, matched one-to-many against
    the targets repeated ``repeats`` times, decoded beside (and unseen by) the matching queries.
    Training only; 0 queries = off. H-Deformable-DETR: 1500 queries, 6 repeats, weight 1."""

    num_queries: NonNegInt = 0
    repeats: PositiveInt = 6
    loss_weight: Annotated[float, Field(ge=0)] = 1.0


class TrainingAidsConfig(Section):
    """Additions that speed up training and leave the inference model unchanged (same parameters in
    use, same outputs): the decoder sees extra queries only in training mode."""

    denoising: DenoisingConfig = DenoisingConfig()
    # Group DETR (Chen et al. 2023): K groups of the learned queries, one-to-one matching inside each,
    # self-attention only within a group, group 0 alone at inference (Group DETR: 11). 1 = off.
    query_groups: PositiveInt = 1
    one_to_many: OneToManyConfig = OneToManyConfig()


class ModelConfig(Section):
    arch: Literal["detr", "deformable_detr"] = "detr"
    backbone: BackboneConfig = BackboneConfig()
    position_encoding: Literal["sine", "learned"] = "sine"
    hidden_dim: PositiveInt = 256
    nheads: PositiveInt = 8
    enc_layers: NonNegInt = 6
    dec_layers: PositiveInt = 6
    dim_feedforward: PositiveInt = 2048
    dropout: Probability = 0.1
    num_queries: PositiveInt = 100
    pre_norm: bool = False
    aux_loss: bool = True
    # Detections kept per image by the post-processing (Deformable DETR: top-k over queries x classes).
    max_detections: PositiveInt = 100
    detr: DetrConfig = DetrConfig()
    deformable: DeformableConfig = DeformableConfig()
    matcher: MatcherConfig = MatcherConfig()
    loss: LossConfig = LossConfig()
    training_aids: TrainingAidsConfig = TrainingAidsConfig()

    @model_validator(mode="after")
    def _aids_fit_the_query_path(self) -> ModelConfig:
        two_stage = self.detr.two_stage if self.arch == "detr" else self.deformable.two_stage
        two_stage_key = "model.detr.two_stage" if self.arch == "detr" else "model.deformable.two_stage"
        aids = self.training_aids
        if aids.denoising.enabled and not two_stage:
            raise ValueError(
                f"model.training_aids.denoising.enabled=true needs box-conditioned queries: set {two_stage_key}=true "
                "(denoised boxes enter the decoder as the encoder proposals do), or turn denoising off")
        if aids.query_groups > 1 and two_stage:
            raise ValueError(
                f"model.training_aids.query_groups={aids.query_groups} needs learned queries, but {two_stage_key}=true "
                "takes the queries from the encoder proposals; use query_groups=1 (off) or denoising / one_to_many "
                "with two-stage")
        return self

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by nheads ({self.nheads})")
        if self.hidden_dim % 2:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be even (half of it encodes each axis)")
        if self.arch == "deformable_detr" and self.hidden_dim % 32:
            raise ValueError(
                f"deformable_detr needs hidden_dim divisible by 32 (GroupNorm with 32 groups), got {self.hidden_dim}"
            )
        return self


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


class ScheduleConfig(Section):
    kind: Literal["step", "cosine"] = "step"
    # Epochs after which the lr is multiplied by ``gamma`` (step schedule).
    milestones: list[PositiveInt] = [200]
    gamma: PositiveFloat = 0.1
    warmup_steps: NonNegInt = 0
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0


class CheckpointConfig(Section):
    dir: Path = Path("outputs/checkpoints")
    every_steps: NonNegInt = 0
    keep_last: PositiveInt = 2
    best_metric: str = "coco/AP"
    best_mode: Literal["max", "min"] = "max"


class EmaConfig(Section):
    enabled: bool = False
    decay: Annotated[float, Field(gt=0, lt=1)] = 0.9998


class TrainConfig(Section):
    epochs: PositiveInt = 300
    batch_size: PositiveInt = 2
    lr: PositiveFloat = 1e-4
    lr_backbone: Annotated[float, Field(ge=0)] = 1e-5
    # Deformable DETR trains sampling offsets and reference points with a smaller lr.
    lr_linear_proj_mult: Annotated[float, Field(ge=0)] = 0.1
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    clip_max_norm: Annotated[float, Field(ge=0)] = 0.1
    grad_accum_steps: PositiveInt = 1
    # Autocast: bf16 (CPU or CUDA), fp16 (CUDA, with loss scaling), or auto: bf16 where the device
    # computes it natively (CUDA compute capability >= 8.0; CPUs with AMX or AVX512-BF16), else none.
    amp: Literal["none", "bf16", "fp16", "auto"] = "none"
    ema: EmaConfig = EmaConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval_every_epochs: PositiveInt = 1
    on_nonfinite_loss: Literal["error", "skip"] = "error"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"


# Aliases MLflow's registry accepts (it reserves "latest" and "v<number>").
MODEL_ALIAS_RULE = ("use letters, digits, '_' and '-', starting with a letter or '_', not 'latest' or "
                    "'v<number>' (e.g. 'champion')")


def is_valid_model_alias(alias: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,254}", alias)) and not re.fullmatch(
        r"(?i)latest|v\d+", alias)


class TrackingConfig(Section):
    # None: MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db in the working directory.
    tracking_uri: str | None = None
    experiment: str = "mlflow-detr"
    run_name: str | None = None
    log_system_metrics: bool = True
    # Step losses and lr are logged at step 1 and every this many optimizer steps.
    log_every_steps: PositiveInt = 10
    num_overlay_images: NonNegInt = 4
    # When training finishes, the best checkpoint (else the last) becomes the run's pyfunc model
    # ("model", ready for `mlflow models serve`); with registered_model it is also registered and
    # registered_alias is moved to the new version.
    log_model: bool = True
    registered_model: str | None = None
    registered_alias: str = "champion"

    @model_validator(mode="after")
    def _alias_accepted_by_mlflow(self) -> TrackingConfig:
        if not is_valid_model_alias(self.registered_alias):
            raise ValueError(f"registered_alias {self.registered_alias!r}: {MODEL_ALIAS_RULE}")
        if self.registered_model is not None and not self.registered_model.strip():
            raise ValueError("registered_model is empty: give a name or leave it unset (null)")
        return self


class Config(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()

    def to_dict(self) -> dict:
        """The resolved config as plain JSON types (paths as strings)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
