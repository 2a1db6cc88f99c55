"""Stage `world`: generate the embedded world (DESIGN.md §3) in the official dataset formats."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ovseg_core.world import WorldConfig, generate_world
from stages.common import PARAMS_FILE, StageContext, main


def run(ctx: StageContext) -> dict[str, Any]:
    section = dict(ctx.section("world"))
    out = Path(section.pop("out"))
    cfg = WorldConfig.from_dict(section, source=f"{PARAMS_FILE} (world)")
    summary = generate_world(out, cfg)
    ctx.publish_table("counts", [{"split": k, "value": v} for k, v in summary.items()
                                 if isinstance(v, (int, float))], "Embedded world: counts and timing")
    return summary


if __name__ == "__main__":
    main("world")
