"""The dataset layer: annotation formats read into one record type, views and label maps.

``load_dataset`` reads COCO, VOC, YOLO or KITTI (auto-detected), any format Datumaro imports
(``datumaro:<fmt>``) or a plugin's format (:mod:`detr.data.formats.external`) into a :class:`DetectionDataset` of
:class:`ImageRecord` (boxes float32 [N, 4] xyxy absolute pixels, labels int64 [N] into its
:class:`LabelMap`); ``write_dataset`` writes one split in any of the formats; ``load_splits`` /
``load_split`` combine the sources of a :class:`~detr.config.DataConfig` into one label map.
"""

from __future__ import annotations

from detr.data.dataset import DatasetReport, DetectionDataset
from detr.data.formats import FORMATS, list_splits, load_dataset, write_dataset
from detr.data.labelmap import LabelMap
from detr.data.records import ImageRecord
from detr.data.sources import load_split, load_splits
from detr.data.views import apply_view

__all__ = [
    "FORMATS",
    "DatasetReport",
    "DetectionDataset",
    "ImageRecord",
    "LabelMap",
    "apply_view",
    "list_splits",
    "load_dataset",
    "load_split",
    "load_splits",
    "write_dataset",
]
