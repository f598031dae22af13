"""The decoder's extra queries during training, and who may attend to whom.

In training mode a model with training aids decodes one sequence of T queries per image:

    [ matching group 0 (Q) | groups 1..K-1 ((K-1) Q) | one-to-many (M) | denoising (P) ]

Group 0 is exactly what inference decodes. The self-attention mask keeps every part from
influencing group 0 and each other (Group DETR, H-DETR, DN-DETR):
    - a query of a group sees only its own group;
    - a one-to-many query sees only the one-to-many queries;
    - a denoising query sees the queries of its own denoising group and group 0 (as DN-DETR: the
      copies may look at the matching queries, never the other way round);
    - padding denoising queries are seen by no one.
Cross-attention, feed-forward blocks and norms act on each query alone, so the mask is the whole
guarantee. The outputs are then split back into the sets the criterion reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from detr.models.denoising import DenoisingBatch, DenoisingQueries


@dataclass(frozen=True)
class DenoisingSettings:
    groups: int = 5
    label_noise_ratio: float = 0.2
    box_noise_scale: float = 0.4
    contrastive: bool = False


@dataclass(frozen=True)
class TrainingAidSettings:
    """Typed settings of the training aids (``model.training_aids``); the defaults are all off."""

    query_groups: int = 1
    one_to_many_queries: int = 0
    one_to_many_repeats: int = 6
    denoising: DenoisingSettings | None = None

    @property
    def any(self) -> bool:
        return self.query_groups > 1 or self.one_to_many_queries > 0 or self.denoising is not None


class TrainingAids(nn.Module):
    """The training-only parameters: the learned queries of groups 1..K-1 and of the one-to-many
    branch (learned-query models; two-stage models take the one-to-many queries from the next
    encoder proposals instead) and the denoising label embedding. Stored under the model's
    ``training_aids.`` keys, which a model built without aids ignores when it loads a state dict.

    Args:
        query_dim: width of one learned query (DETR: C; Deformable DETR: 2C).
        num_queries: Q, the matching queries of one group.
        learned_queries: the model has learned queries (not two-stage).
    """

    def __init__(self, settings: TrainingAidSettings, *, num_classes: int, hidden_dim: int, query_dim: int,
                 num_queries: int, learned_queries: bool) -> None:
        super().__init__()
        self.settings = settings
        self.num_queries = num_queries
        if settings.query_groups > 1:
            if not learned_queries:
                raise ValueError("query groups need learned queries (not two-stage)")
            self.group_queries = nn.Embedding((settings.query_groups - 1) * num_queries, query_dim)
        if settings.one_to_many_queries and learned_queries:
            self.one_to_many_queries = nn.Embedding(settings.one_to_many_queries, query_dim)
        dn = settings.denoising
        self.denoising = None if dn is None else DenoisingQueries(
            num_classes, hidden_dim, dn.groups, dn.label_noise_ratio, dn.box_noise_scale, dn.contrastive)

    def learned_queries(self, matching: torch.Tensor) -> torch.Tensor:
        """matching [Q, D] -> [K Q + M, D]: the learned queries of every group, then the one-to-many ones."""
        parts = [matching]
        if hasattr(self, "group_queries"):
            parts.append(self.group_queries.weight)
        if hasattr(self, "one_to_many_queries"):
            parts.append(self.one_to_many_queries.weight)
        return torch.cat(parts)

    def denoising_queries(self, targets: list[dict] | None) -> DenoisingBatch | None:
        return None if self.denoising is None or targets is None else self.denoising(targets)

    def layout(self, denoising: DenoisingBatch | None) -> QueryLayout:
        return QueryLayout(self.num_queries, self.settings.query_groups, self.settings.one_to_many_queries,
                           self.settings.one_to_many_repeats, denoising)

    def unused_parameter_guard(self, denoising: DenoisingBatch | None) -> torch.Tensor | float:
        """0, connected to the label embedding when a batch has no denoising queries (no targets at
        all): under DistributedDataParallel every parameter must take part in every step."""
        if self.denoising is not None and (denoising is None or denoising.num_queries == 0):
            return self.denoising.label_embed.weight.sum() * 0.0
        return 0.0


@dataclass(frozen=True)
class QueryLayout:
    """Where each set of queries sits in the training sequence (see the module docstring)."""

    num_queries: int  # Q, one group
    groups: int = 1
    one_to_many: int = 0
    one_to_many_repeats: int = 1
    denoising: DenoisingBatch | None = None

    @property
    def matching(self) -> int:
        return self.groups * self.num_queries

    @property
    def total(self) -> int:
        return self.matching + self.one_to_many + (self.denoising.num_queries if self.denoising else 0)

    def self_attn_mask(self, batch: int, nheads: int, device: torch.device) -> torch.Tensor | None:
        """[B * nheads, T, T] bool, True = may not attend (``nn.MultiheadAttention``'s convention,
        batch-major as its 3-d masks expect); None when there is nothing but group 0."""
        if self.total == self.num_queries:
            return None
        # Block id of every query: group g -> g, one-to-many -> K, denoising group d -> K + 1 + d.
        block = torch.cat([
            torch.arange(self.matching, device=device) // self.num_queries,
            torch.full((self.one_to_many,), self.groups, device=device),
            self.groups + 1 + (self.denoising.group_of_query() if self.denoising else torch.zeros(0, device=device,
                                                                                                  dtype=torch.int64)),
        ])  # [T]
        is_denoising = block > self.groups
        allowed = block[:, None] == block[None, :]  # [T, T] query x key
        allowed |= is_denoising[:, None] & (block[None, :] == 0)
        key_valid = torch.ones(batch, self.total, dtype=torch.bool, device=device)
        if self.denoising is not None:
            key_valid[:, self.matching + self.one_to_many:] = self.denoising.valid
        allowed = allowed[None] & key_valid[:, None, :]  # [B, T, T]
        return (~allowed).repeat_interleave(nheads, dim=0)

    def split(self, logits: torch.Tensor, boxes: torch.Tensor, aux_loss: bool) -> dict:
        """Per-layer outputs logits [L, B, T, K(+1)], boxes [L, B, T, 4] -> the model's outputs:
        pred_logits/pred_boxes/aux_outputs of the matching queries (every group, "query_groups": K
        when K > 1), "one_to_many" and "denoising" entries of the same form."""
        m, o = self.matching, self.one_to_many
        out = _prediction_set(logits[:, :, :m], boxes[:, :, :m], aux_loss)
        if self.groups > 1:
            for entry in [out, *out.get("aux_outputs", [])]:
                entry["query_groups"] = self.groups
        if o:
            out["one_to_many"] = _prediction_set(logits[:, :, m:m + o], boxes[:, :, m:m + o], aux_loss)
            out["one_to_many"]["repeats"] = self.one_to_many_repeats
        if self.denoising is not None:
            dn = _prediction_set(logits[:, :, m + o:], boxes[:, :, m + o:], aux_loss)
            dn.update({"valid": self.denoising.valid, "target_index": self.denoising.target_index,
                       "groups": self.denoising.groups, "copies": self.denoising.copies})
            out["denoising"] = dn
        return out


def _prediction_set(logits: torch.Tensor, boxes: torch.Tensor, aux_loss: bool) -> dict:
    out: dict = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux_loss:
        out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
    return out


class TrainsWithAids:
    """What DETR and Deformable DETR share about their training aids: building them, last (so the
    inference parameters draw the same random numbers with or without aids), and loading state
    dicts with or without them."""

    def _attach_training_aids(self, aids: TrainingAidSettings, *, num_classes: int, hidden_dim: int,
                              query_dim: int, num_queries: int, two_stage: bool, box_queries: str) -> None:
        """``query_dim``: the width of a learned query; ``box_queries``: what denoising needs, named
        in the error when it is asked for without two-stage."""
        if aids.any:
            if aids.denoising is not None and not two_stage:
                raise ValueError(f"denoising needs {box_queries}")
            self.training_aids = TrainingAids(aids, num_classes=num_classes, hidden_dim=hidden_dim,
                                              query_dim=query_dim, num_queries=num_queries,
                                              learned_queries=not two_stage)
        make_training_aid_keys_optional(self)

    @property
    def trains_with_targets(self) -> bool:
        """The training forward takes the targets (denoising queries are built from them)."""
        aids = getattr(self, "training_aids", None)
        return aids is not None and aids.denoising is not None


def make_training_aid_keys_optional(model: nn.Module) -> None:
    """State dicts load whether or not they hold ``training_aids.`` entries: a checkpoint trained
    with the aids loads into a model built without them (the entries are dropped), and a plain
    checkpoint into a model with them (they keep their fresh values). Everything else stays strict."""

    def drop_unknown_aid_keys(module, state_dict, prefix, *args) -> None:
        if not hasattr(module, "training_aids"):
            for key in [k for k in state_dict if k.startswith(prefix + "training_aids.")]:
                del state_dict[key]

    def allow_missing_aid_keys(module, incompatible) -> None:
        # Key names are relative to the module load_state_dict was called on (the model, or a wrapper).
        for key in [k for k in incompatible.missing_keys if _is_aid_key(k)]:
            incompatible.missing_keys.remove(key)

    model.register_load_state_dict_pre_hook(drop_unknown_aid_keys)
    model.register_load_state_dict_post_hook(allow_missing_aid_keys)


def _is_aid_key(key: str) -> bool:
    return key.startswith("training_aids.") or ".training_aids." in key
