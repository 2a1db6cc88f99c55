"""Benchmark the embedded world generator: scenes/s for rendering alone and for rendering + writing.

    python scripts/bench_world.py                 # render 2000 scenes per split, then write the default world
    python scripts/bench_world.py --scenes 500 --no-write
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ovseg_core.world import WorldConfig, generate_world, split_scene
from ovseg_core.world.captions import make_captions
from ovseg_core.world.generate import scene_rng
from ovseg_core.world.render import render_scene


class Timer:
    """Wall and CPU seconds of a block (CPU time is the robust figure on a shared machine)."""

    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def bench_render(cfg: WorldConfig, n: int) -> dict[str, tuple[float, float]]:
    """(scenes per wall second, scenes per CPU second), in memory: bare rendering, with captions, per split."""
    split_scene(cfg, "web", 0)  # build the texture banks outside the timing
    out = {}
    with Timer() as t:
        for i in range(n):
            render_scene(scene_rng(cfg.seed, "web", i), cfg.image_size, cfg.scene, cfg.seed)
    out["render_only"] = (n / t.wall, n / t.cpu)
    with Timer() as t:
        for i in range(n):
            scene = render_scene(scene_rng(cfg.seed, "web", i), cfg.image_size, cfg.scene, cfg.seed)
            make_captions(scene_rng(cfg.seed, "bench", i), scene, cfg.captions_per_image, all_stuff=False)
    out[f"render+{cfg.captions_per_image}_captions"] = (n / t.wall, n / t.cpu)
    for split in ["web", "coco"] + [f"eval/{name}" for name in cfg.eval_sets]:
        split_scene(cfg, split, 0)
        with Timer() as t:
            for i in range(n):
                split_scene(cfg, split, i)
        out[f"split:{split}"] = (n / t.wall, n / t.cpu)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=2000, help="scenes per in-memory measurement")
    ap.add_argument("--no-write", action="store_true", help="skip writing the default world to a temp dir")
    ap.add_argument("--out", type=Path, default=None, help="write the world here instead of a temp dir")
    args = ap.parse_args()
    cfg = WorldConfig()
    print(f"in-memory, {args.scenes} scenes each: scenes/s (wall)  scenes/s (CPU)")
    for k, (wall, cpu) in bench_render(cfg, args.scenes).items():
        print(f"  {k:28s} {wall:8.0f} {cpu:8.0f}")
    if args.no_write:
        return
    with tempfile.TemporaryDirectory(dir=args.out.parent if args.out else None) as tmp, Timer() as t:
        result = generate_world(args.out or Path(tmp) / "world", cfg)
    print(f"default world, render + write: {result['scenes']} scenes, {t.wall:.1f} s wall "
          f"({result['scenes'] / t.wall:.0f} scenes/s), {t.cpu:.1f} s CPU ({result['scenes'] / t.cpu:.0f} scenes/s)")
    print(json.dumps({k: round(v, 2) for k, v in result["seconds"].items()}))


if __name__ == "__main__":
    main()
