"""Files inside tar archives, addressed as paths through the archive: `shards/00000.tar/000000000001.jpg` is the
member `000000000001.jpg` of `shards/00000.tar`.

Datasets at web or COCO size keep many small files (images of an img2dataset download, prepared label maps) in a few
tars rather than as loose files: a filesystem, DVC's hashing and a copy handle ten tars far faster than 100K files.
Readers take such a path wherever they take a file path. Members are read by byte range from an index of each tar
built once per process (tarfile scans the headers; nothing is extracted).
"""
from __future__ import annotations

import functools
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .errors import DataError

if TYPE_CHECKING:
    import webdataset as wds

TAR_SUFFIX = ".tar"
# Fixed member time, owner and mode: equal contents give equal tar bytes.
MEMBER_MTIME = 0
MEMBER_OWNER = "ovseg"
MEMBER_MODE = 0o444


def reproducible_tar_writer(target: Path | BinaryIO) -> wds.TarWriter:
    """webdataset's writer for samples `{"__key__": key, ext: bytes}` (members `<key>.<ext>`), already encoded,
    with fixed member metadata. `target`: a stream, or a path the writer creates and closes itself."""
    import webdataset as wds  # here: it imports torch, which readers of archive members (the report) do without

    return wds.TarWriter(str(target) if isinstance(target, Path) else target, user=MEMBER_OWNER, group=MEMBER_OWNER, mode=MEMBER_MODE, mtime=MEMBER_MTIME,
                         encoder=False)


def archive_member(path: str | Path) -> tuple[Path, str] | None:
    """(tar, member name) when `path` runs through a tar file; None for an ordinary path."""
    path = Path(path)
    for parent in path.parents:
        if parent.suffix == TAR_SUFFIX and parent.is_file():
            return parent, path.relative_to(parent).as_posix()
    return None


@functools.lru_cache(maxsize=256)
def _member_ranges(tar: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    # Keyed on the file's mtime and size too, so that a rewritten tar is indexed again.
    try:
        with tarfile.open(tar) as archive:
            return {info.name: (info.offset_data, info.size) for info in archive if info.isfile()}
    except tarfile.TarError as e:
        raise DataError(tar, f"not a readable tar archive: {e}") from e


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    """The bytes of a file or of an archive member; DataError naming the path when it is missing or truncated."""
    path = Path(path)
    if path.is_file():
        return path.read_bytes()
    found = archive_member(path)
    if found is None:
        raise DataError(path, f"{what} is missing")
    tar, member = found
    stat = tar.stat()
    ranges = _member_ranges(str(tar), stat.st_mtime_ns, stat.st_size)
    if member not in ranges:
        raise DataError(path, f"{what} is missing: {tar.name} has no member {member}")
    offset, size = ranges[member]
    with open(tar, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise DataError(path, f"{what} is truncated: {tar.name} ends inside member {member}")
    return data
