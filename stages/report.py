"""Stage `report`: `reports/report.md` (headline table first, then the paper's ablation tables reproduced
on our evaluation sets, each beside the paper's own numbers) and a qualitative figure.

Reads whatever exists of `<evaluations>/*.json` (the evaluate stage, one file per CLIP variant), the
sweep's best cell, and the upstream metrics (pretrained CLIP, MaskFormer, mining); what is missing is
listed in the report, and table rows whose variant was not evaluated read "not run". Which variant
plays which row of which paper table, and which sets are shown, comes from params (`report`).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

import ovseg_core
from ovseg_core.atomic import write_text
from ovseg_core.datasets.prepared import load_rgb
from ovseg_core.errors import DataError
from ovseg_core.visualize import EXAMPLES_INDEX, grid_figure, save_image
from stages.common import StageContext, depth_variant, gt_mask_variants, main

NOT_RUN = "not run"
PAPER_SETS = ("A-847", "A-150", "PC-59")
PAPER_MODEL = "MaskFormer Swin-B + CLIP ViT-L/14"

# The paper's numbers (Liang et al., CVPR 2023), zero-shot mIoU. Row keys are the paper's case labels;
# params map them to our variants.
TABLE2 = {  # Table 2: mask-category pairs. (mask source, category source, pairs, unique nouns, A-847, A-150, PC-59)
    "baseline": ("–", "–", "–", "–", (7.3, 21.8, 51.4)),
    "(1)": ("GT", "GT classes", "965K", "171", (5.3, 23.0, 57.3)),
    "(2)": ("GT", "1 caption", "440K", "12K", (7.9, 24.2, 53.2)),
    "(3)": ("proposals", "1 caption", "440K", "12K", (8.8, 28.8, 55.7)),
    "(4)": ("proposals", "5 captions", "1.3M", "27K", (8.8, 28.6, 55.5)),
}
TABLE3 = {  # Table 3: mask prompt tuning. (mask prompt, full model, A-847, A-150, PC-59)
    "baseline": (False, False, (7.3, 21.8, 51.4)),
    "(a)": (True, False, (8.4, 26.5, 55.4)),
    "(b)": (False, True, (8.8, 28.8, 55.7)),
    "(c)": (True, True, (9.0, 29.6, 55.7)),
}
TABLE4 = {  # Table 4 (appendix A.4): combining MPT and FT. (A-847, A-150)
    "FT→MPT": (9.0, 29.6),
    "MPT→FT": (8.5, 28.1),
    "FT + MPT sim.": (8.8, 29.0),
}
TABLE5 = {  # Table 5 (appendix A.4): prompt depth, A-150. depth → (w/o FT, w/ FT)
    1: (25.7, 29.3),
    3: (26.5, 29.6),
    6: (26.8, 29.4),
    12: (26.8, 29.3),
}
TABLE5_COLUMNS = ("w/o FT", "w/ FT")
TABLE6 = {  # Table 6 (appendix A.5): class prediction ensemble, A-150. (MaskFormer only, CLIP only, ensemble)
    "baseline": (19.6, 14.3, 21.8),
    "OVSeg": (19.6, 25.1, 29.6),
}
BRANCH_TITLES = {"maskformer": "MaskFormer only", "clip": "CLIP only", "ensemble": "ensemble"}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON: {e}") from e


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def with_delta(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return fmt(value)
    return f"{value:.1f} ({value - base:+.1f})"


def paper_row(table: dict[Any, Any], name: str, case: Any) -> Any:
    """The paper's row `case` of a table, or a clear error naming the params entry."""
    if case not in table:
        raise KeyError(f"params.yaml report.tables.{name}: {case!r} is not a case of the paper's table; "
                       f"known: {list(table)}")
    return table[case]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[f"{prefix}{key}"] = value
    return out


class Evaluations:
    """The evaluate stage's results by variant, with "not run" for what is absent."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.by_variant = {p.stem: read_json(p) for p in sorted(directory.glob("*.json"))} if directory.is_dir() else {}

    def score(self, variant: str | None, dataset: str, branch: str, metric: str) -> float | None | str:
        """The score, None when undefined (e.g. no unseen class), NOT_RUN when that evaluation is absent."""
        entry = self.by_variant.get(variant or "", {}).get(dataset, {}).get(branch)
        return NOT_RUN if entry is None else entry.get(metric)

    def cell(self, variant: str | None, dataset: str, branch: str = "ensemble", metric: str = "mIoU",
             base: str | None = None) -> str:
        value = self.score(variant, dataset, branch, metric)
        if value == NOT_RUN:
            return NOT_RUN
        ref = self.score(base, dataset, branch, metric) if base else None
        return with_delta(value, None if ref == NOT_RUN else ref)


class Report:
    def __init__(self, settings: dict[str, Any], seed: int = 0):
        self.s = settings
        self.seed = seed
        self.evals = Evaluations(Path(settings["evaluations"]))
        self.datasets: list[str] = list(settings["datasets"])
        self.missing: list[str] = []

    # -- sections -------------------------------------------------------------------------------
    def headline(self) -> tuple[str, list[dict[str, Any]]]:
        h = self.s["headline"]
        main_v, base_v = h["main"], h["baseline"]
        mf_variant = next((v for v in (main_v, base_v) if v in self.evals.by_variant), main_v)
        systems = [(f"OVSeg: MaskFormer + `{main_v}` CLIP, ensemble", main_v, "ensemble", TABLE6["OVSeg"][2]),
                   (f"MaskFormer + `{base_v}` CLIP, ensemble", base_v, "ensemble", TABLE6["baseline"][2]),
                   ("MaskFormer only", mf_variant, "maskformer", TABLE6["OVSeg"][0])]
        header = ["system"] + [f"{d} {m}" for d in self.datasets for m in ("mIoU", "hIoU")] + ["paper A-150 mIoU"]
        rows, records = [], []
        for title, variant, branch, paper in systems:
            cells = {f"{d} {m}": self.evals.cell(variant, d, branch, m)
                     for d in self.datasets for m in ("mIoU", "hIoU")}
            rows.append([title, *cells.values(), fmt(paper)])
            records.append({"system": title.replace("`", ""), **cells, "paper A-150 mIoU": paper})
        text = ("## Headline\n\n" + markdown_table(header, rows) +
                f"\n\nZero-shot scores (%) on our evaluation sets; hIoU = harmonic mean of seen and unseen mIoU. "
                f"Paper column: {PAPER_MODEL}, ADE-150 (paper Table 6 / Table 3). "
                f"MaskFormer only comes from the `{mf_variant}` evaluation (the text tower is frozen in every "
                f"adaptation, so it is the same for all variants).\n" + self._sampling_noise(main_v))
        return text, records

    def _sampling_noise(self, variant: str) -> str:
        """The bootstrap standard error of the variant's ensemble mIoU on each set and, where it is 0.5 or more, the
        set size that would bring it under 0.5 (it shrinks as 1/sqrt(images))."""
        parts = []
        for d in self.datasets:
            se, n = (self.evals.score(variant, d, "ensemble", k) for k in ("mIoU_se", "images"))
            if isinstance(se, (int, float)) and isinstance(n, int) and se > 0:
                under = "under 0.5" if se < 0.5 else f"under 0.5 would take ~{math.ceil(n * (se / 0.5) ** 2):,} images"
                parts.append(f"{d}: ±{se:.2f} over {n} images ({under})")
        if not parts:
            return ""
        return ("\nSampling noise: the standard error of OVSeg's mIoU over the evaluation images (1,000 bootstrap "
                f"resamples) is {'; '.join(parts)}. Differences between variants smaller than about twice that are "
                "not evidence on their own; `reports/seeds.md` gives the run-to-run noise over seeds.\n")

    def table2(self, rows_cfg: dict[str, dict[str, str]]) -> str:
        mined = self._mine_metrics()
        base = rows_cfg.get("baseline", {}).get("variant")
        header = ["case", "mask", "category", "variant", "pairs", "unique nouns"]
        header += [f"{d} {m}" for d in self.datasets for m in ("mIoU", "seen", "unseen", "hIoU")]
        header += ["paper pairs", "paper nouns"] + [f"paper {p}" for p in PAPER_SETS]
        rows = []
        for case, cfg in rows_cfg.items():
            mask, category, pairs, nouns, paper = paper_row(TABLE2, "table2", case)
            stats = mined.get(cfg.get("mine", ""), {})
            ours = []
            for d in self.datasets:
                ours.append(self.evals.cell(cfg["variant"], d, base=None if case == "baseline" else base))
                ours += [self.evals.cell(cfg["variant"], d, metric=m) for m in ("seen_mIoU", "unseen_mIoU", "hIoU")]
            rows.append([case, mask, category, f"`{cfg['variant']}`", stats.get("pairs", "–"),
                         stats.get("unique_nouns", "–"), *ours, pairs, nouns,
                         *(fmt(v) if case == "baseline" else with_delta(v, TABLE2["baseline"][4][i])
                           for i, v in enumerate(paper))])
        off = (self.s.get("ablations_off") or {}).get("table2") or []
        note = (f" Rows {', '.join(off)} (ground-truth masks) are an ablation this run leaves out: "
                "`dvc exp run -S 'ablations.gt_masks=[classes,nouns]'` adds them; the multi-seed report has them."
                if off else "")
        return ("## Table 2: mask–category pairs for fine-tuning\n\n" + markdown_table(header, rows) +
                "\n\nFull fine-tuning of CLIP on pairs mined with the given mask and category sources; ensemble "
                "mIoU with Δ to the baseline (original CLIP), and its seen / unseen split. Paper: Table 2 "
                f"({PAPER_MODEL}).{note}\n")

    def table3(self, rows_cfg: dict[str, str]) -> str:
        base = rows_cfg.get("baseline")
        header = ["case", "mask prompt", "full model", "variant"] + [f"{d} mIoU" for d in self.datasets]
        header += [f"paper {p}" for p in PAPER_SETS]
        rows = []
        for case, variant in rows_cfg.items():
            mpt, ft, paper = paper_row(TABLE3, "table3", case)
            rows.append([case, "✓" if mpt else "", "✓" if ft else "", f"`{variant}`",
                         *(self.evals.cell(variant, d, base=None if case == "baseline" else base)
                           for d in self.datasets),
                         *(fmt(v) if case == "baseline" else with_delta(v, TABLE3["baseline"][2][i])
                           for i, v in enumerate(paper))])
        return ("## Table 3: mask prompt tuning and fine-tuning\n\n" + markdown_table(header, rows) +
                "\n\nEnsemble mIoU with Δ to the baseline (original CLIP); (c) is FT→MPT. Paper: Table 3 "
                f"({PAPER_MODEL}).\n")

    def table4(self, rows_cfg: dict[str, str]) -> str:
        header = ["combination", "variant"] + [f"{d} mIoU" for d in self.datasets] + ["paper A-847", "paper A-150"]
        rows = [[name, f"`{variant}`", *(self.evals.cell(variant, d) for d in self.datasets),
                 *(fmt(v) for v in paper_row(TABLE4, "table4", name))] for name, variant in rows_cfg.items()]
        return ("## Table 4: combining MPT and FT\n\n" + markdown_table(header, rows) +
                "\n\nEnsemble mIoU. Paper: Table 4 (appendix A.4).\n")

    def table5(self, columns_cfg: dict[str, dict[Any, str]]) -> str:
        layers = self._vision_layers()
        columns = [c for c in TABLE5_COLUMNS if c in columns_cfg]
        for c in columns_cfg:
            paper_row(dict.fromkeys(TABLE5_COLUMNS), "table5", c)
        header = ["prompt depth"] + [f"{c}: {d} mIoU" for c in columns for d in self.datasets]
        header += [f"paper A-150 {c}" for c in TABLE5_COLUMNS]
        # the paper's depths (of ViT-L's 24 layers), and any other depth our ablation ran (e.g. all 4 of ours)
        depths = sorted(set(TABLE5) | {int(d) for c in columns for d in columns_cfg[c]})
        rows = []
        for depth in depths:
            paper = TABLE5.get(depth, (None,) * len(TABLE5_COLUMNS))
            ours = []
            for c in columns:
                variant = {int(k): v for k, v in columns_cfg[c].items()}.get(depth)
                for d in self.datasets:
                    if variant is not None:
                        ours.append(f"{self.evals.cell(variant, d)} (`{variant}`)")
                    elif layers is not None and depth > layers:
                        ours.append(f"n/a (ViT has {layers} layers)")
                    else:
                        ours.append(NOT_RUN)
            rows.append([f"{depth}{' (default)' if depth == 3 else ''}", *ours, *(fmt(v) for v in paper)])
        note = (f" The `{self.s['clip_arch']}` ViT has {layers} layers, so deeper prompts are not possible."
                if layers is not None else "")
        return ("## Table 5: prompt depth\n\n" + markdown_table(header, rows) +
                "\n\nEnsemble mIoU of MPT with prompts in the first *depth* layers, without (w/o) and with (w/) "
                f"full fine-tuning first. Paper: Table 5 (appendix A.4), A-150.{note}\n")

    def table6(self, rows_cfg: dict[str, str]) -> str:
        header = ["model", "variant"] + [f"{d} {BRANCH_TITLES[b]}" for d in self.datasets for b in BRANCH_TITLES]
        header += [f"paper A-150 {t}" for t in BRANCH_TITLES.values()]
        rows = [[name, f"`{variant}`", *(self.evals.cell(variant, d, b) for d in self.datasets for b in BRANCH_TITLES),
                 *(fmt(v) for v in paper_row(TABLE6, "table6", name))] for name, variant in rows_cfg.items()]
        lambdas = self._lambdas()
        return ("## Table 6: class prediction ensemble\n\n" + markdown_table(header, rows) +
                "\n\nmIoU of MaskFormer's class prediction alone (λ = 0), CLIP's alone (λ = 1) and their geometric "
                f"ensemble p_mf^(1−λ)·p_clip^λ{lambdas}. Paper: Table 6 (appendix A.5), A-150, λ = 0.7.\n")

    def sweep(self) -> str:
        path = Path(self.s["sweep"])
        if not path.is_file():
            self.missing.append(f"`{path}` (the λ × threshold sweep)")
            return ""
        best = read_json(path)
        rel = Path(os.path.relpath(self.s["sweep_heatmap"], Path(self.s["out"]).parent))
        return ("## λ × mask threshold sweep\n\n" +
                markdown_table(["best λ", "best threshold", "mIoU", "hIoU"],
                               [[best.get("best_lambda"), best.get("best_threshold"), fmt(best.get("best_mIoU")),
                                 fmt(best.get("best_hIoU"))]]) +
                f"\n\n![sweep heat map]({rel.as_posix()})\n")

    def inputs(self) -> str:
        parts = []
        for stage, p in self.s["inputs"].items():
            label = f"`{stage}` stage"
            path = Path(p)
            if path.is_dir():
                files = sorted(path.glob("*.json"))
                if not files:
                    self.missing.append(f"`{path}/*.json` ({label})")
                    continue
                data = {f.stem: flatten(read_json(f)) for f in files}
                keys = list(dict.fromkeys(k for d in data.values() for k in d))
                rows = [[f"`{name}`", *(self._value(d.get(k)) for k in keys)] for name, d in data.items()]
                parts.append(f"### {label}\n\n" + markdown_table(["variant", *keys], rows))
            elif path.is_file():
                rows = [[k, self._value(v)] for k, v in flatten(read_json(path)).items()]
                parts.append(f"### {label}\n\n" + markdown_table(["metric", "value"], rows))
            else:
                self.missing.append(f"`{path}` ({label})")
        return "## Pipeline inputs\n\n" + ("\n\n".join(parts) if parts else "None found.") + "\n"

    def qualitative(self, figure: Path) -> str:
        q = self.s["qualitative"]
        rows, titles, classes, ignore = [], [], None, 255
        indexes = {}
        for r in q["rows"]:
            path = Path(self.s["predictions"]) / r["variant"] / q["dataset"] / EXAMPLES_INDEX
            if path.is_file():
                indexes[r["variant"]] = (path.parent, read_json(path))
            else:
                self.missing.append(f"`{path}` (predictions of `{r['variant']}` for the figure)")
        if indexes:
            first_dir, first = next(iter(indexes.values()))
            classes, ignore = first["classes"], first["ignore_label"]
            for sample in first["samples"][: int(q["images"])]:
                image = load_rgb(first_dir / sample["image"])
                gt = np.asarray(Image.open(first_dir / sample["label"]), dtype=np.int64)
                for r in q["rows"]:
                    if r["variant"] not in indexes:
                        continue
                    directory, index = indexes[r["variant"]]
                    match = next((s for s in index["samples"] if s["id"] == sample["id"]), None)
                    if match is None or r["branch"] not in match["predictions"]:
                        continue
                    pred = np.asarray(Image.open(directory / match["predictions"][r["branch"]]), dtype=np.int64)
                    rows.append((image, gt, pred))
                    titles.append(f"{sample['id']} · {r['variant']} · {BRANCH_TITLES[r['branch']]}")
        if rows:
            save_image(figure, grid_figure(rows, classes, ignore_label=ignore, titles=titles))
            caption = f"First {q['images']} images of {q['dataset']}: input, ground truth, prediction."
        else:
            placeholder = Image.new("RGB", (480, 60), "white")
            ImageDraw.Draw(placeholder).text((10, 20), "no predictions were available for this figure", fill="black")
            save_image(figure, placeholder)
            caption = "No predictions were available: the figure is a placeholder."
        rel = Path(os.path.relpath(figure, Path(self.s["out"]).parent))
        return f"## Qualitative results\n\n![qualitative results]({rel.as_posix()})\n\n{caption}\n"

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _value(v: Any) -> str:
        """Upstream metrics are not all percentages: four significant digits."""
        return f"{v:.4g}" if isinstance(v, float) else ("–" if v is None else str(v))

    def _mine_metrics(self) -> dict[str, dict[str, Any]]:
        directory = Path(self.s["inputs"].get("mine", ""))
        return {p.stem: read_json(p) for p in sorted(directory.glob("*.json"))} if directory.is_dir() else {}

    def _vision_layers(self) -> int | None:
        """The ViT's depth from the architecture's open_clip JSON config: the embedded world's own
        (ovseg_core/model_configs) or open_clip's, read as files because importing open_clip (and torch)
        for one number took ~8 s of the report's start-up on a 2-core machine."""
        spec = importlib.util.find_spec("open_clip")  # finds the package without running it
        dirs = [Path(ovseg_core.__file__).parent / "model_configs"]
        dirs += [Path(d) / "model_configs" for d in (spec.submodule_search_locations or [])] if spec else []
        name = f"{self.s['clip_arch']}.json"
        path = next((d / name for d in dirs if (d / name).is_file()), None)
        return None if path is None else int(read_json(path)["vision_cfg"]["layers"])

    def _lambdas(self) -> str:
        values = []
        for d in self.datasets:
            candidates = (Path(self.s["predictions"]) / v / d / EXAMPLES_INDEX for v in self.evals.by_variant)
            path = next((c for c in candidates if c.is_file()), None)
            if path is not None:
                values.append(f"λ = {read_json(path)['lambda']:g} on {d}")
        return f" ({', '.join(values)})" if values else ""

    def render(self) -> tuple[str, list[dict[str, Any]]]:
        headline, records = self.headline()
        absent = [v for v in self._configured_variants() if v not in self.evals.by_variant]
        sections = [headline]
        tables = self.s.get("tables") or {}
        for key, method in (("table2", self.table2), ("table3", self.table3), ("table4", self.table4),
                            ("table5", self.table5), ("table6", self.table6)):
            if key in tables:
                sections.append(method(tables[key]))
        sections.append(self.qualitative(Path(self.s["figure"])))
        sections += [s for s in (self.sweep(), self.inputs()) if s]
        self.missing = [f"`{self.evals.directory}/{v}.json` (evaluation of `{v}`)" for v in absent] + self.missing
        status = ("## Missing inputs\n\n" + "\n".join(f"- {m}" for m in self.missing) + "\n") if self.missing else \
            "All configured inputs were found.\n"
        title = (f"# {self.s.get('title', 'OVSeg reproduction report')}\n\n"
                 f"Variants evaluated: {', '.join(f'`{v}`' for v in self.evals.by_variant) or 'none'}. "
                 f"Evaluation sets: {', '.join(self.datasets)}. Scores in %.\n\n"
                 f"One run: run seed {self.seed} (params.yaml `seed`). Differences between variants can be of the "
                 f"size of run-to-run noise; {self._seeds_pointer()}\n")
        return "\n".join([title, sections[0], status, *sections[1:]]), records

    def _seeds_pointer(self) -> str:
        seeds = self.s.get("seeds")
        where = f"`{seeds}`" if seeds else "a multi-seed report"
        return (f"{where} has every score as mean ± standard deviation over several seeds and a verdict for each "
                "of the paper's claims (`python -m scripts.multi_seed run`, then `report`).")

    def _configured_variants(self) -> list[str]:
        """Every variant the headline and the tables name (table2 rows are {variant, mine}; table5 is
        {column: {depth: variant}}; the others {case: variant})."""
        tables = self.s.get("tables") or {}
        found = [self.s["headline"]["main"], self.s["headline"]["baseline"]]
        found += [row["variant"] for row in (tables.get("table2") or {}).values()]
        found += [v for column in (tables.get("table5") or {}).values() for v in column.values()]
        found += [v for key in ("table3", "table4", "table6") for v in (tables.get(key) or {}).values()]
        return list(dict.fromkeys(found))


def with_ablations(settings: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The report's settings with the ablations as params.yaml switches them: each of `prompt_depths` a Table 5
    column entry of MPT without FT; a Table 2 row whose pairs are only mined by an ablation
    (`mine.ablation_variants`) stays only where `gt_masks` switches it on (the others go to `ablations_off`)."""
    ablations = params.get("ablations") or {}
    tables = dict(settings.get("tables") or {})
    if ablations.get("prompt_depths"):
        table5 = {column: dict(entries) for column, entries in (tables.get("table5") or {}).items()}
        table5.setdefault("w/o FT", {}).update({int(d): depth_variant(d) for d in ablations["prompt_depths"]})
        tables["table5"] = table5
    off_pairs = set((params.get("mine") or {}).get("ablation_variants") or {}) - set(gt_mask_variants(params))
    rows = tables.get("table2") or {}
    off = [case for case, row in rows.items() if row.get("mine") in off_pairs]
    if off:
        tables["table2"] = {case: row for case, row in rows.items() if case not in off}
    return {**settings, "tables": tables, "ablations_off": {"table2": off}}


def run(ctx: StageContext) -> dict[str, Any]:
    settings = with_ablations(ctx.section("report"), ctx.params)
    report = Report(settings, int(ctx.params.get("seed") or 0))
    markdown, headline = report.render()
    write_text(settings["out"], markdown)
    ctx.publish_table("headline", headline, "Headline: zero-shot mIoU / hIoU (%)")
    ctx.publish_markdown("report", markdown, "The evaluation report")
    return {"variants_evaluated": len(report.evals.by_variant), "missing_inputs": len(report.missing)}


if __name__ == "__main__":
    main("report")
