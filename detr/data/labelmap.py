"""Label map: ordered class names <-> contiguous ids 0..K-1.

The model has K classes plus DETR's no-object slot; K always comes from here, never from a user-typed
``num_classes``. The map is saved as JSON next to every checkpoint, MLflow run and served model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detr.errors import ConfigError, DatasetFormatError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class LabelMap:
    """Ordered, unique class names; the id of a name is its position."""

    names: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        seen: set[str] = set()
        for name in self.names:
            if not isinstance(name, str) or not name.strip():
                raise DatasetFormatError(f"class names must be non-empty strings, got {name!r}")
            if name in seen:
                raise DatasetFormatError(f"class name {name!r} appears twice in label map {list(self.names)}")
            seen.add(name)
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(self.names)})

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def id_of(self, name: str, *, where: str = "") -> int:
        """The id of ``name``; an unknown name is an error naming ``where`` it was found."""
        class_id = self._index.get(name)
        if class_id is None:
            place = f"{where}: " if where else ""
            raise DatasetFormatError(f"{place}unknown class {name!r}; known classes: {list(self.names)}")
        return class_id

    def name_of(self, class_id: int) -> str:
        return self.names[class_id]

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: Mapping, *, source: str = "label map") -> LabelMap:
        if not isinstance(data, Mapping) or not isinstance(data.get("names"), list):
            raise DatasetFormatError(f"{source}: expected an object with a list 'names', got {type(data).__name__}")
        return cls(tuple(data["names"]))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DatasetFormatError(f"{path}: label map file not found") from None
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return cls.from_dict(data, source=str(path))

    # -- edits ---------------------------------------------------------------------------------
    def remap(
        self,
        rename: Mapping[str, str] | None = None,
        keep: Sequence[str] | None = None,
    ) -> tuple[LabelMap, np.ndarray]:
        """Rename (several old names to one new name merges them), then keep a subset.

        Returns the new map and ``old_to_new`` int64 [K_old] with -1 for removed classes. The new
        order is the order of ``keep`` when given, else first appearance in the renamed old order.
        """
        rename = dict(rename or {})
        unknown = [old for old in rename if old not in self]
        if unknown:
            raise ConfigError(f"labels.rename: unknown classes {unknown}; known classes: {list(self.names)}")
        renamed = [rename.get(n, n) for n in self.names]
        merged = list(dict.fromkeys(renamed))
        if keep is not None:
            missing = [k for k in keep if k not in merged]
            if missing:
                raise ConfigError(
                    f"labels.keep: unknown classes {missing}; classes after renaming: {merged}"
                )
            if len(set(keep)) != len(keep):
                raise ConfigError(f"labels.keep lists a class twice: {list(keep)}")
            merged = list(keep)
        new = LabelMap(tuple(merged))
        new_index = new._index
        old_to_new = np.array([new_index.get(n, -1) for n in renamed], dtype=np.int64)
        return new, old_to_new

    def mapping_to(self, other: LabelMap) -> np.ndarray:
        """int64 [K_self] ids of this map's names in ``other`` (-1 where ``other`` lacks a name)."""
        index = other._index
        return np.array([index.get(n, -1) for n in self.names], dtype=np.int64)

    def require_same(self, other: LabelMap, *, this: str, that: str) -> None:
        """Raise when two maps differ; the message names both sides and the difference."""
        if self.names == other.names:
            return
        only_this = [n for n in self.names if n not in other]
        only_that = [n for n in other.names if n not in self]
        detail = (
            f"only in {this}: {only_this}; only in {that}: {only_that}"
            if only_this or only_that
            else "same classes in a different order"
        )
        raise DatasetFormatError(
            f"label map of {this} {list(self.names)} does not match {that} {list(other.names)} ({detail})"
        )

    @staticmethod
    def union(maps: Iterable[LabelMap]) -> LabelMap:
        """One map holding every name, in order of first appearance."""
        names: dict[str, None] = {}
        for m in maps:
            names.update(dict.fromkeys(m.names))
        return LabelMap(tuple(names))
