"""Stage `prepare`: read the official dataset layouts named in params.yaml into the common prepared form.

The training set (COCO-Stuff, or the embedded world's COCO split) comes first: its class names are the
seen vocabulary that flags each evaluation set's classes as seen or unseen, by concept (the paper's protocol:
COCO-Stuff-171's classes against each benchmark's). Each prepared set's `seen.csv` records that split: for
every class the training class it matched and the rule that matched it. Sets under `captioned:` are
caption-only image sets to mine (your own images: readers `caption-folder`, `webdataset-captions`).

Evaluation sets are written apart, to `<out>/eval/<name>`: the stages that evaluate depend on that folder
alone, not on the training set's label maps (DVC hashes every file of a dep on each `dvc repro`, even one
that has nothing to do: at paper size COCO-Stuff's 118K label maps once per evaluation stage).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ovseg_core.datasets.prepared import SEEN_FILE, PreparedDataset
from ovseg_core.datasets.registry import prepare_dataset
from stages.common import StageContext, main

EVAL_DIR = "eval"  # <prepare.out>/eval/<name>: the evaluation sets


def _prepare(entry: dict[str, Any], name: str, out: Path, vocabulary: list[str] | None) -> PreparedDataset:
    options = dict(entry.get("options") or {})
    for key in ("captions", "labels"):
        if key in entry:
            options[key] = entry[key]
    return prepare_dataset(entry["reader"], Path(entry["root"]), out / name, entry.get("split", "val"),
                           train_vocabulary=vocabulary, class_file=entry.get("class_file"), options=options,
                           dataset_name=name)


def run(ctx: StageContext) -> dict[str, Any]:
    p = ctx.section("prepare")
    out = Path(p["out"])
    train = _prepare(p["train"], p["train"]["name"], out, None)
    rows = [train]
    if p.get("web"):
        rows.append(_prepare(p["web"], p["web"]["name"], out, None))
    rows += [_prepare(entry, name, out, None) for name, entry in (p.get("captioned") or {}).items()]
    evals = [_prepare(entry, name, out / EVAL_DIR, train.classes) for name, entry in (p.get("eval") or {}).items()]
    rows += evals
    table = [{"dataset": d.name, "images": len(d), "classes": d.num_classes, "seen": sum(d.seen),
              "unseen": d.num_classes - sum(d.seen), "skipped": len(d.skipped)} for d in rows]
    ctx.publish_table("datasets", table, "Prepared datasets")
    for d in evals:
        ctx.log.info("%s: %d of %d classes seen, %d unseen (per class: %s)", d.name, sum(d.seen), d.num_classes,
                     d.num_classes - sum(d.seen), d.root / SEEN_FILE)
        if "id_order" in d.source:
            ctx.log.info("%s: detectron2 PC-59 id order %s, %s", d.name, d.source["id_order"],
                         d.source["id_order_check"])
    for d in rows:
        if d.skipped:
            ctx.log.warning("%s: skipped %d undecodable images (listed in %s/dataset.json)",
                            d.name, len(d.skipped), d.root)
    return {f"{d.name}_images": len(d) for d in rows} | {f"{d.name}_skipped": len(d.skipped) for d in rows}


if __name__ == "__main__":
    main("prepare")
