"""Mined mask–noun pairs as WebDataset shards, with a parquet index, sizes.json and a dataset card.

Layout of a pairs directory (one shard per mining unit, units fan out in parallel)::

    pairs-000000.tar            WebDataset shard; per pair <key>.jpg|png (masked crop), <key>.mask.png
                                (binary mask, 0/255), <key>.txt (the noun: open_clip reads jpg+txt),
                                <key>.json (metadata)
    pairs-000000.stats.json     written last: its presence marks the shard complete (sha256, count, nouns)
    sizes.json                  {shard file name: pair count}, as open_clip/webdataset loaders read it
    index.parquet               one row per pair: shard, key, metadata, byte offset/size of each member
    README.md                   dataset card

Shard bytes are reproducible: fixed member mtime, owner and mode, deterministic keys and encoders.
A shard is written under a temporary name and renamed when complete; the stats file follows.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch.utils.data
import yaml
from PIL import Image

from .archive import reproducible_tar_writer
from .atomic import atomic_file, write_json, write_text
from .errors import DataError

SHARD_PREFIX = "pairs-"
SIZES_FILE = "sizes.json"
INDEX_FILE = "index.parquet"
CARD_FILE = "README.md"
FORMAT_VERSION = 1
IMAGE_FORMATS = ("jpg", "png")
MEMBERS = ("image", "mask", "txt", "json")  # member roles; "image" is stored as .jpg or .png
_KEY = re.compile(r"[A-Za-z0-9_-]+")
_STATS = re.compile(rf"{SHARD_PREFIX}(\d{{6}})\.stats\.json")


def shard_name(unit: int) -> str:
    return f"{SHARD_PREFIX}{unit:06d}.tar"


def stats_name(unit: int) -> str:
    return f"{SHARD_PREFIX}{unit:06d}.stats.json"


def pair_key(image_id: int | str, k: int) -> str:
    """Deterministic dot-free key of the k-th pair of an image: `{image_id:012d}_{k:03d}` for numeric
    ids (COCO), `{image_id}_{k:03d}` for other ids made of letters, digits, '_' and '-'."""
    if k < 0:
        raise ValueError(f"pair index must be >= 0, got {k}")
    text = str(image_id)
    if text.isdigit():
        return f"{int(text):012d}_{k:03d}"
    if not _KEY.fullmatch(text):
        raise ValueError(f"image id {image_id!r} cannot form a WebDataset key (letters, digits, _ and - only)")
    return f"{text}_{k:03d}"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(eq=False)  # arrays inside: no field-wise ==
class Pair:
    """One mined pair: a masked crop of a proposal and the caption noun it was matched to."""

    key: str  # see pair_key
    image_id: str
    caption: str  # the caption the noun came from
    noun: str
    proposal_index: int
    score: float  # CLIP cosine similarity of crop and noun
    bbox: tuple[float, float, float, float]  # proposal box x0, y0, x1, y1 in source-image pixels
    crop: np.ndarray  # uint8 [H, W, 3], background already filled
    mask: np.ndarray  # bool [H, W], aligned with the crop
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable metadata

    def metadata(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "image_id": str(self.image_id),
            "caption": self.caption,
            "noun": self.noun,
            "proposal_index": int(self.proposal_index),
            "score": float(self.score),
            "bbox": [float(v) for v in self.bbox],
            "crop_size": [int(self.crop.shape[0]), int(self.crop.shape[1])],
            "extra": self.extra,
        }

    def validate(self) -> None:
        if not _KEY.fullmatch(self.key):
            raise ValueError(f"pair key {self.key!r} must be dot-free (letters, digits, _ and -)")
        if not self.noun or "\n" in self.noun:
            raise ValueError(f"{self.key}: noun must be one non-empty line, got {self.noun!r}")
        if self.crop.dtype != np.uint8 or self.crop.ndim != 3 or self.crop.shape[2] != 3:
            raise ValueError(f"{self.key}: crop must be uint8 [H, W, 3], got {self.crop.dtype} {self.crop.shape}")
        if self.mask.dtype != np.bool_ or self.mask.shape != self.crop.shape[:2]:
            raise ValueError(f"{self.key}: mask must be bool {self.crop.shape[:2]}, got {self.mask.dtype} {self.mask.shape}")
        if len(self.bbox) != 4 or not math.isfinite(self.score):
            raise ValueError(f"{self.key}: bbox needs 4 values and score must be finite")


def _encode_image(array: np.ndarray, fmt: str, jpeg_quality: int = 95) -> bytes:
    # Encoded here rather than by TarWriter's default encoder, which fixes JPEG quality at 100.
    # No chroma subsampling (4:4:4): it would smear colour across the crop's hard mask edges.
    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(array).save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    else:
        Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class PairShardWriter:
    """Writes the pairs of one unit to `pairs-{unit:06d}.tar`, atomically, then its stats file.

    Usage::

        with PairShardWriter(out_dir, unit) as w:
            for pair in pairs:
                w.write(pair)

    If the block raises, the temporary tar is removed and no stats file is written.
    """

    def __init__(self, out_dir: str | Path, unit: int, image_format: str = "jpg", jpeg_quality: int = 95):
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        if unit < 0:
            raise ValueError(f"unit must be >= 0, got {unit}")
        self.out_dir = Path(out_dir)
        self.unit = unit
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.tar_path = self.out_dir / shard_name(unit)
        self.stats_path = self.out_dir / stats_name(unit)
        self.nouns: Counter[str] = Counter()
        self._keys: set[str] = set()

    def __enter__(self) -> "PairShardWriter":
        self.stats_path.unlink(missing_ok=True)  # a rewritten unit is incomplete until its stats exist
        self._atomic = atomic_file(self.tar_path)
        tmp = self._atomic.__enter__()
        self._file = open(tmp, "wb")
        self._tar = reproducible_tar_writer(self._file)
        return self

    @property
    def count(self) -> int:
        """Pairs written so far."""
        return len(self._keys)

    def write(self, pair: Pair) -> None:
        pair.validate()
        if pair.key in self._keys:
            raise ValueError(f"duplicate pair key {pair.key!r} in unit {self.unit}")
        mask = np.where(pair.mask, 255, 0).astype(np.uint8)
        self._tar.write({
            "__key__": pair.key,
            self.image_format: _encode_image(pair.crop, self.image_format, self.jpeg_quality),
            "mask.png": _encode_image(mask, "png"),
            "txt": pair.noun.encode("utf-8"),
            "json": json.dumps(pair.metadata(), sort_keys=True).encode("utf-8"),
        })
        self._keys.add(pair.key)
        self.nouns[pair.noun] += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._tar.close()
        finally:
            self._file.close()
        self._atomic.__exit__(exc_type, exc, tb)  # renames the tar on success, removes it on error
        if exc_type is None:
            write_json(self.stats_path, {
                "format_version": FORMAT_VERSION,
                "unit": self.unit,
                "shard": self.tar_path.name,
                "count": len(self._keys),
                "bytes": self.tar_path.stat().st_size,
                "sha256": file_sha256(self.tar_path),
                "image_format": self.image_format,
                "nouns": dict(sorted(self.nouns.items())),
            })


def write_shard(out_dir: str | Path, unit: int, pairs: Iterable[Pair], **options: Any) -> Path:
    """Write one unit's pairs; returns the shard path."""
    with PairShardWriter(out_dir, unit, **options) as w:
        for pair in pairs:
            w.write(pair)
    return w.tar_path


# ---------------------------------------------------------------------------------------------
# completeness, resume
# ---------------------------------------------------------------------------------------------


def _read_stats(path: Path) -> dict[str, Any]:
    try:
        stats = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(path, f"malformed shard stats file: {e}") from None
    missing = [n for n in ("unit", "shard", "count", "bytes", "sha256", "nouns") if not isinstance(stats, dict) or n not in stats]
    if missing:
        raise DataError(path, f"shard stats file lacks {missing}")
    return stats


def _shard_problem(out_dir: Path, stats: Mapping[str, Any], verify: bool) -> str | None:
    tar = out_dir / stats["shard"]
    if not tar.is_file():
        return "its shard is missing"
    if tar.stat().st_size != stats["bytes"]:
        return f"shard size {tar.stat().st_size} differs from the recorded {stats['bytes']}"
    if verify and file_sha256(tar) != stats["sha256"]:
        return "shard sha256 differs from the recorded checksum"
    return None


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and ".tmp" in path.name  # atomic_file's temporary names


def completed_units(out_dir: str | Path, verify: bool = True) -> list[int]:
    """Units whose shard is complete (stats file present, tar size and sha256 as recorded).

    Also clears what a crash leaves behind, so a resumed run rewrites it: temporary files, shards
    without a stats file, and stats whose shard is missing or differs.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    for path in out_dir.iterdir():
        if _is_temporary(path):
            path.unlink()
    done = []
    for path in sorted(out_dir.glob(f"{SHARD_PREFIX}*.stats.json")):
        match = _STATS.fullmatch(path.name)
        try:
            stats = _read_stats(path) if match else None
        except DataError:
            stats = None
        if stats is None or stats["shard"] != shard_name(int(match.group(1))) or _shard_problem(out_dir, stats, verify):
            path.unlink()
            continue
        done.append(int(match.group(1)))
    complete = {shard_name(u) for u in done}
    for tar in out_dir.glob(f"{SHARD_PREFIX}*.tar"):
        if tar.name not in complete:
            tar.unlink()
    return done


# ---------------------------------------------------------------------------------------------
# finalize: sizes.json, parquet index, dataset card
# ---------------------------------------------------------------------------------------------


def _split_member(name: str) -> tuple[str, str]:
    key, _, ext = name.partition(".")  # WebDataset's rule: the key ends at the first dot
    return key, ext


def _scan_shard(path: Path) -> list[dict[str, Any]]:
    """Index rows of one shard: metadata from each .json member plus every member's byte range."""
    samples: dict[str, dict[str, Any]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = _split_member(info.name)
            role = {"mask.png": "mask", "txt": "txt", "json": "json"}.get(ext, "image" if ext in IMAGE_FORMATS else None)
            if role is None:
                raise DataError(path, f"unexpected member {info.name}")
            row = samples.setdefault(key, {"shard": path.name, "key": key})
            row[f"{role}_offset"] = info.offset_data
            row[f"{role}_size"] = info.size
            if role == "image":
                row["image_format"] = ext
            elif role == "json":
                meta = json.loads(tar.extractfile(info).read())
                row.update(image_id=meta["image_id"], noun=meta["noun"], caption=meta["caption"],
                           proposal_index=meta["proposal_index"], score=meta["score"], bbox=meta["bbox"],
                           extra=json.dumps(meta["extra"], sort_keys=True))
    for key, row in samples.items():
        missing = [role for role in MEMBERS if f"{role}_offset" not in row]
        if missing:
            raise DataError(path, f"pair {key} lacks members {missing}")
    return list(samples.values())


_INDEX_SCHEMA = pa.schema([
    ("shard", pa.string()), ("key", pa.string()), ("image_id", pa.string()), ("noun", pa.string()),
    ("caption", pa.string()), ("proposal_index", pa.int64()), ("score", pa.float64()),
    ("bbox", pa.list_(pa.float64())), ("extra", pa.string()), ("image_format", pa.string()),
    *[(f"{role}_{part}", pa.int64()) for role in MEMBERS for part in ("offset", "size")],
])


def open_clip_trainer_settings(shard_counts: list[int], workers: int = 2, batch: int = 64) -> tuple[int, int]:
    """(data-loader workers, batch size) with which open_clip's trainer runs on shards of these pair counts. Its
    webdataset loader needs a shard per worker (it asserts so), shuffles the shards among the workers and drops each
    worker's last partial batch, so the batch must fit in what the worker dealt the smallest shards gets; a larger
    batch gives that worker no batch at all (seen: a set of 16 pairs at batch 64 never finished its epoch)."""
    workers = max(1, min(workers, len(shard_counts)))
    smallest_share = sum(sorted(shard_counts)[: len(shard_counts) // workers])
    return workers, max(1, min(batch, smallest_share))


def _dataset_card(nouns: Counter[str], images: int, stats: list[dict[str, Any]],
                  params: Mapping[str, Any], top_k: int) -> str:
    # No commit id: the card is part of the DVC out, and an id would make every commit a new dataset and retrain
    # everything downstream; the fingerprint under the parameters names what decides the pairs.
    pairs = sum(nouns.values())
    total_bytes = sum(s["bytes"] for s in stats)
    units = [s["unit"] for s in stats]
    if units == list(range(units[0], units[-1] + 1)):
        pattern = f"{SHARD_PREFIX}{{{units[0]:06d}..{units[-1]:06d}}}.tar"
    else:  # gaps: list the shards
        pattern = "::".join(s["shard"] for s in stats)
    workers, batch = open_clip_trainer_settings([s["count"] for s in stats])
    lines = [
        "# Mask–noun pairs",
        "",
        "Masked image regions paired with nouns from their image's captions, mined as in OVSeg §3.2",
        "(Liang et al., *Open-Vocabulary Semantic Segmentation with Mask-adapted CLIP*): nouns are",
        "extracted from the captions with NLTK (POS tags, WordNet lemmas, stop-nouns removed), class-",
        "agnostic mask proposals come from the segmentation model, and CLIP pairs each noun with its",
        "best-matching masked proposal. The pairs are noisy by design: they trade precision for a",
        "diverse vocabulary.",
        "",
        "| | |", "|---|---|",
        f"| pairs | {pairs} |",
        f"| images | {images} |",
        f"| unique nouns | {len(nouns)} |",
        f"| nouns seen once | {sum(1 for c in nouns.values() if c == 1)} |",
        f"| shards | {len(stats)} |",
        f"| total bytes | {total_bytes} |",
        f"| format version | {FORMAT_VERSION} |",
        "",
        "## Parameters used",
        "",
        "```yaml",
        yaml.safe_dump(dict(params), sort_keys=True).rstrip(),
        "```",
        "",
        "## Members of each sample",
        "",
        "- `<key>.jpg` or `<key>.png`: the masked crop (background filled), RGB",
        "- `<key>.mask.png`: the binary mask aligned with the crop (0 / 255)",
        "- `<key>.txt`: the noun",
        "- `<key>.json`: key, image_id, caption, noun, proposal_index, score, bbox (x0, y0, x1, y1), crop_size, extra",
        "",
        "Keys are `{image_id:012d}_{k:03d}` (k-th pair of the image). `sizes.json` gives the pair count",
        "of each shard; `index.parquet` lists every pair with its shard and the byte offset and size",
        "of each member, for random access.",
        "",
        "## Loading",
        "",
        "Paths are relative to this directory.",
        "",
        "```python",
        "import webdataset as wds",
        f'ds = wds.WebDataset("{pattern}", shardshuffle=False).decode("pil")',
        "for sample in ds:",
        '    crop, mask, noun = sample["jpg"], sample["mask.png"], sample["txt"]',
        "",
        "from ovseg_core.shards import PairDataset  # random access through index.parquet",
        "crop, mask, noun, meta = PairDataset(\".\")[0]",
        "```",
        "",
        "open_clip's own trainer reads the shards directly (image from `jpg`/`png`, text from `txt`; the",
        "sample count from `sizes.json`). From this directory, with the CLIP to start from exported for",
        "open_clip into `clip-export` (`ovseg export models/pretrain_clip/clip.pt --out <here>/clip-export`,",
        "or an adapted CLIP's folder; any open_clip model works too: `--model ViT-B-16 --pretrained openai`;",
        "batch and workers fit these shards: open_clip's loader needs a shard per worker and a full batch per worker):",
        "",
        "```",
        "python -m open_clip_train.main --model local-dir:clip-export --dataset-type webdataset \\",
        f"    --train-data '{pattern}' --train-num-samples {pairs} \\",
        f"    --batch-size {batch} --epochs 1 --lr 5e-6 --wd 0.2 --workers {workers} --logs open_clip_logs",
        "```",
        "",
        f"## Top {min(top_k, len(nouns))} nouns",
        "",
        "| rank | noun | pairs | share |", "|---:|---|---:|---:|",
    ]
    for rank, (noun, count) in enumerate(sorted(nouns.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k], 1):
        lines.append(f"| {rank} | {noun} | {count} | {count / pairs:.2%} |")
    lines += ["", "## Shards", "", "| shard | pairs | bytes | sha256 |", "|---|---:|---:|---|"]
    lines += [f"| {s['shard']} | {s['count']} | {s['bytes']} | `{s['sha256']}` |" for s in stats]
    return "\n".join(lines) + "\n"


def finalize_dataset(out_dir: str | Path, params: Mapping[str, Any], expected_units: int | None = None,
                     top_k: int = 50) -> dict[str, Any]:
    """Write sizes.json, index.parquet and README.md for the complete shards in `out_dir`.

    Every shard must be complete and match its checksum (DataError otherwise); with
    `expected_units`, units 0..expected_units-1 must all be there. Returns summary counts.
    """
    out_dir = Path(out_dir)
    leftovers = sorted(p.name for p in out_dir.iterdir() if _is_temporary(p)) if out_dir.is_dir() else []
    if leftovers:
        raise DataError(out_dir / leftovers[0], "unfinished temporary file; resume mining (completed_units) first")
    stats = [_read_stats(p) for p in sorted(out_dir.glob(f"{SHARD_PREFIX}*.stats.json"))]
    if not stats:
        raise DataError(out_dir, "no complete shards to finalize")
    for s in stats:
        problem = _shard_problem(out_dir, s, verify=True)
        if problem:
            raise DataError(out_dir / s["shard"], problem)
    recorded = {s["shard"] for s in stats}
    for tar in sorted(out_dir.glob(f"{SHARD_PREFIX}*.tar")):
        if tar.name not in recorded:
            raise DataError(tar, "shard has no stats file (incomplete); resume mining first")
    if expected_units is not None:
        missing = sorted(set(range(expected_units)) - {s["unit"] for s in stats})
        if missing:
            raise DataError(out_dir, f"{len(missing)} of {expected_units} units are not complete, e.g. {missing[:10]}")

    # Shard by shard: the index is written one row group per shard and the card's counts are kept as totals,
    # so memory holds one shard's rows (and the set of image ids), not the whole data set's.
    nouns: Counter[str] = Counter()
    images: set[str] = set()
    with atomic_file(out_dir / INDEX_FILE) as tmp:
        with pq.ParquetWriter(tmp, _INDEX_SCHEMA) as index:
            for s in stats:
                rows = _scan_shard(out_dir / s["shard"])
                if len(rows) != s["count"]:
                    raise DataError(out_dir / s["shard"], f"holds {len(rows)} pairs, stats say {s['count']}")
                index.write_table(pa.Table.from_pylist(rows, schema=_INDEX_SCHEMA))
                nouns.update(r["noun"] for r in rows)
                images.update(r["image_id"] for r in rows)
        _check_unique_keys(tmp, out_dir)
    write_json(out_dir / SIZES_FILE, {s["shard"]: s["count"] for s in stats})
    write_text(out_dir / CARD_FILE, _dataset_card(nouns, len(images), stats, params, top_k))
    return {
        "pairs": sum(nouns.values()),
        "shards": len(stats),
        "images": len(images),
        "unique_nouns": len(nouns),
        "bytes": sum(s["bytes"] for s in stats),
    }


def _check_unique_keys(index: Path, out_dir: Path) -> None:
    """Every pair key once in the whole set (read back from the index: two Arrow string columns)."""
    table = pq.read_table(index, columns=["key", "shard"])
    counts = pc.value_counts(table.column("key"))
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(repeated):
        key = repeated.field("values")[0].as_py()
        shards = pc.filter(table.column("shard"), pc.equal(table.column("key"), key)).to_pylist()
        raise DataError(out_dir / shards[-1], f"pair key {key} also in {shards[0]}")


# ---------------------------------------------------------------------------------------------
# random access
# ---------------------------------------------------------------------------------------------


class PairDataset(torch.utils.data.Dataset):
    """Pairs by index, read through index.parquet's byte offsets (order = shard stream order).

    `dataset[i]` → (crop uint8 [H, W, 3], mask bool [H, W], noun, metadata dict).
    """

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)
        path = self.root / INDEX_FILE
        if not path.is_file():
            raise DataError(path, "no pair index; run finalize_dataset on the shard directory")
        columns = ["shard", "noun", *[f"{role}_{part}" for role in ("image", "mask", "json") for part in ("offset", "size")]]
        try:
            table = pq.read_table(path, columns=columns)
        except (pa.ArrowInvalid, KeyError, OSError) as e:
            raise DataError(path, f"unreadable pair index: {e}") from None
        # Columns as arrays, not one dict per row: an index of ~1M pairs stays small in every worker.
        shards = table.column("shard").combine_chunks().dictionary_encode()
        self._shard_names: list[str] = shards.dictionary.to_pylist()
        self._shard_of = shards.indices.to_numpy()
        self._nouns: list[str] = table.column("noun").to_pylist()
        self._ranges = {name: table.column(name).to_numpy() for name in columns[2:]}

    def __len__(self) -> int:
        return len(self._nouns)

    def noun(self, i: int) -> str:
        """Pair i's noun, from the index alone (no shard read)."""
        return self._nouns[i]

    def _read(self, shard: str, offset: int, size: int) -> bytes:
        path = self.root / shard
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except FileNotFoundError:
            raise DataError(path, "shard listed in index.parquet is missing") from None
        if len(data) != size:
            raise DataError(path, f"truncated: member at {offset} needs {size} bytes")
        return data

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, str, dict[str, Any]]:
        shard = self._shard_names[self._shard_of[i]]

        def member(role: str) -> bytes:
            return self._read(shard, int(self._ranges[f"{role}_offset"][i]), int(self._ranges[f"{role}_size"][i]))

        with Image.open(io.BytesIO(member("image"))) as im:
            crop = np.asarray(im.convert("RGB"))
        with Image.open(io.BytesIO(member("mask"))) as im:
            mask = np.asarray(im.convert("L")) > 127
        return crop, mask, self._nouns[i], json.loads(member("json"))
