"""COCO detection JSON: writing (the layout and mapping are described in :mod:`.coco`).

One ``annotations/<split>.json`` per split and the images in ``images/<split>/``. Categories are
numbered 1..K in label order. Integer image ids are kept; other ids (VOC stems, prefixed ids of a
combined dataset) become 1..N in record order, the file name keeping the original name. Boxes read
from COCO keep their annotation id and every key of their annotation object
(``extras["coco_annotation"]``: ``area``, ``segmentation``, ...); the record decides image id,
category, bbox and iscrowd. Boxes from other formats get fresh ids and ``area = w * h``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from detr.data.dataset import DatasetReport, DetectionDataset, ReportBuilder
from detr.data.formats.writing import (
    LossCounter,
    float32_text,
    place_image,
    refuse_existing,
    shortest_decimals,
    unique_file_names,
)


def write(dataset: DetectionDataset, out_dir: Path, split: str, images: str) -> DatasetReport:
    """Write ``annotations/<split>.json`` and ``images/<split>/``; returns what was not written."""
    ann_path = out_dir / "annotations" / f"{split}.json"
    refuse_existing(ann_path, split)
    file_names = unique_file_names(dataset, split)
    losses = LossCounter("COCO", attributes=("iscrowd",), extras_prefix="coco_")
    report = ReportBuilder()

    ids = [r.image_id for r in dataset.records]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        ids = list(range(1, len(ids) + 1))
        if dataset.records:
            report.note(f"{split}: image ids are not integers; written as 1..{len(ids)} (file names keep them)")

    images_json, annotations = [], []
    used_ann_ids = {
        int(a) for r in dataset.records for a in r.extras.get("coco_ann_id", np.zeros(0, np.int64)).tolist()
    }
    next_ann_id = max(used_ann_ids, default=0) + 1
    seen_ann_ids: set[int] = set()
    for record, image_id, file_name in zip(dataset.records, ids, file_names, strict=True):
        losses.visit(record)
        images_json.append(
            {"id": image_id, "file_name": file_name, "width": record.width, "height": record.height}
        )
        xywh = _xywh_text(record.boxes)
        iscrowd = record.attributes.get("iscrowd", np.zeros(record.num_boxes, bool))
        extras = record.extras
        for j in range(record.num_boxes):
            ann_id = int(extras["coco_ann_id"][j]) if "coco_ann_id" in extras else None
            if ann_id is None or ann_id in seen_ann_ids:
                ann_id, next_ann_id = next_ann_id, next_ann_id + 1
            seen_ann_ids.add(ann_id)
            bbox = [_json_number(v) for v in xywh[j]]
            original = extras["coco_annotation"][j] if "coco_annotation" in extras else {}
            ann = {
                "id": ann_id,
                "image_id": image_id,
                "category_id": int(record.labels[j]) + 1,
                "bbox": bbox,
                "area": original.get("area", _json_number(bbox[2] * bbox[3])),
                "iscrowd": int(iscrowd[j]),
            }
            # segmentation and any other keys of the annotation as read; the record decides the rest
            ann.update((k, v) for k, v in original.items() if k not in ann)
            annotations.append(ann)

    categories = [{"id": i + 1, "name": name} for i, name in enumerate(dataset.label_map.names)]
    for record, file_name in zip(dataset.records, file_names, strict=True):
        place_image(record.image_path, out_dir / "images" / split / file_name, images)
    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"images": images_json, "annotations": annotations, "categories": categories}
    ann_path.write_text(json.dumps(payload, separators=(",", ":")), encoding="utf-8")
    report.extend(losses.build())
    return report.build()


def _xywh_text(boxes: np.ndarray) -> np.ndarray:
    """float64 [N, 4] x, y, w, h with the fewest decimals that read back (x + w in float64, then
    float32, as :func:`_read_file` does) to exactly ``boxes`` (float32 [N, 4] xyxy)."""
    xy = float32_text(boxes[:, :2])
    wh = shortest_decimals(boxes[:, 2:] - xy, lambda c: (xy + c).astype(np.float32) == boxes[:, 2:])
    return np.concatenate([xy, wh], axis=1)


def _json_number(value: float) -> int | float:
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value
