"""The evaluator the trainer and ``detr evaluate`` use: accumulate predictions, then compute metrics.

Usage::

    evaluator = Evaluator(dataset, metrics=("coco", "voc"))
    for batch in loader:
        evaluator.update(postprocess(model(batch)))  # list of per-image prediction dicts
    evaluator.gather()                               # no-op unless torch.distributed is initialised
    metrics = evaluator.compute()                    # {"coco/AP": ..., "voc/mAP50": ..., ...}
    evaluator.reset()

Predictions are stored per image id and evaluated in dataset order, so batch size, batch order and
the number of data-parallel ranks do not change a single number. The evaluated set is the images
that received a prediction (an empty prediction counts: the image had no detections), as in the
DETR reference evaluator; ``eval/images`` in the metrics says how many that was and
:meth:`Evaluator.missing_image_ids` lists the dataset images that were not evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch.distributed as dist

from detr.data.dataset import DetectionDataset
from detr.data.records import ImageRecord
from detr.engine.coco_eval import CocoResult, coco_image_ids, evaluate_coco
from detr.engine.detections import ImageDetections, detections_from_prediction, image_id_key
from detr.engine.diagnostics import DiagnosticReport, build_report
from detr.engine.voc_eval import VocResult, evaluate_voc
from detr.errors import ConfigError, DatasetFormatError, InvalidInputError

METRICS = ("coco", "voc")


@dataclass(frozen=True)
class EvaluationResult:
    """Flat metrics plus the detailed results they came from (for PR curves and reports).

    ``metrics`` keys: ``coco/AP`` ... ``coco/AR_large``, ``coco/AP/<class>`` (see
    :meth:`CocoResult.metrics`), ``voc/mAP50``, ``voc/mAP50_11pt``, ``voc/AP50/<class>``,
    ``voc/AP50_11pt/<class>`` (see :meth:`VocResult.metrics`), ``eval/images`` and
    ``eval/detections``. NaN marks a number that is undefined (e.g. no ground truth of a class).
    """

    metrics: dict[str, float]
    coco: CocoResult | None
    voc: VocResult | None


class Evaluator:
    """Accumulates per-image predictions for one dataset and computes COCO and/or VOC metrics.

    Args:
        dataset: the ground truth; its label map defines the valid label ids.
        metrics: any of ``"coco"`` (pycocotools box mAP) and ``"voc"`` (VOC AP at IoU 0.5).
    """

    def __init__(self, dataset: DetectionDataset, metrics: Sequence[str] = METRICS) -> None:
        if isinstance(metrics, str):
            metrics = (metrics,)
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise ConfigError(
                f"evaluation metrics {list(metrics)!r} are invalid; choose one or more of {list(METRICS)}"
            )
        self.dataset = dataset
        self.metrics = tuple(dict.fromkeys(metrics))
        self._position: dict[int | str, int] = {}
        for position, record in enumerate(dataset.records):
            if record.image_id in self._position:
                raise DatasetFormatError(
                    f"dataset {dataset.name!r}: image id {record.image_id!r} appears twice "
                    f"({dataset.records[self._position[record.image_id]].source} and {record.source})"
                )
            self._position[record.image_id] = position
        self._detections: dict[int, ImageDetections] = {}  # dataset position -> detections
        self.repeated_across_ranks = 0
        # The latest compute()'s full result, for PR curves after the trainer asked for metrics.
        self.last_result: EvaluationResult | None = None

    def reset(self) -> None:
        """Forget all predictions (start of a new evaluation pass)."""
        self._detections = {}
        self.repeated_across_ranks = 0
        self.last_result = None

    @property
    def num_images(self) -> int:
        """Images that have received a prediction so far."""
        return len(self._detections)

    def missing_image_ids(self) -> list[int | str]:
        """Ids of dataset images that have received no prediction, in dataset order."""
        return [r.image_id for i, r in enumerate(self.dataset.records) if i not in self._detections]

    def update(self, predictions: Sequence[Mapping]) -> None:
        """Add one batch of per-image prediction dicts.

        Each dict: ``image_id`` (a dataset image id; a one-element tensor is fine), ``boxes``
        [K, 4] xyxy pixels of the original image, ``scores`` [K], ``labels`` (or ``label_ids``)
        [K] class ids; torch tensors on any device or numpy arrays. The batch is checked whole
        before anything is stored, so a rejected batch leaves no trace.

        Raises:
            InvalidInputError: an unknown image id (named), an image predicted twice (in this
                batch or an earlier one), or a malformed prediction.
        """
        if isinstance(predictions, Mapping):
            raise InvalidInputError("update() takes a list of per-image prediction dicts, got a single dict")
        batch: dict[int, ImageDetections] = {}
        num_classes = len(self.dataset.label_map)
        for i, prediction in enumerate(predictions):
            if not isinstance(prediction, Mapping) or "image_id" not in prediction:
                raise InvalidInputError(f"prediction {i} of the batch must be a dict with an 'image_id' key")
            image_id = image_id_key(prediction["image_id"])
            position = self._position.get(image_id)
            if position is None:
                known = [r.image_id for r in self.dataset.records[:3]]
                raise InvalidInputError(
                    f"prediction for image id {image_id!r}: no such image in dataset {self.dataset.name!r} "
                    f"({len(self.dataset)} images, ids like {known})"
                )
            if position in self._detections or position in batch:
                raise InvalidInputError(
                    f"image id {image_id!r} was predicted twice; each image must be passed to update() once "
                    "per evaluation pass (call reset() to start a new pass)"
                )
            where = f"prediction for image id {image_id!r}"
            batch[position] = detections_from_prediction(prediction, num_classes, where)
        self._detections.update(batch)

    def gather(self) -> None:
        """Merge the predictions of all ranks into every rank (``all_gather_object``).

        Identity when torch.distributed is not initialised or has one rank. An image predicted on
        several ranks -- ``DistributedSampler`` pads the last round by repeating images -- is kept
        once (the lowest rank's) and counted in ``repeated_across_ranks``. Call it once per pass,
        on every rank.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: list[dict[int, ImageDetections] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._detections)
        merged: dict[int, ImageDetections] = {}
        for rank_detections in gathered:
            for position, detections in (rank_detections or {}).items():
                if position in merged:
                    self.repeated_across_ranks += 1
                else:
                    merged[position] = detections
        self._detections = merged

    def evaluated(self) -> tuple[list[int], list[ImageRecord], list[ImageDetections]]:
        """Dataset positions, records and detections of the images predicted so far, in dataset order."""
        positions = sorted(self._detections)
        return positions, [self.dataset.records[i] for i in positions], [self._detections[i] for i in positions]

    def report(self, score_threshold: float, *, draw: bool = True) -> DiagnosticReport:
        """Confusion matrix, TIDE breakdown, per-class numbers and the worst images drawn
        (:mod:`detr.engine.diagnostics`), at ``score_threshold``, for the images predicted so far."""
        result = self.last_result
        if result is None or result.metrics["eval/images"] != self.num_images:  # none yet, or predictions since
            result = self.compute_results()
        positions, records, detections = self.evaluated()
        return build_report(records, detections, positions, self.dataset.label_map, result.coco, score_threshold,
                            draw=draw)

    def compute(self) -> dict[str, float]:
        """Flat metric name -> value for the images predicted so far (see :class:`EvaluationResult`)."""
        return self.compute_results().metrics

    def compute_results(self) -> EvaluationResult:
        """The metrics and the detailed COCO/VOC results (PR curves, per-class numbers).

        Also kept as :attr:`last_result` until the next ``compute`` or ``reset``.
        """
        positions, records, detections = self.evaluated()
        metrics: dict[str, float] = {}
        coco = voc = None
        if "coco" in self.metrics:
            coco = evaluate_coco(records, detections, self.dataset.label_map, coco_image_ids(positions))
            metrics.update(coco.metrics())
        if "voc" in self.metrics:
            voc = evaluate_voc(records, detections, self.dataset.label_map, iou_threshold=0.5)
            metrics.update(voc.metrics())
        metrics["eval/images"] = float(len(positions))
        metrics["eval/detections"] = float(sum(len(d) for d in detections))
        self.last_result = EvaluationResult(metrics, coco, voc)
        return self.last_result
