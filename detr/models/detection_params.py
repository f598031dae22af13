"""What a caller asks of detection: score threshold, how many detections, the box format.

The one place where their defaults are written and their values checked, for ``detr.predict``, the
serve side (``deploy``: pyfunc params, REST query, ``detr predict``) and the CLI's help. Free of
torch, so that ``detr --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from detr.errors import InvalidInputError

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
SCORE_THRESHOLD_RANGE = (0.0, 1.0)  # scores are probabilities
MAX_DETECTIONS_LIMIT = 1000  # bounds the size of one image's answer
# The score a detection needs to be returned by `detr.predict` and a served model unless a request
# says otherwise; evaluation diagnostics (confusion matrix, drawn images) are taken at it too.
DEFAULT_SCORE_THRESHOLD = 0.5


@dataclass(frozen=True)
class DetectionParams:
    """``score_threshold``: keep detections scoring at least this; ``max_detections``: at most this
    many per image, best first; ``box_format``: xyxy (corners), xywh (COCO: top-left corner, width,
    height) or cxcywh (centre, width, height), all in pixels of the original image."""

    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    max_detections: int = 100
    box_format: str = "xyxy"

    def __post_init__(self) -> None:
        try:
            threshold = float(self.score_threshold)
        except (TypeError, ValueError):
            threshold = float("nan")
        low, high = SCORE_THRESHOLD_RANGE
        if not low <= threshold <= high:
            raise InvalidInputError(f"params.score_threshold must be a number in [{low:g}, {high:g}], "
                           f"got {self.score_threshold!r}")
        if isinstance(self.max_detections, bool) or not isinstance(self.max_detections, int) or not (
            1 <= self.max_detections <= MAX_DETECTIONS_LIMIT
        ):
            raise InvalidInputError(
                f"params.max_detections must be an integer in [1, {MAX_DETECTIONS_LIMIT}], got {self.max_detections!r}"
            )
        if self.box_format not in BOX_FORMATS:
            raise InvalidInputError(f"params.box_format must be one of {', '.join(BOX_FORMATS)}, got {self.box_format!r}")
        object.__setattr__(self, "score_threshold", threshold)

