"""The embedded world: a procedurally generated stand-in for COCO / ADE20K, deterministic from a seed.

See DESIGN.md §3. `generate_world` writes it in the official formats; `render_scene`,
`render_single_object` and `split_scene` make scenes in memory.
"""
from .captions import make_captions
from .config import EvalSetConfig, SceneParams, WorldConfig
from .generate import GENERATOR_VERSION, generate_world, scene_rng, seen_flags, split_scene
from .render import Scene, render_scene, render_single_object
from .spec import (BASE_CLASSES, CLASSES, DEFAULT_UNSEEN, EXTRA_THINGS, NUM_THINGS, STUFF, THINGS, class_index,
                   coco_category_id)

__all__ = [
    "BASE_CLASSES", "CLASSES", "DEFAULT_UNSEEN", "EXTRA_THINGS", "EvalSetConfig", "GENERATOR_VERSION", "NUM_THINGS",
    "STUFF", "SceneParams", "Scene", "THINGS", "WorldConfig", "class_index", "coco_category_id", "generate_world",
    "make_captions", "render_scene", "render_single_object", "scene_rng", "seen_flags", "split_scene",
]
