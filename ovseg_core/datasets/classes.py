"""Class lists: synonyms, seen flags, and the official class-list files (ADE objectInfo, Pascal labels.txt)."""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import DataError, read_text_file

# COCO-Stuff marks merged or catch-all classes with these suffixes ("wall-other", "tree-merged", "desk-stuff").
_COCO_SUFFIXES = ("-other", "-merged", "-stuff")


@dataclass(frozen=True)
class ClassList:
    """The classes of one dataset in label-id order; each class is a list of synonyms, the first its display name."""

    synonyms: tuple[tuple[str, ...], ...]

    @classmethod
    def from_names(cls, names: Iterable[str], separator: str | None = ",") -> "ClassList":
        return cls(tuple(split_synonyms(n, separator) for n in names))

    @property
    def names(self) -> list[str]:
        return [s[0] for s in self.synonyms]

    def __len__(self) -> int:
        return len(self.synonyms)

    def seen(self, train_vocabulary: Sequence[str] | None) -> list[bool]:
        """A class is seen when any synonym is in the training vocabulary; without one (a training set) all are."""
        if train_vocabulary is None:
            return [True] * len(self)
        vocab = {normalise_name(v) for v in train_vocabulary}
        return [any(normalise_name(s) in vocab for s in syns) for syns in self.synonyms]


def split_synonyms(name: str, separator: str | None = ",") -> tuple[str, ...]:
    parts = [name] if separator is None else name.split(separator)
    syns = tuple(p.strip() for p in parts if p.strip())
    if not syns:
        raise ValueError(f"empty class name {name!r}")
    return syns


def normalise_name(name: str) -> str:
    """Case-insensitive, with underscores as spaces and COCO-Stuff suffixes dropped ("Wall-Other" → "wall")."""
    name = name.strip().lower().replace("_", " ")
    stripped = True
    while stripped:
        stripped = False
        for suffix in _COCO_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                name, stripped = name[: -len(suffix)].strip(), True
    return name


def read_object_info(path: Path) -> ClassList:
    """ADE's class file: `objectInfo{K}.csv` (comma-separated, synonyms split by ';') or the challenge's
    `objectInfo150.txt` (tab-separated, synonyms split by ', '). Columns Idx,Ratio,Train,Val,Name; Idx = 1..K."""
    text = read_text_file(path, "class file")
    header = text.splitlines()[0] if text.strip() else ""
    delimiter, separator = ("\t", ",") if "\t" in header else (",", ";")
    rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
    fields = [f.strip() for f in (rows[0].keys() if rows else header.split(delimiter))]
    if "Idx" not in fields or "Name" not in fields:
        raise DataError(path, f"class file needs columns Idx and Name (ADE objectInfo layout), found {fields}")
    synonyms = []
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if row.get("Idx") != str(line - 1):
            raise DataError(path, f"line {line}: Idx {row.get('Idx')!r}, expected {line - 1} "
                                  "(rows must be 1..K in order)")
        try:
            synonyms.append(split_synonyms(row["Name"], separator))
        except ValueError:
            raise DataError(path, f"line {line}: empty class name") from None
    if not synonyms:
        raise DataError(path, "class file lists no classes")
    return ClassList(tuple(synonyms))


_NUMBERED = re.compile(r"^\s*(\d+)\s*:\s*(.+?)\s*$")


def read_numbered_labels(path: Path) -> dict[int, str]:
    """Pascal Context's `labels.txt` / `59_labels.txt`: one `id: name` per line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise DataError(path, "label list file is missing") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"label list file is unreadable: {e}") from e
    labels: dict[int, str] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        m = _NUMBERED.match(line)
        if m is None:
            raise DataError(path, f"line {n}: expected 'id: name', found {line!r}")
        idx = int(m.group(1))
        if idx in labels:
            raise DataError(path, f"line {n}: id {idx} listed twice")
        labels[idx] = m.group(2)
    if not labels:
        raise DataError(path, "label list file lists no classes")
    return labels


def read_name_list(path: Path) -> list[str]:
    """A class-name list in line order: one `name` or `id: name` per line (Pascal Context's `59_labels.txt`,
    whose class order is its line order)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise DataError(path, "class list file is missing") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"class list file is unreadable: {e}") from e
    names = [line.rsplit(":", 1)[-1].strip() for line in lines]
    names = [n for n in names if n]
    if not names:
        raise DataError(path, "class list file lists no classes")
    if len(set(names)) != len(names):
        raise DataError(path, "class list file lists a name twice")
    return names
