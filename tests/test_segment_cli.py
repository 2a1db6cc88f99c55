"""`ovseg segment` and the `Segmenter` API, on tiny random-init stand-in models laid out as a run's models/."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_core.cli import main
from ovseg_core.clip.adapted import write_adapted
from ovseg_core.clip.models import load_clip, save_clip
from ovseg_core.clip.mpt import MaskPrompts, save_prompts
from ovseg_core.clip.text import text_features
from ovseg_core.datasets.prepared import PreparedDataset, PreparedWriter
from ovseg_core.maskformer.model import build_model, preset_config, save_model
from ovseg_core.metrics import ConfusionMatrix
from ovseg_core.segmenter import Segmenter, choose_mode, normalize_classes
from scripts.bench_segment import cli_miou

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
CLASSES = "sky, kite, grass, golden retriever"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """models/ as `dvc repro` lays it out: original CLIP, an FT→MPT adapted CLIP, a proposal network."""
    models = tmp_path_factory.mktemp("run") / "models"
    torch.manual_seed(0)
    clip = load_clip("ovseg-tiny-vit")
    original = save_clip(clip, models / "pretrain_clip" / "clip.pt")
    with torch.no_grad():  # the "fine-tuned" image tower differs from the original one
        for p in clip.model.visual.parameters():
            p.add_(0.01 * torch.randn_like(p))
    adapted = models / "adapt_clip" / "ft-mpt"
    save_clip(clip, adapted / "clip.pt")
    save_prompts(MaskPrompts.for_visual(clip.model.visual, depth=3, init_std=0.02), adapted / "prompts.pt", clip.arch)
    write_adapted(adapted, "ft-mpt", clip.arch, adapted / "clip.pt", adapted / "prompts.pt")
    mpt = models / "adapt_clip" / "mpt"  # prompts on the original weights, which stay where their stage wrote them
    save_prompts(MaskPrompts.for_visual(clip.model.visual, depth=3, init_std=0.02), mpt / "prompts.pt", clip.arch)
    write_adapted(mpt, "mpt", clip.arch, original, mpt / "prompts.pt")
    net = build_model(preset_config("tiny", num_queries=6), text_features(clip, ["sand", "water", "ball"]))
    save_model(models / "train_maskformer" / "model.pt", net, {"classes": ["sand", "water", "ball"]})
    return models


def _scene(height: int, width: int, seed: int) -> np.ndarray:
    """Blocks of flat colour with a little noise, so proposals have something to find."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2] = (90, 140, 230)
    image[height // 2:] = (60, 170, 50)
    image[height // 4: height // 2 + 8, width // 3: width // 2] = (220, 60, 40)
    return np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("images")
    square, panorama = root / "square.png", root / "panorama.jpg"
    Image.fromarray(_scene(64, 64, 0)).save(square)
    Image.fromarray(_scene(100, 300, 1)).save(panorama)  # larger than the crop and 3:1 → downscaled, sliding windows
    return [square, panorama]


def _files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def test_cli_writes_overlay_labels_and_json_per_image(run_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", *map(str, images), "--classes", CLASSES, "--model", str(run_dir), "--out", str(out)]) == 0
    assert _files(out) == sorted(f"{p.stem}.{kind}" for p in images for kind in ("overlay.png", "labels.png", "json"))
    printed = capsys.readouterr().out
    for image, mode, work in zip(images, ("resize", "slide"), ((64, 64), (192, 64))):
        width, height = Image.open(image).size
        labels_png = Image.open(out / f"{image.stem}.labels.png")
        assert labels_png.mode == "L"  # uint8 ids
        labels = np.asarray(labels_png)
        assert labels.shape == (height, width) and labels.max() < 4
        overlay = Image.open(out / f"{image.stem}.overlay.png")
        assert overlay.mode == "RGB" and overlay.width >= width and overlay.height > height  # legend below
        record = json.loads((out / f"{image.stem}.json").read_text())
        assert record["classes"] == ["sky", "kite", "grass", "golden retriever"]
        assert record["image_size"] == {"width": width, "height": height}
        assert (record["inference_size"]["width"], record["inference_size"]["height"]) == work
        assert record["mode"] == mode and record["models"]["lam"] == 0.7 and record["models"]["threshold"] == 0.5
        assert record["models"]["maskformer"] == str((run_dir / "train_maskformer" / "model.pt").resolve())
        assert record["models"]["clip"] == str((run_dir / "adapt_clip" / "ft-mpt").resolve())
        shares = [c["pixel_share"] for c in record["per_class"]]
        assert sum(shares) == pytest.approx(1.0)
        assert shares == pytest.approx((np.bincount(labels.ravel(), minlength=4) / labels.size).tolist())
        for c in record["per_class"]:
            assert (c["mean_score"] is None) == (c["pixel_share"] == 0)
            assert c["mean_score"] is None or 0 < c["mean_score"] <= 1 + 1e-6
        assert record["latency_s"] > 0
        assert image.name in printed and f"{width}x{height}" in printed
    assert "wrote 2 of 2 images" in printed


def test_cli_device_and_precision(run_dir, images, tmp_path, capsys):
    argv = ["segment", str(images[0]), "--classes", CLASSES, "--model", str(run_dir)]
    results = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main([*argv, "--device", "cpu", "--precision", precision, "--out", str(out)]) == 0
        record = json.loads((out / f"{images[0].stem}.json").read_text())
        assert record["models"]["device"] == "cpu" and record["models"]["precision"] == precision
        results[precision] = np.asarray(Image.open(out / f"{images[0].stem}.labels.png"))
    agree = (results["fp32"] == results["bf16"]).mean()
    assert agree > 0.9, agree  # bf16 moves a few boundary pixels at most
    if not torch.cuda.is_available():
        assert main([*argv, "--device", "cuda", "--out", str(tmp_path / "gpu")]) == 1
        assert "no CUDA device is visible" in capsys.readouterr().err
        assert not (tmp_path / "gpu").exists()


def test_class_list_rules():
    with pytest.warns(UserWarning, match="duplicate class name 'Sky'"):
        assert normalize_classes(" sky ,kite, Sky,golden   retriever ") == ["sky", "kite", "golden retriever"]
    assert normalize_classes(["dog"], background="others") == ["dog", "others"]
    with pytest.raises(ValueError, match="#2 is empty"):
        normalize_classes("sky,, grass")
    with pytest.raises(ValueError, match="no class names"):
        normalize_classes([])
    with pytest.raises(ValueError, match="only one class.*--background"), pytest.warns(UserWarning):
        normalize_classes("dog, Dog ")
    with pytest.raises(ValueError, match="background class name is empty"):
        normalize_classes(["dog"], background=" ")
    assert choose_mode(64, 128) == "resize" and choose_mode(64, 129) == "slide" and choose_mode(200, 64) == "slide"


def test_cli_class_list_handling(run_dir, images, tmp_path, capsys):
    base = ["segment", str(images[0]), "--model", str(run_dir)]
    for classes, message in (("dog", "only one class"), ("sky,,grass", "is empty"), (" , ", "is empty")):
        out = tmp_path / "refused"
        with pytest.raises(SystemExit) as exit_:
            main([*base, "--classes", classes, "--out", str(out)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err and not out.exists()

    out = tmp_path / "background"
    assert main([*base, "--classes", "dog", "--background", "others", "--out", str(out)]) == 0
    assert json.loads((out / "square.json").read_text())["classes"] == ["dog", "others"]

    names = tmp_path / "classes.txt"
    names.write_text("# what to look for\nsky\n\ngolden retriever, puppy\nSKY\n")
    out = tmp_path / "from-file"
    assert main([*base, "--classes-file", str(names), "--out", str(out)]) == 0
    assert "duplicate class name 'SKY'" in capsys.readouterr().err
    assert json.loads((out / "square.json").read_text())["classes"] == ["sky", "golden retriever, puppy"]


def test_bad_images_leave_no_output_and_fail_the_run(run_dir, images, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    missing = tmp_path / "missing.jpg"
    out = tmp_path / "out"
    argv = ["segment", str(missing), str(broken), str(images[0]), "--classes", CLASSES, "--model", str(run_dir)]
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{missing}: image file is missing" in err and f"{broken}: image fails to decode" in err
    assert _files(out) == ["square.json", "square.labels.png", "square.overlay.png"]  # the good one still ran

    same_stem = tmp_path / "other" / "square.jpg"
    with pytest.raises(SystemExit) as exit_:
        main(["segment", str(images[0]), str(same_stem), "--classes", CLASSES, "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "share file stems ['square']" in capsys.readouterr().err


def test_missing_models_name_the_path_and_the_stage(run_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["segment", str(images[0]), "--classes", CLASSES, "--out", str(out)]
    assert main([*argv, "--model", str(tmp_path / "no-such-run")]) == 1
    assert f"{tmp_path / 'no-such-run'}: model directory not found" in capsys.readouterr().err

    assert main([*argv, "--model", str(run_dir), "--clip-variant", "ft"]) == 1
    err = capsys.readouterr().err
    assert f"{run_dir / 'adapt_clip' / 'ft'}: no adapted CLIP 'ft'" in err
    assert "available here: ft-mpt, mpt, original" in err and "dvc repro adapt_clip" in err

    half_run = tmp_path / "half-run"
    (half_run / "adapt_clip").mkdir(parents=True)
    assert main([*argv, "--model", str(half_run)]) == 1
    err = capsys.readouterr().err
    assert str(half_run / "train_maskformer" / "model.pt") in err and "dvc repro train_maskformer" in err
    assert not out.exists()


def test_module_entry_point_exits_nonzero_naming_the_model_dir(images, tmp_path):
    missing = tmp_path / "nowhere" / "models"
    result = subprocess.run(
        [sys.executable, "-m", "ovseg_core.cli", "segment", str(images[0]), "--classes", CLASSES,
         "--model", str(missing), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1 and f"{missing}: model directory not found" in result.stderr
    assert not (tmp_path / "out").exists()


def test_api_loads_once_and_matches_the_cli(run_dir, images, tmp_path):
    out = tmp_path / "out"
    assert main(["segment", *map(str, images), "--classes", CLASSES, "--model", str(run_dir), "--out", str(out)]) == 0
    segmenter = Segmenter.load(run_dir)
    for image in images:
        result = segmenter.segment(image, CLASSES)
        assert np.array_equal(result.labels, np.asarray(Image.open(out / f"{image.stem}.labels.png")))
        record = json.loads((out / f"{image.stem}.json").read_text())
        shares = {c["class"]: c["pixel_share"] for c in record["per_class"] if c["pixel_share"] > 0}
        assert {p["class"]: p["pixel_share"] for p in result.present} == pytest.approx(shares)
        assert [p["pixel_share"] for p in result.present] == sorted((p["pixel_share"] for p in result.present),
                                                                     reverse=True)
    assert len(segmenter.text) == 4
    # Another vocabulary (unseen words welcome), given as a list; the text cache only grows by the new names.
    rgb = np.asarray(Image.open(images[0]).convert("RGB"))
    other = segmenter.segment(rgb, ["zebra crossing", "sky", "teapot"])
    assert other.classes == ["zebra crossing", "sky", "teapot"] and other.labels.max() < 3
    assert len(segmenter.text) == 6
    again = segmenter.segment(Image.open(images[0]), CLASSES)
    assert np.array_equal(again.labels, np.asarray(Image.open(out / f"{images[0].stem}.labels.png")))


def test_explicit_model_files_and_the_original_clip(run_dir, images, tmp_path):
    out = tmp_path / "out"
    argv = ["segment", str(images[0]), "--classes", CLASSES, "--out", str(out)]
    plain_clip = run_dir / "pretrain_clip" / "clip.pt"
    # The paper-recipe form: files named outright, no run directory; the architecture is read from the checkpoint.
    assert main([*argv, "--maskformer", str(run_dir / "train_maskformer" / "model.pt"), "--clip", str(plain_clip),
                 "--model", str(tmp_path / "ignored")]) == 0
    models = json.loads((out / "square.json").read_text())["models"]
    assert models["clip"] == str(plain_clip.resolve()) and models["clip_name"] == "original"
    explicit = np.asarray(Image.open(out / "square.labels.png"))
    assert main([*argv, "--model", str(run_dir), "--clip-variant", "original"]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "square.labels.png")), explicit)
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--model", str(run_dir), "--lam", "1.5"])
    assert exit_.value.code == 2


def test_bench_scores_the_cli_label_maps(run_dir, tmp_path):
    classes, seen = ["sky", "grass", "ball"], [True, True, False]
    root = tmp_path / "prepared" / "mini-eval"
    with PreparedWriter(root, "mini-eval", classes, seen, 255) as writer:
        for i in range(3):
            image = tmp_path / "raw" / f"img{i}.png"
            image.parent.mkdir(exist_ok=True)
            Image.fromarray(_scene(64, 64, i)).save(image)
            label = np.zeros((64, 64), np.int64)
            label[32:] = 1
            label[16:40, 21:32] = 2
            label[:2] = 255
            writer.add(f"img{i}", image, label)
    result = cli_miou(run_dir, root, 2)
    assert result["images"] == 2 and result["classes"] == 3 and result["seen_classes"] == 2
    assert 0 < result["latency_s_mean"] <= result["latency_s_max"]

    dataset = PreparedDataset.load(root)
    segmenter = Segmenter.load(run_dir)
    cm = ConfusionMatrix(3, 255)
    for i in range(2):
        cm.update(segmenter.segment(dataset.load_image(i), classes).labels, dataset.load_label(i))
    expected = cm.metrics(classes, seen).to_dict()
    assert {k: result[k] for k in expected} == expected
