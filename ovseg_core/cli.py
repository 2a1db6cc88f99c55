"""The `ovseg` command. Subcommands register themselves in `SUBCOMMANDS`: `segment`, `export`, `import-ovseg`.

    ovseg segment IMAGE [IMAGE ...] --classes "sky, kite, grass, golden retriever" [--out segment-out]
    ovseg segment IMAGE ... --classes ... --masks sam.json    # your own masks (COCO RLE JSON) instead of proposals
    ovseg export models/adapt_clip/ft-mpt --out export/ft-mpt    # open_clip / OpenAI files (clip.export)
    ovseg import-ovseg ovseg_swinbase_vitL14_ft_mpt.pth --out models/adapt_clip/ovseg   # its CLIP (clip.ovseg_release)
    ovseg import-ovseg ovseg_swinbase_vitL14_ft_mpt.pth --out models/adapt_clip/ovseg \
        --proposals-out models/train_maskformer/ovseg.pt                               # and its proposal network

For each image, three files in --out, each written atomically and all three only once the image is
fully segmented (a bad image leaves nothing behind):

    <stem>.overlay.png   the image with the label map blended over it and a legend of the classes found
    <stem>.labels.png    class ids (index into the class list): uint8, or uint16 beyond 255 classes
    <stem>.json          classes, every class's pixel share and mean score, sizes, models, λ, latency

Errors: a missing or undecodable image is reported (naming the file) and skipped; the other images
are still segmented and the command exits 1 at the end. Models that cannot be found or loaded also
exit 1 (naming the path and the stage that writes it); usage errors (options, an invalid class list,
two images with the same file stem) exit 2 before any model is loaded.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import warnings
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Sequence

from .atomic import atomic_file, write_json
from .clip.export import export_adapted
from .clip.ovseg_release import import_release
from .compute import ComputeError
from .datasets.prepared import load_rgb
from .errors import DataError, MissingWeightsError
from .mask_files import MaskFile
from .segmenter import (
    DEFAULT_LAM,
    DEFAULT_THRESHOLD,
    DEFAULT_VARIANT,
    SegmentResult,
    Segmenter,
    check_settings,
    label_ignore,
    normalize_classes,
    read_classes_file,
    result_record,
)
from .visualize import save_image, save_label_png

DEFAULT_OUT = Path("segment-out")


def output_paths(out: Path, stem: str) -> dict[str, Path]:
    return {"overlay": out / f"{stem}.overlay.png", "labels": out / f"{stem}.labels.png",
            "json": out / f"{stem}.json"}


def write_outputs(out: Path, image: Path, result: SegmentResult, segmenter: Segmenter) -> dict[str, Path]:
    """Write the three files of one image; each appears (by rename) only after all three are written."""
    paths = output_paths(out, image.stem)
    record = result_record(result, segmenter, image)
    record["files"] = {k: p.name for k, p in paths.items() if k != "json"}
    record["labels_dtype"] = "uint8" if label_ignore(len(result.classes)) == 255 else "uint16"
    record["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with ExitStack() as stack:
        tmp = {k: stack.enter_context(atomic_file(p, suffix=p.suffix)) for k, p in paths.items()}
        save_image(tmp["overlay"], result.overlay)
        save_label_png(tmp["labels"], result.labels, label_ignore(len(result.classes)))
        write_json(tmp["json"], record)
    return paths


def summary_line(image: Path, result: SegmentResult) -> str:
    height, width = result.labels.shape
    found = ", ".join(f"{p['class']} {100 * p['pixel_share']:.1f}%" for p in result.present)
    return f"{image.name}: {width}x{height}, {result.mode}, {result.seconds:.2f} s — {found}"


def _class_list(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    try:
        names = read_classes_file(args.classes_file) if args.classes_file else args.classes
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            classes = normalize_classes(names, args.background)
    except (ValueError, DataError) as e:
        parser.error(str(e))
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return classes


def run_segment(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    classes = _class_list(args, parser)
    try:
        check_settings(args.lam, args.threshold)
    except ValueError as e:
        parser.error(str(e))
    images = [Path(p) for p in args.images]
    clashes = sorted(stem for stem, n in Counter(p.stem for p in images).items() if n > 1)
    if clashes:
        parser.error(f"images share file stems {clashes}, so their outputs would overwrite each other; "
                     "segment them in separate runs or with different --out")
    try:
        mask_file = MaskFile.load(args.masks) if args.masks else None
    except DataError as e:
        print(f"ovseg segment: error: {e}", file=sys.stderr)
        return 1
    try:
        segmenter = Segmenter.load(args.model, maskformer=args.maskformer, clip=args.clip, clip_arch=args.clip_arch,
                                   clip_variant=args.clip_variant, lam=args.lam, threshold=args.threshold,
                                   device=args.device, precision=args.precision,
                                   proposals=mask_file is None)  # your own masks: no proposal network needed
    except (DataError, MissingWeightsError, ComputeError) as e:
        print(f"ovseg segment: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # e.g. an architecture open_clip does not know
        print(f"ovseg segment: error: {e}", file=sys.stderr)
        return 1
    models = segmenter.describe()
    print(f"models: {models['maskformer'] or f'masks from {args.masks}'} + CLIP {models['clip_name']} ({models['clip_arch']}) {models['clip']}; "
          f"{len(classes)} classes, λ={args.lam}, threshold={args.threshold}")
    failed = 0
    for image in images:
        try:
            rgb = load_rgb(image)
            masks = None if mask_file is None else mask_file.masks([image.name, image.stem], *rgb.shape[:2])
            result = segmenter.segment(rgb, classes, mode=args.mode, masks=masks)
        except DataError as e:
            print(f"ovseg segment: error: {e}", file=sys.stderr)
            failed += 1
            continue
        write_outputs(args.out, image, result, segmenter)
        print(summary_line(image, result))
    print(f"wrote {len(images) - failed} of {len(images)} images to {args.out}")
    return 1 if failed else 0


def _command(subparsers: argparse._SubParsersAction, name: str, handler: Callable[..., int], **kwargs: Any
             ) -> argparse.ArgumentParser:
    """A subcommand's parser, whose `handler(args, parser)` runs it."""
    p = subparsers.add_parser(name, **kwargs)
    p.set_defaults(handler=handler, parser=p)
    return p


def add_segment(subparsers: argparse._SubParsersAction) -> None:
    p = _command(
        subparsers, "segment", run_segment, help="segment images into any list of class names",
        description="Segment images into the classes you name (any words: CLIP's text tower encodes them).",
        epilog="writes <stem>.overlay.png, <stem>.labels.png (class ids) and <stem>.json per image into --out.\n"
               "exit status: 0 all written; 1 a model or some image could not be read (the other images are\n"
               "still written); 2 a usage error (options, class list, images sharing a file stem).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    names = p.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes", help='comma-separated class names, e.g. "sky, kite, grass, golden retriever"')
    names.add_argument("--classes-file", type=Path, help="text file with one class name per line (# comments)")
    p.add_argument("--background", metavar="NAME",
                   help='append this class (e.g. "others"); required to segment a single named class')
    p.add_argument("--model", type=Path, metavar="RUN_DIR",
                   help="a run's models/ directory (default: the repository's models/, written by `dvc repro`)")
    p.add_argument("--maskformer", type=Path, help="proposal network file (overrides the run directory's)")
    p.add_argument("--clip", type=Path, help="adapted-CLIP directory or CLIP checkpoint file (overrides --clip-variant)")
    p.add_argument("--clip-arch", help="open_clip architecture of a --clip checkpoint that does not record it")
    p.add_argument("--clip-variant", default=DEFAULT_VARIANT,
                   help=f"adapted CLIP under <RUN_DIR>/adapt_clip/, or 'original' (default {DEFAULT_VARIANT})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT}/)")
    p.add_argument("--lam", type=float, default=DEFAULT_LAM, help=f"CLIP ensemble weight λ (default {DEFAULT_LAM})")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"mask threshold of the CLIP crops (default {DEFAULT_THRESHOLD})")
    p.add_argument("--mode", choices=("auto", "resize", "slide"), default="auto",
                   help="whole image at once, sliding windows, or auto: windows only for images over 2:1")
    p.add_argument("--masks", type=Path, metavar="JSON",
                   help="COCO RLE JSON of your own masks (e.g. SAM's), found by image file name or stem: CLIP "
                        "classifies them instead of the proposals; pixels they do not cover stay unlabelled")
    p.add_argument("--device", default="auto",
                   help="auto (the GPU when one is visible, else the CPU), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 where the device computes it natively (GPUs, AVX512-BF16 CPUs), else fp32 (default auto)")


def run_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        record = export_adapted(args.clip, args.out, args.clip_arch)
    except (DataError, MissingWeightsError) as e:
        print(f"ovseg export: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # e.g. a plain checkpoint without its architecture
        print(f"ovseg export: error: {args.clip}: {e}", file=sys.stderr)
        return 1
    files = ", ".join(f for f in record["files"].values() if f)
    print(f"exported {record['name']} ({record['arch']}) to {args.out}: {files}")
    for what, call in record["load"].items():
        if call:
            print(f"  {what}: {call}")
    if record["files"]["openai"] is None:
        print(f"  no OpenAI layout: {record['openai_layout']}")
    return 0


def add_export(subparsers: argparse._SubParsersAction) -> None:
    p = _command(
        subparsers, "export", run_export,
        help="write an adapted CLIP as open_clip (and OpenAI) checkpoints plus its mask prompts",
        description="Write the CLIP weights of an adapted CLIP as an open_clip checkpoint, in OpenAI's state-dict "
                    "layout where the architecture allows it, and its mask prompts (see ovseg_core/clip/export.py).",
        epilog="exit status: 0 written; 1 the adapted CLIP could not be read (nothing is written).")
    p.add_argument("clip", type=Path, metavar="ADAPTED",
                   help="adapted-CLIP directory (e.g. models/adapt_clip/ft-mpt) or CLIP checkpoint file")
    p.add_argument("--out", type=Path, required=True, help="output directory (replaced whole)")
    p.add_argument("--clip-arch", help="open_clip architecture of a checkpoint that does not record it")


def run_import_ovseg(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        classes = None if args.classes is None else normalize_classes(args.classes)
    except ValueError as e:
        parser.error(str(e))
    try:
        adapted, proposals = import_release(args.checkpoint, args.out, args.name, args.proposals_out, classes)
    except DataError as e:
        print(f"ovseg import-ovseg: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {adapted}: use it as --clip {args.out} (ovseg segment) or as an evaluate variant's clip")
    if proposals is not None:
        print(f"wrote {proposals}: use it as --maskformer {proposals} (ovseg segment)")
    elif args.proposals_out is not None:
        print(f"{args.checkpoint} holds no proposal network: wrote the CLIP only")
    return 0


def add_import_ovseg(subparsers: argparse._SubParsersAction) -> None:
    p = _command(
        subparsers, "import-ovseg", run_import_ovseg,
        help="the adapted CLIP (and proposal network) of an OVSeg release (e.g. ovseg_swinbase_vitL14_ft_mpt.pth)",
        description="Write the CLIP and mask prompts of one of OVSeg's released checkpoints as an adapted-CLIP "
                    "directory and, with --proposals-out, its proposal network (Swin-B or ResNet-101c) as a "
                    "proposal network file (see ovseg_core/clip/ovseg_release.py).",
        epilog="exit status: 0 written; 1 the checkpoint could not be read, lacks OVSeg's CLIP keys or (with "
               "--proposals-out) holds a proposal network that does not map; nothing is written then.")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    p.add_argument("--out", type=Path, required=True, help="adapted-CLIP directory to write")
    p.add_argument("--name", default="ovseg", help="the adapted CLIP's name (default ovseg)")
    p.add_argument("--proposals-out", type=Path, metavar="FILE",
                   help="also write the release's proposal network to FILE (e.g. models/train_maskformer/ovseg.pt; "
                        "use it as ovseg segment --maskformer FILE); a checkpoint without one imports the CLIP only")
    p.add_argument("--classes", help="comma-separated vocabulary stored with --proposals-out, encoded by the "
                                     "release's CLIP (default: COCO-Stuff's 171 classes, the release's training "
                                     "set; ovseg segment sets its own)")


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (add_segment, add_export, add_import_ovseg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovseg", description="Open-vocabulary semantic segmentation (OVSeg).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
