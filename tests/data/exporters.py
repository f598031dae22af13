"""Datasets written by independent tools (Datumaro, supervision) and in the layouts other tools export,
from the synthetic set, so that a reader is checked against boxes it did not write itself.

Datumaro (the ``datumaro`` extra) and supervision are in the ``test`` extra; tests that need them call
``pytest.importorskip`` first.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from detr.data import DetectionDataset
from detr.data.synth import synthetic_dataset


def synth_splits(tmp_path: Path, *, train: int = 5, val: int = 3, size=(320, 240)) -> dict[str, DetectionDataset]:
    """The generated shapes set in memory: train and val images (PNG files under ``tmp_path``)."""
    return {
        "train": synthetic_dataset(tmp_path / "synth_images", train, seed=5, image_size=size, progress=False),
        "val": synthetic_dataset(tmp_path / "synth_images", val, seed=5, image_size=size, start=train,
                                 progress=False),
    }


def datumaro_export(splits: dict[str, DetectionDataset], out: Path, fmt: str, *, extra_polygon: bool = False) -> Path:
    """Write ``splits`` with Datumaro's exporter ``fmt`` (boxes as Datumaro ``Bbox(x, y, w, h)``).

    ``extra_polygon`` adds one polygon to the first image, which our readers must count as not
    carried rather than drop silently.
    """
    from datumaro.components.annotation import AnnotationType, Bbox, LabelCategories, Polygon
    from datumaro.components.dataset import Dataset
    from datumaro.components.dataset_base import DatasetItem
    from datumaro.components.media import Image

    names = next(iter(splits.values())).label_map.names
    items = []
    for split, dataset in splits.items():
        for k, record in enumerate(dataset.records):
            annotations = [
                Bbox(float(x1), float(y1), float(x2 - x1), float(y2 - y1), label=int(label),
                     attributes={"occluded": bool(record.attributes["occluded"][i])})
                for i, ((x1, y1, x2, y2), label) in enumerate(zip(record.boxes.tolist(), record.labels.tolist()))
            ]
            if extra_polygon and split == "train" and k == 0:
                annotations.append(Polygon([1, 1, 20, 1, 10, 15], label=0))
            items.append(DatasetItem(id=record.image_path.stem, subset=split,
                                     media=Image.from_file(str(record.image_path)), annotations=annotations))
    dataset = Dataset.from_iterable(items, categories={AnnotationType.label: LabelCategories.from_iterable(names)})
    dataset.export(str(out), fmt, save_media=True)
    return out


def roboflow_export(splits: dict[str, DetectionDataset], out: Path) -> Path:
    """The layout of a Roboflow "YOLOv8" export: ``<split>/images``, ``<split>/labels`` and a data.yaml
    whose entries point one level up (``../train/images``), plus its ``roboflow:`` block.

    Roboflow is a web service, so the layout is written here, as its exports are: the val split is
    called ``valid``; labels hold full-precision normalized values.
    """
    folders = {"train": "train", "val": "valid"}
    config = {}
    for split, dataset in splits.items():
        folder = out / folders[split]
        for record in dataset.records:
            image = folder / "images" / record.image_path.name
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(record.image_path.read_bytes())
            (folder / "labels").mkdir(parents=True, exist_ok=True)
            lines = []
            for (x1, y1, x2, y2), label in zip(record.boxes.tolist(), record.labels.tolist()):
                w, h = record.width, record.height
                lines.append(f"{label} {(x1 + x2) / 2 / w!r} {(y1 + y2) / 2 / h!r} {(x2 - x1) / w!r} {(y2 - y1) / h!r}")
            (folder / "labels" / f"{record.image_path.stem}.txt").write_text("\n".join(lines) + "\n")
        config[split] = f"../{folders[split]}/images"
    names = list(next(iter(splits.values())).label_map.names)
    config.update(test="../test/images", nc=len(names), names=names,
                  roboflow={"workspace": "acme", "project": "shapes", "version": 1, "license": "CC BY 4.0",
                            "url": "https://universe.roboflow.com/acme/shapes/dataset/1"})
    (out / "data.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def supervision_export(splits: dict[str, DetectionDataset], out: Path) -> Path:
    """supervision's ``DetectionDataset.as_yolo`` per split: ``images/<split>/``, ``labels/<split>/``
    (5 decimals) and a data.yaml with only ``nc`` and ``names``."""
    import numpy as np
    import supervision as sv

    for split, dataset in splits.items():
        annotations = {
            str(r.image_path): sv.Detections(xyxy=r.boxes.astype(np.float64).reshape(-1, 4), class_id=r.labels)
            for r in dataset.records
        }
        sv.DetectionDataset(list(dataset.label_map.names), list(annotations), annotations).as_yolo(
            images_directory_path=str(out / "images" / split),
            annotations_directory_path=str(out / "labels" / split),
            data_yaml_path=str(out / "data.yaml"),
        )
    return out


def decimals_export(splits: dict[str, DetectionDataset], out: Path, *, decimals: int) -> Path:
    """supervision's layout, with labels written with ``decimals`` decimals (``%.<d>f``)."""
    for split, dataset in splits.items():
        for record in dataset.records:
            image = out / "images" / split / record.image_path.name
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(record.image_path.read_bytes())
            (out / "labels" / split).mkdir(parents=True, exist_ok=True)
            lines = [
                f"{label} " + " ".join(f"{v:.{decimals}f}" for v in _normalized(box, record.width, record.height))
                for box, label in zip(record.boxes.tolist(), record.labels.tolist())
            ]
            (out / "labels" / split / f"{record.image_path.stem}.txt").write_text("\n".join(lines) + "\n")
    names = list(next(iter(splits.values())).label_map.names)
    (out / "data.yaml").write_text(yaml.safe_dump({"nc": len(names), "names": names}, sort_keys=False))
    return out


def _normalized(box, width, height):
    x1, y1, x2, y2 = box
    return (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height
