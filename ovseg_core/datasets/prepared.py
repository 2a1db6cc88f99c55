"""The common prepared form every dataset is converted to by the `prepare` stage.

Layout of one prepared dataset directory::

    <root>/dataset.json     name, classes, seen flags, ignore label, samples, source, skipped count
    <root>/seen.csv         the seen/unseen split and its basis: class, seen, train_class, rule
    <root>/labels.tar       label maps, member <id>.png: uint8 PNG when ignore is 255, uint16 PNG when 65535
    <root>/captions.json    optional: {image id: [caption, ...]}

Images are not copied (a real COCO is 19 GB): each sample stores the image path relative to `<root>`, pointing
into the raw dataset, through a tar where the image is an archive member (an img2dataset shard:
`../web/00000.tar/<key>.jpg`, see `ovseg_core.archive`). Label maps are kept in one tar rather than as a file
each: at COCO size that is one file instead of 118K for DVC to hash and for a teammate to pull.
Class ids are 0..K-1; every other value is `ignore_label`.
A class is *seen* when the proposal network's training vocabulary holds its concept (`concepts`); seen.csv
names, for each class, the training class it matched and by which rule, so that seen / unseen scores can
be checked.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from ..archive import read_bytes, reproducible_tar_writer
from ..atomic import atomic_dir, write_csv
from ..errors import DataError

if TYPE_CHECKING:
    import webdataset as wds

DATASET_FILE = "dataset.json"
LABELS_TAR = "labels.tar"
SEEN_FILE = "seen.csv"
CAPTIONS_FILE = "captions.json"


@dataclass(frozen=True)
class Sample:
    id: str
    image: str  # relative to the dataset root, possibly through a tar (ovseg_core.archive)
    label: str | None  # labels.tar/<id>.png, relative to the dataset root; None for caption-only data


@dataclass
class PreparedDataset:
    root: Path
    name: str
    classes: list[str]
    seen: list[bool]
    ignore_label: int
    samples: list[Sample]
    source: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def head(self, n: int | None) -> "PreparedDataset":
        """The same dataset restricted to its first `n` samples (all when n is None)."""
        return dataclasses.replace(self, samples=self.samples[:n])

    def image_path(self, i: int) -> Path:
        return self.root / self.samples[i].image

    def load_image(self, i: int) -> np.ndarray:
        """RGB uint8 array [H, W, 3]."""
        return load_rgb(self.image_path(i))

    def load_label(self, i: int) -> np.ndarray:
        """int64 array [H, W] with class ids 0..K-1 and `ignore_label`."""
        rel = self.samples[i].label
        if rel is None:
            raise DataError(self.root / DATASET_FILE, f"sample {self.samples[i].id} has no label map")
        path = self.root / rel
        try:
            with Image.open(io.BytesIO(read_bytes(path, "label map"))) as im:
                return np.asarray(im, dtype=np.int64)
        except OSError as e:
            raise DataError(path, f"label map fails to decode: {e}") from e

    def captions(self) -> dict[str, list[str]]:
        path = self.root / CAPTIONS_FILE
        if not path.exists():
            raise DataError(path, "this prepared dataset has no captions")
        return json.loads(path.read_text())

    def __iter__(self) -> Iterator[tuple[Sample, np.ndarray, np.ndarray]]:
        for i, s in enumerate(self.samples):
            yield s, self.load_image(i), self.load_label(i)

    @classmethod
    def load(cls, root: str | Path) -> "PreparedDataset":
        root = Path(root)
        path = root / DATASET_FILE
        if not path.exists():
            raise DataError(path, "not a prepared dataset (run the prepare stage first)")
        try:
            meta = json.loads(path.read_text())
            samples = [Sample(**s) for s in meta.pop("samples")]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(path, f"malformed prepared dataset file: {e}") from e
        return cls(root=root, samples=samples, **meta)


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image (a file or an archive member) as RGB uint8, or raise DataError naming it."""
    try:
        with Image.open(io.BytesIO(read_bytes(path, "image file"))) as im:
            return np.array(im.convert("RGB"))  # writable, so torch.from_numpy needs no copy
    except OSError as e:
        raise DataError(path, f"image fails to decode: {e}") from e


def encode_label(label: np.ndarray, ignore_label: int) -> bytes:
    """A label map as PNG: uint8 when the ignore label is 255, uint16 when it is 65535."""
    dtype = np.uint8 if ignore_label == 255 else np.uint16
    buf = io.BytesIO()
    Image.fromarray(label.astype(dtype)).save(buf, format="PNG")
    return buf.getvalue()


def save_label(path: Path, label: np.ndarray, ignore_label: int) -> None:
    Path(path).write_bytes(encode_label(label, ignore_label))


class PreparedWriter:
    """Builds a prepared dataset in a temporary directory that replaces `root` only when complete.

    Usage::

        with PreparedWriter(root, name, classes, seen, ignore_label, source, seen_basis) as w:
            w.add(sample_id, image_path, label_array)
            w.skip(path, reason)          # a corrupt image, reported in dataset.json
            w.add(sample_id, "shard.tar/key.jpg", label_array)  # an image inside an archive
            w.set_captions({...})
    """

    def __init__(
        self,
        root: str | Path,
        name: str,
        classes: list[str],
        seen: list[bool],
        ignore_label: int,
        source: dict[str, Any] | None = None,
        seen_basis: Sequence[Mapping[str, Any]] | None = None,  # per class: why seen or not (seen.csv rows)
    ):
        if len(classes) != len(seen):
            raise ValueError("classes and seen flags differ in length")
        if seen_basis is not None and [r["seen"] for r in seen_basis] != [bool(s) for s in seen]:
            raise ValueError("seen_basis disagrees with the seen flags")
        if ignore_label not in (255, 65535):
            raise ValueError("ignore_label must be 255 or 65535")
        if ignore_label == 255 and len(classes) > 255:
            raise ValueError(f"{name}: {len(classes)} classes need ignore label 65535")
        self.root = Path(root)
        self.meta = dict(name=name, classes=list(classes), seen=[bool(s) for s in seen],
                         ignore_label=ignore_label, source=source or {})
        self.seen_basis = list(seen_basis or [])
        self.samples: list[Sample] = []
        self.skipped: list[dict[str, str]] = []
        self.captions: dict[str, list[str]] | None = None
        self._ids: set[str] = set()
        self._labels: wds.TarWriter | None = None

    def __enter__(self) -> "PreparedWriter":
        self._ctx = atomic_dir(self.root)
        self.tmp = self._ctx.__enter__()
        return self

    def _write_label(self, sample_id: str, png: bytes) -> str:
        if self._labels is None:  # created on the first label: caption-only sets have no labels.tar
            self._labels = reproducible_tar_writer(self.tmp / LABELS_TAR)
        self._labels.write({"__key__": sample_id, "png": png})
        return f"{LABELS_TAR}/{sample_id}.png"

    def add(self, sample_id: str, image_path: str | Path, label: np.ndarray | None,
            label_source: str | Path | None = None) -> None:
        """Add one sample. `label` must hold only 0..K-1 or the ignore label; `label_source` names the
        annotation file in the error otherwise."""
        if sample_id in self._ids:
            raise DataError(label_source or image_path, f"duplicate sample id {sample_id!r}")
        self._ids.add(sample_id)
        rel_label = None
        if label is not None:
            k, ignore = len(self.meta["classes"]), self.meta["ignore_label"]
            bad = (label != ignore) & ((label < 0) | (label >= k))
            if bad.any():
                values = sorted(set(np.unique(label[bad]).tolist()))[:10]
                raise DataError(label_source or image_path,
                                f"label values {values} outside the class range 0..{k - 1} (ignore {ignore})")
            rel_label = self._write_label(sample_id, encode_label(label, ignore))
        rel_image = os.path.relpath(Path(image_path).resolve(), self.root.resolve())
        self.samples.append(Sample(sample_id, rel_image, rel_label))

    def skip(self, path: str | Path, reason: str) -> None:
        self.skipped.append({"path": str(path), "reason": reason})

    def set_captions(self, captions: dict[str, list[str]]) -> None:
        self.captions = captions

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        if self._labels is not None:
            self._labels.close()  # closes the file too
        if exc_type is None:
            meta = dict(self.meta, samples=[asdict(s) for s in self.samples], skipped=self.skipped)
            (self.tmp / DATASET_FILE).write_text(json.dumps(meta, indent=1) + "\n")
            if self.seen_basis:
                write_csv(self.tmp / SEEN_FILE, self.seen_basis)
            if self.captions is not None:
                (self.tmp / CAPTIONS_FILE).write_text(json.dumps(self.captions, indent=1, sort_keys=True) + "\n")
        return self._ctx.__exit__(exc_type, exc, tb)
