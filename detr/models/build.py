"""Model settings -> modules. The only place under ``detr.models`` that reads a config section: it
unpacks ``ModelConfig`` (never the whole ``Config``) into the typed constructor arguments of the
modules it builds.

Parameter names follow the official implementations (facebookresearch/detr,
fundamentalvision/Deformable-DETR), so their checkpoints load after a near-identity key mapping:
DETR maps key for key; Deformable DETR's ``transformer.decoder.class_embed.*`` /
``transformer.decoder.bbox_embed.*`` are duplicates of the top-level heads and are dropped.
"""

from __future__ import annotations

from torch import nn

from detr.config import ModelConfig
from detr.errors import InvalidInputError
from detr.models.backbone import Backbone, Joiner
from detr.models.criterion import SetCriterion, loss_weights
from detr.models.deformable_detr import DeformableDETR
from detr.models.deformable_transformer import DeformableTransformer
from detr.models.detr import DETR
from detr.models.matcher import HungarianMatcher
from detr.models.position_encoding import build_position_encoding
from detr.models.postprocess import PostProcess
from detr.models.training_queries import DenoisingSettings, TrainingAidSettings
from detr.models.transformer import Transformer


def build_model(model_config: ModelConfig, num_classes: int) -> nn.Module:
    """A DETR or Deformable DETR with fresh weights (the backbone from ``backbone.weights`` if set).

    Args:
        model_config: the model settings (``config.model``).
        num_classes: K, the number of classes of the label map (never typed by hand).
    """
    mc = _model_settings(model_config)
    _check_num_classes(num_classes)
    if mc.arch == "detr":
        return _build_detr(mc, num_classes)
    return _build_deformable_detr(mc, num_classes)


def build_criterion(model_config: ModelConfig, num_classes: int) -> SetCriterion:
    """The matcher + set criterion of the architecture: softmax/cross-entropy (DETR) or focal (Deformable)."""
    mc = _model_settings(model_config)
    _check_num_classes(num_classes)
    focal = mc.arch == "deformable_detr"
    matcher = HungarianMatcher(
        cost_class=mc.matcher.cost_class,
        cost_bbox=mc.matcher.cost_bbox,
        cost_giou=mc.matcher.cost_giou,
        class_cost="focal" if focal else "softmax",
        focal_alpha=mc.loss.focal_alpha,
        focal_gamma=mc.loss.focal_gamma,
    )
    weights = loss_weights(
        mc.loss.class_loss_coef,
        mc.loss.bbox_loss_coef,
        mc.loss.giou_loss_coef,
        num_aux_layers=mc.dec_layers - 1 if mc.aux_loss else 0,
        two_stage=_two_stage(mc),
        one_to_many_weight=mc.training_aids.one_to_many.loss_weight if mc.training_aids.one_to_many.num_queries else None,
        denoising=mc.training_aids.denoising.enabled,
    )
    return SetCriterion(
        num_classes,
        matcher,
        weights,
        class_loss="focal" if focal else "ce",
        eos_coef=mc.loss.eos_coef,
        focal_alpha=mc.loss.focal_alpha,
        focal_gamma=mc.loss.focal_gamma,
        class_agnostic_encoder=focal,
    )


def build_postprocess(model_config: ModelConfig) -> PostProcess:
    mc = _model_settings(model_config)
    return PostProcess("sigmoid" if mc.arch == "deformable_detr" else "softmax", mc.max_detections)


def _build_detr(mc: ModelConfig, num_classes: int) -> DETR:
    backbone = _build_backbone(mc, num_levels=1, deformable=False)
    transformer = Transformer(
        d_model=mc.hidden_dim,
        nhead=mc.nheads,
        num_encoder_layers=mc.enc_layers,
        num_decoder_layers=mc.dec_layers,
        dim_feedforward=mc.dim_feedforward,
        dropout=mc.dropout,
        normalize_before=mc.pre_norm,
    )
    return DETR(backbone, transformer, num_classes, mc.num_queries, aux_loss=mc.aux_loss, two_stage=mc.detr.two_stage,
                encoder_content=mc.detr.encoder_content, aids=_training_aids(mc))


def _build_deformable_detr(mc: ModelConfig, num_classes: int) -> DeformableDETR:
    d = mc.deformable
    backbone = _build_backbone(mc, num_levels=min(d.n_levels, 3), deformable=True)
    transformer = DeformableTransformer(
        d_model=mc.hidden_dim,
        nhead=mc.nheads,
        num_encoder_layers=mc.enc_layers,
        num_decoder_layers=mc.dec_layers,
        dim_feedforward=mc.dim_feedforward,
        dropout=mc.dropout,
        num_feature_levels=d.n_levels,
        dec_n_points=d.n_points,
        enc_n_points=d.n_points,
        two_stage=d.two_stage,
        two_stage_num_proposals=d.two_stage_num_proposals or mc.num_queries,
        encoder_content=d.encoder_content,
    )
    return DeformableDETR(
        backbone,
        transformer,
        num_classes,
        mc.num_queries,
        d.n_levels,
        aux_loss=mc.aux_loss,
        with_box_refine=d.with_box_refine,
        two_stage=d.two_stage,
        aids=_training_aids(mc),
    )


def _training_aids(mc: ModelConfig) -> TrainingAidSettings:
    a = mc.training_aids
    dn = a.denoising
    return TrainingAidSettings(
        query_groups=a.query_groups,
        one_to_many_queries=a.one_to_many.num_queries,
        one_to_many_repeats=a.one_to_many.repeats,
        denoising=DenoisingSettings(dn.groups, dn.label_noise_ratio, dn.box_noise_scale, dn.contrastive)
        if dn.enabled else None,
    )


def _build_backbone(mc: ModelConfig, *, num_levels: int, deformable: bool) -> Joiner:
    b = mc.backbone
    body = Backbone(
        b.name,
        num_levels=num_levels,
        trainable_layers=b.trainable_layers,
        dilation=b.dilation,
        frozen_batchnorm=b.frozen_batchnorm,
        weights=b.weights,
        channels_last=b.channels_last,
    )
    return Joiner(body, build_position_encoding(mc.position_encoding, mc.hidden_dim, deformable=deformable))


def _two_stage(mc: ModelConfig) -> bool:
    return mc.deformable.two_stage if mc.arch == "deformable_detr" else mc.detr.two_stage


def _model_settings(model_config: ModelConfig) -> ModelConfig:
    if not isinstance(model_config, ModelConfig):
        hint = " (pass its model section, config.model)" if hasattr(model_config, "model") else ""
        raise InvalidInputError(f"expected the model settings, a ModelConfig, got {type(model_config).__name__}"
                                f"{hint}")
    return model_config


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InvalidInputError(f"num_classes must be a positive integer (from the label map), got {num_classes!r}")
