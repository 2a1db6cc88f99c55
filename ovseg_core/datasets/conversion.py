"""The conversion loop every reader shares: probe the image, decode and map the label, check, write."""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from ..errors import DataError
from ..progress import track
from .classes import ClassList
from .prepared import PreparedDataset, PreparedWriter

INVALID = -1  # marks raw label values that no class or ignore value maps from


@dataclass(frozen=True)
class Item:
    """One sample to convert: `label` is the annotation file named in errors (None for caption-only data).
    An image inside an archive is the path `<archive>/<member>` (`image`, how the prepared set refers to it:
    ovseg_core.archive) and comes with its bytes (`data`), read as the reader streams the archive."""

    id: str
    image: Path
    label: Path | None
    data: bytes | None = None


def require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise DataError(path, f"dataset directory is missing; expected layout: {layout}")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(path, f"{what} is missing")
    return path


def read_split_list(path: Path) -> list[str]:
    """An image-id list (VOC `ImageSets/*/<split>.txt`): one id per line."""
    try:
        ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError as e:
        raise DataError(path, "split list is missing") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"split list is unreadable: {e}") from e
    ids = [i for i in ids if i]
    if not ids:
        raise DataError(path, "split list names no images")
    return ids


def ignore_for(num_classes: int) -> int:
    return 255 if num_classes <= 255 else 65535


def probe_image(path: Path | BinaryIO) -> tuple[int, int] | str:
    """(width, height) of a decodable image, or the reason it cannot be used. JPEGs are decoded at reduced
    scale (draft mode): that still reads every entropy-coded block, so truncation and corruption surface."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size = im.size
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                im.load()
        return size
    except FileNotFoundError:
        return "image file is missing"
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"image fails to decode: {e}"


_INDEX_MODES = {"L", "P", "I", "I;16", "I;16B", "I;16L"}


def read_index_label(path: Path) -> np.ndarray:
    """A single-channel label image (8-bit grey or palette PNG, 16-bit PNG/TIFF): its raw integer values."""
    try:
        with Image.open(path) as im:
            if im.mode not in _INDEX_MODES:
                raise DataError(path, f"label map has image mode {im.mode}; expected one channel of label ids "
                                      "(8-bit grey or palette, or 16-bit)")
            return np.asarray(im)
    except FileNotFoundError as e:
        raise DataError(path, "label file is missing") from e
    except OSError as e:
        raise DataError(path, f"label map fails to decode: {e}") from e


def read_rgb_label(path: Path) -> np.ndarray:
    """An RGB-encoded label image (ADE20K `*_seg.png`) as uint8 [H, W, 3]."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA"):
                raise DataError(path, f"label map has image mode {im.mode}; expected RGB")
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError as e:
        raise DataError(path, "label file is missing") from e
    except OSError as e:
        raise DataError(path, f"label map fails to decode: {e}") from e


def apply_lut(raw: np.ndarray, lut: np.ndarray, path: Path, expected: str) -> np.ndarray:
    """Map raw label values through `lut` (INVALID entries, and values beyond it, are errors naming the file)."""
    raw = np.asarray(raw)
    outside = raw.size > 0 and (int(raw.min()) < 0 or int(raw.max()) >= len(lut))
    mapped = lut[np.clip(raw, 0, len(lut) - 1)] if outside else lut[raw]
    bad = mapped == INVALID
    if outside:
        bad |= (raw < 0) | (raw >= len(lut))
    if bad.any():
        values = np.unique(raw[bad])[:10].tolist()
        raise DataError(path, f"label values {values} outside the class range (expected {expected})")
    return mapped


def check_size(label: np.ndarray, size: tuple[int, int], label_path: Path, image_path: Path) -> None:
    if label.shape[:2] != (size[1], size[0]):
        raise DataError(label_path, f"label map is {label.shape[1]}x{label.shape[0]} but its image "
                                    f"{image_path} is {size[0]}x{size[1]}")


def write_prepared(
    out_root: Path,
    name: str,
    classes: ClassList,
    train_vocabulary: Sequence[str] | None,
    items: Sequence[Item] | Iterable[Item],
    make_label: Callable[[Item], np.ndarray] | None,
    source: dict[str, Any],
    captions: dict[str, list[str]] | None = None,
    total: int | None = None,
    skipped: Iterable[tuple[Path, str]] = (),
) -> PreparedDataset:
    """Convert `items` into a prepared dataset at `out_root`. Undecodable images are skipped and recorded;
    every problem with a label is a DataError. `make_label` returns class ids 0..K-1 and the ignore label.
    `skipped`: (file, reason) of images the reader passed over itself. A streaming reader passes `items` as
    an iterator (with its `total`, for progress) and may fill `captions` and `skipped` as it is consumed:
    they are read after the last item."""
    ignore = ignore_for(len(classes))
    out_root = Path(out_root)
    source = dict(source, synonyms=[list(s) for s in classes.synonyms])
    split = classes.seen_split(train_vocabulary)
    with PreparedWriter(out_root, name, classes.names, [m.seen for m in split], ignore, source,
                        [m.row(c) for c, m in zip(classes.names, split)]) as writer:
        where = out_root
        for item in track(items, len(items) if total is None else total, f"prepare {name}"):
            where = item.image.parent
            size = probe_image(item.image if item.data is None else io.BytesIO(item.data))
            if isinstance(size, str):
                writer.skip(relative(item.image, out_root), size)
                continue
            label = None
            if make_label is not None:
                assert item.label is not None
                label = make_label(item)
                check_size(label, size, item.label, item.image)
            writer.add(item.id, item.image, label, label_source=item.label or item.image)
        for path, reason in skipped:
            writer.skip(relative(path, out_root), reason)
        if not writer.samples:
            raise DataError(where, f"no usable samples for {name} ({len(writer.skipped)} images failed to decode)")
        if captions is not None:
            kept = {s.id for s in writer.samples}
            writer.set_captions({k: v for k, v in captions.items() if k in kept})
    return PreparedDataset.load(out_root)


def relative(path: Path, start: Path) -> str:
    """A path as stored in dataset.json: relative to the prepared root, so the output does not depend on
    where the checkout lives."""
    return os.path.relpath(Path(path).resolve(), Path(start).resolve())
