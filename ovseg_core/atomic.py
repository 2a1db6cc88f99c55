"""Write-to-temporary-then-rename helpers, so that no reader ever sees a half-written file or directory."""
from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _remove_leftovers(path: Path, suffix: str) -> None:
    """Temporaries of earlier writes of `path` that a killed process (kill -9, OOM) left beside it. Each file here
    has one writer (the stage that owns it), so any other temporary of the same target is such a leftover."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*{suffix}"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
        _remove_leftovers(path, f".tmp{suffix}")
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _remove_leftovers(path, ".tmp")
        shutil.rmtree(path.with_name(f".{path.name}.old"), ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write JSON atomically (sorted keys, so equal objects give equal bytes)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def write_torch(path: str | Path, obj: Any) -> None:
    """`torch.save` atomically, with bytes that depend on `obj` alone.

    Saved to a path, torch names the archive's inner folder after the file, here the random temporary
    name, so equal objects gave different bytes; saved to a file object the folder is always `archive`.
    """
    import torch  # here, not at the top: most users of this module never write torch files

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | Path, rows: list[dict[str, Any]], fields: Sequence[str] | None = None) -> None:
    """Rows with the same keys (`fields`, by default the first row's) as one CSV file, atomically
    (None → empty cell)."""
    if fields is None and not rows:
        raise ValueError(f"{path}: no rows to write")
    with atomic_file(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields or rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
