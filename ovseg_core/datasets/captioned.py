"""Your own captioned images, as caption-only prepared sets (mining needs captions and a proposal network, no
segmentation labels):

- `webdataset-captions`: an image–text WebDataset as img2dataset writes it. Shards `<root>/*.tar` hold
  `<key>.jpg` (or .jpeg/.png/.webp) with `<key>.txt` and/or `<key>.json` (`{"caption": ...}`; the .txt wins
  where both are present), and `<shard>_stats.json` beside each shard, whose `successes` must equal the
  images the shard holds (a shorter shard is an incomplete download). The images stay in the shards: the
  prepared set refers to each as `<shard>.tar/<key>.<ext>` (ovseg_core.archive).
- `caption-folder`: a folder (searched recursively) of images with sidecar captions, `photo.jpg` +
  `photo.txt`, one caption per non-empty line. Images stay where they are; sample ids are the paths under
  the root without suffix, '/' written as '__' and other characters than letters, digits, '_' and '-' as
  '_' (they become WebDataset keys of the mined pairs).

An image without a caption is skipped and recorded in dataset.json (`skipped`); a caption without an image
is an error naming the caption file. The `split` argument is not used: the root is one set.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import webdataset as wds

from ..errors import DataError, read_json_file, read_text_file
from .classes import ClassList
from .conversion import Item, relative, require_dir, write_prepared
from .prepared import PreparedDataset

WDS_LAYOUT = "<root>/NNNNN.tar with <key>.jpg + <key>.txt and/or <key>.json {caption}, <root>/NNNNN_stats.json"
FOLDER_LAYOUT = "<root>/**/<name>.jpg (.jpeg, .png, .webp) with <root>/**/<name>.txt captions"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
NO_CAPTION = "image without a caption"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _captions_of(lines: str) -> list[str]:
    return [line.strip() for line in lines.splitlines() if line.strip()]


def _successes(tar: Path) -> int | None:
    """The image count img2dataset's stats file beside `tar` records (None without one)."""
    stats = tar.with_name(f"{tar.stem}_stats.json")
    if not stats.is_file():
        return None
    try:
        successes = read_json_file(stats, "img2dataset stats file")["successes"]
    except (KeyError, TypeError) as e:
        raise DataError(stats, f"not an img2dataset stats file (no successes count): {e}") from e
    return int(successes)


def _shard_samples(tar: Path, captions: dict[str, list[str]], skipped: list[tuple[Path, str]]) -> Iterator[Item]:
    """The images of one shard as Items (their captions into `captions`), checked against its stats file."""
    count = 0
    for sample in wds.WebDataset(str(tar)):  # shards in order, samples in tar order (no shuffling by default)
        key = sample["__key__"]
        images = [ext for ext in sample if "." + ext.lower() in IMAGE_SUFFIXES]
        texts = [ext for ext in ("txt", "json") if ext in sample]
        if not images:
            raise DataError(tar / f"{key}.{texts[0] if texts else 'txt'}", "caption without an image in its shard")
        count += 1
        member = tar / f"{key}.{images[0]}"
        text = _shard_caption(sample, tar / key)
        if not text:
            skipped.append((member, NO_CAPTION))
            continue
        captions[key] = text
        yield Item(key, member, None, data=sample[images[0]])
    successes = _successes(tar)
    if successes is not None and successes != count:
        raise DataError(tar, f"holds {count} images but {tar.stem}_stats.json counts {successes} successes: "
                             "the shard is incomplete")


def _shard_caption(sample: dict[str, Any], where: Path) -> list[str]:
    if "txt" in sample:
        return _captions_of(sample["txt"].decode("utf-8"))
    if "json" in sample:
        try:
            caption = json.loads(sample["json"]).get("caption")
        except (json.JSONDecodeError, AttributeError) as e:
            raise DataError(where.with_suffix(".json"), f"not a JSON object: {e}") from e
        return _captions_of(caption) if isinstance(caption, str) else []
    return []


def prepare_webdataset(raw_root: Path, out_root: Path, split: str, *, name: str,
                       train_vocabulary: Sequence[str] | None = None, class_file: Path | None = None
                       ) -> PreparedDataset:
    raw_root = require_dir(Path(raw_root), WDS_LAYOUT)
    tars = sorted(raw_root.glob("*.tar"))
    if not tars:
        raise DataError(raw_root, f"no .tar shards; expected layout: {WDS_LAYOUT}")
    captions: dict[str, list[str]] = {}
    skipped: list[tuple[Path, str]] = []
    items = (item for tar in tars for item in _shard_samples(tar, captions, skipped))
    source = dict(reader="webdataset-captions", layout=WDS_LAYOUT, shards=len(tars),
                  raw_root=relative(raw_root, out_root))
    total = sum(_successes(tar) or 0 for tar in tars)  # for progress only (0 for shards without stats)
    return write_prepared(out_root, name, ClassList(()), train_vocabulary, items, None, source, captions,
                          total=total, skipped=skipped)


def prepare_folder(raw_root: Path, out_root: Path, split: str, *, name: str,
                   train_vocabulary: Sequence[str] | None = None, class_file: Path | None = None
                   ) -> PreparedDataset:
    raw_root = require_dir(Path(raw_root), FOLDER_LAYOUT)
    images = {p.with_suffix(""): p for p in sorted(raw_root.rglob("*"))
              if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    for text in sorted(raw_root.rglob("*.txt")):
        if text.with_suffix("") not in images:
            raise DataError(text, f"caption file without an image (looked for {text.stem} with "
                                  f"{'/'.join(IMAGE_SUFFIXES)} beside it)")
    if not images:
        raise DataError(raw_root, f"no images; expected layout: {FOLDER_LAYOUT}")
    captions: dict[str, list[str]] = {}
    items, skipped = [], []
    for stem, image in images.items():
        sample_id = "__".join(_KEY_UNSAFE.sub("_", part) for part in stem.relative_to(raw_root).parts)
        text = stem.with_suffix(".txt")
        found = _captions_of(read_text_file(text, "caption file")) if text.is_file() else []
        if not found:
            skipped.append((image, NO_CAPTION))
            continue
        captions[sample_id] = found
        items.append(Item(sample_id, image, None))
    source = dict(reader="caption-folder", layout=FOLDER_LAYOUT, raw_root=relative(raw_root, out_root))
    return write_prepared(out_root, name, ClassList(()), train_vocabulary, items, None, source, captions,
                          skipped=skipped)
