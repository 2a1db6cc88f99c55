import argparse
import hashlib
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from ovseg_core.errors import DataError
from ovseg_core.shards import (
    Pair,
    PairDataset,
    PairShardWriter,
    completed_units,
    finalize_dataset,
    open_clip_trainer_settings,
    pair_key,
    shard_name,
    stats_name,
    write_shard,
)

ROOT = Path(__file__).resolve().parents[1]
NOUNS = ["dog", "fire hydrant", "surfboard", "cat", "tree"]
PARAMS = {"num_captions": 1, "score_threshold": None, "proposals_per_image": 100}


def make_pairs(num_images: int, per_image: int, seed: int = 0, first_image: int = 0) -> list[Pair]:
    rng = np.random.default_rng(seed)
    pairs = []
    for image_id in range(first_image, first_image + num_images):
        for k in range(per_image):
            h, w = rng.integers(6, 20, size=2)
            mask = rng.random((h, w)) > 0.4
            crop = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            crop[~mask] = (122, 116, 104)
            noun = NOUNS[int(rng.integers(len(NOUNS)))]
            pairs.append(Pair(
                key=pair_key(image_id, k), image_id=str(image_id), caption=f"a photo with a {noun}",
                noun=noun, proposal_index=int(rng.integers(100)), score=float(rng.random()),
                bbox=(1.0, 2.0, 1.0 + w, 2.0 + h), crop=crop, mask=mask, extra={"unit_seed": seed},
            ))
    return pairs


def write_units(out_dir: Path, units: dict[int, list[Pair]], **options) -> None:
    for unit, pairs in units.items():
        write_shard(out_dir, unit, pairs, **options)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def units() -> dict[int, list[Pair]]:
    return {0: make_pairs(3, 2, seed=0, first_image=0), 1: make_pairs(2, 3, seed=1, first_image=3),
            2: make_pairs(4, 1, seed=2, first_image=5)}


def test_keys_are_deterministic_and_dot_free():
    assert pair_key(139, 2) == "000000000139_002"
    assert pair_key("000000000139", 2) == "000000000139_002"
    assert pair_key("scene-7_b", 0) == "scene-7_b_000"
    with pytest.raises(ValueError):
        pair_key("img.42", 0)


def test_round_trip_index_and_shards_agree(tmp_path, units):
    write_units(tmp_path, units, image_format="png")
    summary = finalize_dataset(tmp_path, PARAMS, expected_units=3)
    all_pairs = {p.key: p for ps in units.values() for p in ps}
    assert summary["pairs"] == len(all_pairs) == 16 and summary["shards"] == 3

    index = pq.read_table(tmp_path / "index.parquet").to_pylist()
    assert sorted(r["key"] for r in index) == sorted(all_pairs)  # every pair indexed exactly once

    urls = str(tmp_path / "pairs-{000000..000002}.tar")
    seen: dict[str, str] = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        key = sample["__key__"]
        assert key not in seen, "a pair is in two shards"
        seen[key] = Path(sample["__url__"]).name
        pair = all_pairs[key]
        assert np.array_equal(np.asarray(sample["png"].convert("RGB")), pair.crop)  # png is lossless
        assert np.array_equal(np.asarray(sample["mask.png"].convert("L")) > 127, pair.mask)
        assert sample["txt"] == pair.noun
        assert sample["json"] == json.loads(json.dumps(pair.metadata()))
    assert seen == {r["key"]: r["shard"] for r in index}  # ... and each shard holds what the index says
    for unit, pairs in units.items():
        assert {k for k, s in seen.items() if s == shard_name(unit)} == {p.key for p in pairs}


def test_open_clip_trainers_own_loader_reads_the_shards(tmp_path, units):
    """open_clip_train's `get_wds_dataset` (what `python -m open_clip_train.main --dataset-type webdataset` runs),
    called as the trainer calls it: the sample count from sizes.json, crops decoded, nouns tokenised."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    import ovseg_core.clip.models  # noqa: F401  (registers the tiny architecture with open_clip)

    write_units(tmp_path, units)  # default: jpg crops
    finalize_dataset(tmp_path, PARAMS)
    args = argparse.Namespace(train_data=str(tmp_path / "pairs-{000000..000002}.tar"), train_num_samples=None,
                              dataset_resampled=False, train_data_upsampling_factors=None, seed=0, batch_size=4,
                              workers=1, world_size=1)
    _, _, preprocess = open_clip.create_model_and_transforms("ovseg-tiny-vit")
    tokenizer = open_clip.get_tokenizer("ovseg-tiny-vit")
    info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    all_pairs = [p for ps in units.values() for p in ps]
    assert info.dataloader.num_samples == len(all_pairs) == 16
    texts = []
    for images, tokens in info.dataloader:
        assert images.shape[1:] == (3, 64, 64)
        texts += [tuple(t.tolist()) for t in tokens]
    assert Counter(texts) == Counter(tuple(tokenizer(p.noun)[0].tolist()) for p in all_pairs)


def test_shard_bytes_are_reproducible(tmp_path, units):
    write_units(tmp_path / "a", units)
    write_units(tmp_path / "b", units)
    for unit in units:
        a, b = tmp_path / "a" / shard_name(unit), tmp_path / "b" / shard_name(unit)
        assert sha256(a) == sha256(b)
        assert json.loads((tmp_path / "a" / stats_name(unit)).read_text())["sha256"] == sha256(a)
    finalize_dataset(tmp_path / "a", PARAMS)
    finalize_dataset(tmp_path / "b", PARAMS)
    for name in ("sizes.json", "index.parquet", "README.md"):
        assert sha256(tmp_path / "a" / name) == sha256(tmp_path / "b" / name)


def test_exception_inside_writer_leaves_no_shard(tmp_path, units):
    write_units(tmp_path, {0: units[0]})
    with pytest.raises(RuntimeError, match="proposal network died"):
        with PairShardWriter(tmp_path, 1) as w:
            for pair in units[1][:2]:
                w.write(pair)
            raise RuntimeError("proposal network died")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([shard_name(0), stats_name(0)])
    assert completed_units(tmp_path) == [0]


def test_killed_process_leaves_only_resumable_debris(tmp_path, units):
    write_units(tmp_path, {0: units[0], 2: units[2]})
    # a process killed half-way through unit 1: its temporary tar stays behind
    code = (
        "import os, sys\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from tests.test_shards import make_pairs\n"
        "from ovseg_core.shards import PairShardWriter\n"
        "w = PairShardWriter(sys.argv[1], 1).__enter__()\n"
        "for p in make_pairs(2, 3, seed=1, first_image=3)[:3]:\n"
        "    w.write(p)\n"
        "os._exit(9)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    assert any(p.name.startswith(".pairs-000001.tar.") for p in tmp_path.iterdir())
    assert not (tmp_path / shard_name(1)).exists()
    # a shard whose stats were lost, and one whose bytes were damaged after it was written
    (tmp_path / stats_name(0)).unlink()
    damaged = bytearray((tmp_path / shard_name(2)).read_bytes())
    damaged[700] ^= 0xFF
    (tmp_path / shard_name(2)).write_bytes(bytes(damaged))

    with pytest.raises(DataError, match="unfinished temporary file"):
        finalize_dataset(tmp_path, PARAMS)
    assert completed_units(tmp_path) == []
    assert list(tmp_path.iterdir()) == []  # debris removed, so a resumed run rewrites units 0-2

    write_units(tmp_path, units)
    assert completed_units(tmp_path) == [0, 1, 2]
    assert finalize_dataset(tmp_path, PARAMS, expected_units=3)["pairs"] == 16


def test_finalize_refuses_a_pair_key_in_two_shards(tmp_path, units):
    write_units(tmp_path, {0: units[0], 1: units[0][:1]})  # shard 1 repeats shard 0's first pair
    with pytest.raises(DataError, match=f"pair key {units[0][0].key} also in {shard_name(0)}") as error:
        finalize_dataset(tmp_path, PARAMS)
    assert error.value.path == tmp_path / shard_name(1)
    assert not (tmp_path / "index.parquet").exists()


def test_finalize_refuses_incomplete_datasets(tmp_path, units):
    with pytest.raises(DataError, match="no complete shards"):
        finalize_dataset(tmp_path, PARAMS)
    write_units(tmp_path, {0: units[0], 2: units[2]})
    with pytest.raises(DataError, match="1 of 3 units"):
        finalize_dataset(tmp_path, PARAMS, expected_units=3)
    (tmp_path / stats_name(2)).unlink()
    with pytest.raises(DataError, match="no stats file"):
        finalize_dataset(tmp_path, PARAMS)


def test_pair_dataset_random_access_equals_stream(tmp_path, units):
    write_units(tmp_path, units)
    finalize_dataset(tmp_path, PARAMS)
    dataset = PairDataset(tmp_path)
    stream = list(wds.WebDataset(str(tmp_path / "pairs-{000000..000002}.tar"), shardshuffle=False))
    assert len(dataset) == len(stream) == 16
    for i in [7, 0, 15, 3, 7]:  # any order, repeated
        crop, mask, noun, meta = dataset[i]
        sample = stream[i]
        with Image.open(io.BytesIO(sample["jpg"])) as im:
            assert np.array_equal(crop, np.asarray(im.convert("RGB")))
        with Image.open(io.BytesIO(sample["mask.png"])) as im:
            assert np.array_equal(mask, np.asarray(im) > 127)
        assert crop.dtype == np.uint8 and mask.dtype == np.bool_
        assert noun == sample["txt"].decode() and meta == json.loads(sample["json"])
        assert meta["key"] == sample["__key__"]


def test_pair_dataset_needs_an_index(tmp_path):
    with pytest.raises(DataError, match="finalize_dataset"):
        PairDataset(tmp_path)


def test_dataset_card_lists_counts_nouns_and_checksums(tmp_path, units):
    write_units(tmp_path, units)
    finalize_dataset(tmp_path, PARAMS, top_k=3)
    card = (tmp_path / "README.md").read_text()
    all_pairs = [p for ps in units.values() for p in ps]
    assert "| pairs | 16 |" in card
    assert f"| unique nouns | {len({p.noun for p in all_pairs})} |" in card
    assert "| images | 9 |" in card
    assert "proposals_per_image: 100" in card
    counts = {n: sum(p.noun == n for p in all_pairs) for n in NOUNS}
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    assert f"| 1 | {top[0]} | {top[1]} |" in card
    for unit, pairs in units.items():
        assert f"| {shard_name(unit)} | {len(pairs)} | " in card
        assert sha256(tmp_path / shard_name(unit)) in card
    assert "pairs-{000000..000002}.tar" in card


def test_writer_rejects_bad_pairs(tmp_path):
    pair = make_pairs(1, 1)[0]
    with pytest.raises(ValueError, match="dot-free"):
        write_shard(tmp_path, 0, [Pair(**{**pair.__dict__, "key": "a.b"})])
    with pytest.raises(ValueError, match="mask must be bool"):
        write_shard(tmp_path, 0, [Pair(**{**pair.__dict__, "mask": pair.mask[:-1]})])
    with pytest.raises(ValueError, match="duplicate pair key"):
        write_shard(tmp_path, 0, [pair, pair])
    assert list(tmp_path.iterdir()) == []


def test_trainer_settings_fit_the_shards():
    assert open_clip_trainer_settings([540] * 10) == (2, 64)  # the embedded run's shards: the defaults
    assert open_clip_trainer_settings([6, 6, 4]) == (2, 4)  # the worker dealt one shard may get the 4-pair one
    assert open_clip_trainer_settings([16]) == (1, 16)  # one shard: one worker (open_clip asserts shards >= workers)


@pytest.mark.slow
def test_the_cards_open_clip_command_trains_as_printed(tmp_path, units):
    """The command the dataset card prints, run as printed (from the mined directory, `python` this interpreter)
    on the tests' shards with a tiny CLIP exported for open_clip: open_clip's trainer finishes its epoch and
    saves a checkpoint."""
    import shlex

    import torch

    from ovseg_core.cli import main as ovseg
    from ovseg_core.clip.models import load_clip, save_clip

    write_units(tmp_path, units)
    finalize_dataset(tmp_path, PARAMS)
    torch.manual_seed(0)
    save_clip(load_clip("ovseg-tiny-vit"), tmp_path / "clip.pt")
    assert ovseg(["export", str(tmp_path / "clip.pt"), "--out", str(tmp_path / "clip-export")]) == 0
    card = (tmp_path / "README.md").read_text()
    block = card[card.index("python -m open_clip_train.main"):]
    command = block[:block.index("```")].replace("\\\n", " ")
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "open_clip_train.main"] and args[args.index("--batch-size") + 1] == "4"
    run = subprocess.run([sys.executable, *args[1:], "--device", "cpu"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "Train Epoch: 0" in log and "(100%)" in log
    assert list((tmp_path / "open_clip_logs").glob("*/checkpoints/epoch_1.pt"))
