"""Class lists: synonyms, seen flags, and the official class-list files (ADE objectInfo, Pascal labels.txt)."""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import DataError, read_text_file
from .concepts import SeenMatch, seen_split


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

    def seen_split(self, train_vocabulary: Sequence[str] | None) -> list[SeenMatch]:
        """Which classes the training vocabulary holds, by concept (`concepts`); without one (a training set)
        every class is seen."""
        return seen_split(self.synonyms, train_vocabulary)


def split_synonyms(name: str, separator: str | None = ",") -> tuple[str, ...]:
    parts = [name] if separator is None else name.split(separator)
    syns = tuple(p.strip() for p in parts if p.strip())
    if not syns:
        raise ValueError(f"empty class name {name!r}")
    return syns


# ---------------------------------------------------------------- ADE objectInfo files

_OBJECT_INFO_NAME = re.compile(r"objectInfo(\d+)$")


@dataclass(frozen=True)
class _ObjectInfoRows:
    path: Path
    tabbed: bool  # the challenge's objectInfo{K}.txt; else the sceneparsing repository's objectInfo{K}.csv
    names: list[str]  # the Name column, row k = label value k+1
    lines: list[int]  # the line of each row


def _read_object_info_rows(path: Path) -> _ObjectInfoRows:
    """Rows of an ADE class file, checked: columns Idx and Name, Idx = 1..K in order, K as in the file name."""
    text = read_text_file(path, "class file")
    lines = text.splitlines()
    header = lines[0] if lines else ""
    tabbed = "\t" in header
    rows = list(csv.reader(lines, delimiter="\t" if tabbed else ","))
    fields = [f.strip() for f in (rows[0] if rows else [])]
    if "Idx" not in fields or "Name" not in fields:
        raise DataError(path, f"class file needs columns Idx and Name (ADE objectInfo layout), found {fields}")
    idx_col, name_col = fields.index("Idx"), fields.index("Name")
    names: list[str] = []
    numbers: list[int] = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = [cell.strip() for cell in row] + [""] * len(fields)
        if cells[idx_col] != str(len(names) + 1):
            raise DataError(path, f"line {line}: Idx {cells[idx_col]!r}, expected {len(names) + 1} "
                                  "(rows must be 1..K in order)")
        if not cells[name_col].strip(" ,;"):
            raise DataError(path, f"line {line}: empty class name")
        names.append(cells[name_col])
        numbers.append(line)
    if not names:
        raise DataError(path, "class file lists no classes")
    declared = _OBJECT_INFO_NAME.match(path.stem)
    if declared and int(declared.group(1)) != len(names):
        raise DataError(path, f"class file lists {len(names)} classes but its name says {declared.group(1)}")
    return _ObjectInfoRows(path, tabbed, names, numbers)


def _csv_words(synonyms: Sequence[str]) -> list[str]:
    """How objectInfo{K}.csv writes a class: every word of every synonym joined by ';'."""
    return [w.lower() for s in synonyms for w in s.split()]


def read_object_info(paths: Sequence[Path], builtin: ClassList) -> ClassList:
    """The classes of ADE class files of one list, each checked against the reference list.

    `objectInfo{K}.txt` (the challenge release: tab-separated, synonyms split by ', ') names classes
    unambiguously. `objectInfo{K}.csv` (the sceneparsing repository) joins the words of a name and the
    synonyms alike with ';' ("chest;of;drawers;chest;bureau;dresser"), so it can only be checked against a
    reference, never read alone. The reference is `builtin` when it has K classes (the official 150),
    else the .txt. Columns Idx,Ratio,Train,Val[,Stuff],Name; Idx = label value 1..K."""
    files = [_read_object_info_rows(Path(p)) for p in paths]
    sizes = {len(f.names) for f in files}
    if len(sizes) > 1:
        raise DataError(files[0].path, f"class files {[str(f.path) for f in files]} list different numbers "
                                       "of classes")
    size = sizes.pop()
    texts = [f for f in files if f.tabbed]
    if len(builtin) == size:
        reference, what = builtin, f"the official {size}-class list"
    elif texts:
        reference, what = ClassList.from_names(texts[0].names), str(texts[0].path)
    else:
        raise DataError(files[0].path, f"an objectInfo .csv joins words and synonyms alike with ';', so its "
                                       f"{size} class names need the matching objectInfo{size}.txt beside it")
    for f in files:
        for k, (raw, line, expected) in enumerate(zip(f.names, f.lines, reference.synonyms)):
            if f.tabbed:
                ok = [s.lower() for s in split_synonyms(raw)] == [s.lower() for s in expected]
            else:
                ok = [w.strip().lower() for w in raw.split(";") if w.strip()] == _csv_words(expected)
            if not ok:
                raise DataError(f.path, f"line {line}: {raw!r} is not class {k + 1} of {what} "
                                        f"({', '.join(expected)!r})")
    return reference


# ---------------------------------------------------------------- Pascal Context label lists

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
