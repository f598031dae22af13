"""ACME's in-house annotation format, as a mlflow-detr format plugin.

Layout::

    <root>/classes.txt         one class name per line
    <root>/<split>.jsonl       one JSON object per image:
                               {"file": "pics/a.png", "size": [W, H],
                                "objects": [{"class": "circle", "xywh": [x, y, w, h]}, ...]}
    <root>/pics/               the images (paths in "file" are relative to <root>)

Boxes are top-left corner plus size in pixels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from detr.data.formats.external import DatasetFormat, SourceImage
from detr.errors import DatasetFormatError


class AcmeFormat(DatasetFormat):
    name = "acme"
    layout = "classes.txt + <split>.jsonl + pics/"

    def splits(self, path: Path) -> list[str]:
        return sorted(p.stem for p in path.glob("*.jsonl"))

    def class_names(self, path: Path) -> list[str]:
        classes = path / "classes.txt"
        if not classes.is_file():
            raise DatasetFormatError(f"{classes}: not found (ACME datasets list their classes there)")
        return [line.strip() for line in classes.read_text().splitlines() if line.strip()]

    def images(self, path: Path, split: str):
        listing = path / f"{split}.jsonl"
        for line_no, line in enumerate(listing.read_text().splitlines(), 1):
            where = f"{listing}:{line_no}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetFormatError(f"{where}: not valid JSON ({e.msg})") from None
            objects = entry.get("objects", [])
            width, height = entry["size"]
            yield SourceImage(
                path=entry["file"],
                boxes=[[x, y, x + w, y + h] for x, y, w, h in (o["xywh"] for o in objects)],
                labels=[o["class"] for o in objects],
                width=width,
                height=height,
                source=where,
                box_sources=[f"{where}: objects[{j}]" for j in range(len(objects))],
            )

    def write(self, path: Path, split: str, class_names, images) -> None:
        path.mkdir(parents=True, exist_ok=True)
        classes = path / "classes.txt"
        if not classes.exists():
            classes.write_text("".join(f"{name}\n" for name in class_names))
        lines = []
        for image in images:
            target = path / "pics" / Path(image.path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image.path, target)
            objects = [
                {"class": label, "xywh": [x1, y1, x2 - x1, y2 - y1]}
                for (x1, y1, x2, y2), label in zip(image.boxes, image.labels)
            ]
            lines.append(json.dumps({"file": f"pics/{target.name}", "size": [image.width, image.height],
                                     "objects": objects}))
        (path / f"{split}.jsonl").write_text("".join(f"{line}\n" for line in lines))
