"""Files inside tars, read by path through the archive: web shards' images and prepared label maps."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from ovseg_core.archive import archive_member, read_bytes, reproducible_tar_writer
from ovseg_core.datasets.prepared import LABELS_TAR, PreparedDataset, PreparedWriter, load_rgb
from ovseg_core.errors import DataError


def write_tar(path, members: dict[str, bytes]) -> None:
    with open(path, "wb") as f:
        writer = reproducible_tar_writer(f)
        for name, data in members.items():
            key, ext = name.split(".", 1)
            writer.write({"__key__": key, ext: data})
        writer.close()


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_members_read_by_path_through_the_tar(tmp_path):
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    write_tar(tmp_path / "00000.tar", {"a.png": png(image), "a.txt": b"a kite", "b.txt": b"two birds"})
    (tmp_path / "plain.txt").write_bytes(b"plain")
    assert archive_member(tmp_path / "00000.tar" / "a.txt") == (tmp_path / "00000.tar", "a.txt")
    assert archive_member(tmp_path / "plain.txt") is None
    assert read_bytes(tmp_path / "00000.tar" / "b.txt") == b"two birds"
    assert read_bytes(tmp_path / "plain.txt") == b"plain"
    np.testing.assert_array_equal(load_rgb(tmp_path / "00000.tar" / "a.png"), image)
    # a rewritten tar is indexed again (same path, other members and offsets)
    write_tar(tmp_path / "00000.tar", {"b.txt": b"three birds and a longer caption"})
    os.utime(tmp_path / "00000.tar", ns=(1, 1))
    assert read_bytes(tmp_path / "00000.tar" / "b.txt") == b"three birds and a longer caption"


def test_missing_or_truncated_members_name_the_tar(tmp_path):
    write_tar(tmp_path / "00000.tar", {"a.txt": b"x" * 2000, "b.txt": b"y" * 2000})
    with pytest.raises(DataError, match=r"00000\.tar/c\.txt: image file is missing: 00000\.tar has no member c\.txt"):
        load_rgb(tmp_path / "00000.tar" / "c.txt")
    with pytest.raises(DataError, match=r"00001\.tar/a\.txt: file is missing"):
        read_bytes(tmp_path / "00001.tar" / "a.txt")
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:512 + 2000 + 48 + 512 + 100])  # inside b.txt's data
    with pytest.raises(DataError, match=r"cut\.tar.*(truncated|not a readable tar)"):
        read_bytes(tmp_path / "cut.tar" / "b.txt")


def test_prepared_labels_live_in_one_reproducible_tar(tmp_path):
    (tmp_path / "raw").mkdir()
    labels = {f"img{i}": np.full((3, 4), i, np.int64) for i in range(3)}
    labels["img2"][0, 0] = 255  # ignore
    for i in range(3):
        (tmp_path / "raw" / f"img{i}.jpg").write_bytes(b"")
    tars = []
    for out in ("a", "b"):
        with PreparedWriter(tmp_path / out, "set", ["x", "y", "z"], [True] * 3, 255) as w:
            for sample_id, label in labels.items():
                w.add(sample_id, tmp_path / "raw" / f"{sample_id}.jpg", label)
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == ["dataset.json", LABELS_TAR]
        tars.append((tmp_path / out / LABELS_TAR).read_bytes())
    assert tars[0] == tars[1]
    ds = PreparedDataset.load(tmp_path / "a")
    assert ds.samples[1].label == f"{LABELS_TAR}/img1.png"
    for i, label in enumerate(labels.values()):
        np.testing.assert_array_equal(ds.load_label(i), label)
