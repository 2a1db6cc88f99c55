"""Configuration of the embedded world (the `world` section of params.yaml)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .spec import BASE_CLASSES, CLASS_INDEX, DEFAULT_UNSEEN, STUFF, VOCABULARIES


def _check_vocabulary(value: str, source: str | Path, key: str) -> None:
    if value not in VOCABULARIES:
        raise DataError(source, f"{key} must be one of {list(VOCABULARIES)}, got {value!r}")


@dataclass(frozen=True)
class SceneParams:
    """How scenes of one split are composed; the eval sets change these to create distribution shift."""

    things: tuple[int, int] = (1, 4)  # inclusive range of objects per scene
    thing_size: tuple[float, float] = (0.3, 0.55)  # object diameter / image size
    stuff: tuple[int, int] = (1, 3)  # inclusive range of background regions
    angled: float = 0.3  # probability that boundaries are tilted instead of horizon-like (never with sky)
    partial: float = 0.0  # probability that an object may be cut by the image border
    max_overlap: float = 0.3  # largest fraction of any object another may cover
    jitter: float = 1.0  # scale of colour/shape jitter (at most 1.5, so classes never overlap)
    stuff_weights: dict[str, float] | None = None  # relative stuff frequencies; default uniform

    def validate(self, source: str | Path, where: str) -> None:
        def bad(problem: str) -> DataError:
            return DataError(source, f"{where}: {problem}")

        lo, hi = self.things
        if not 1 <= lo <= hi <= 8:
            raise bad(f"things must satisfy 1 <= min <= max <= 8, got {list(self.things)}")
        lo, hi = self.stuff
        if not 1 <= lo <= hi <= 3:
            raise bad(f"stuff must satisfy 1 <= min <= max <= 3, got {list(self.stuff)}")
        lo, hi = self.thing_size
        if not 0.1 <= lo <= hi <= 0.9:
            raise bad(f"thing_size must satisfy 0.1 <= min <= max <= 0.9, got {list(self.thing_size)}")
        for name in ("angled", "partial", "max_overlap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.jitter <= 1.5:
            raise bad(f"jitter must be in [0, 1.5], got {self.jitter}")
        if self.stuff_weights is not None:
            names = {s.name for s in STUFF}
            unknown = sorted(set(self.stuff_weights) - names)
            if unknown:
                raise bad(f"stuff_weights names unknown stuff classes {unknown}; known: {sorted(names)}")
            if any(w < 0 for w in self.stuff_weights.values()) or sum(self.stuff_weights.values()) <= 0:
                raise bad("stuff_weights must be non-negative and not all zero")
            # a scene needs as many distinct stuff classes as regions
            if sum(1 for w in self.stuff_weights.values() if w > 0) < self.stuff[1]:
                raise bad(f"stuff_weights give fewer than {self.stuff[1]} classes a positive weight")


@dataclass(frozen=True)
class EvalSetConfig(SceneParams):
    """A held-out set in ADE20K layout labelling all classes; the scene knobs set its shift."""

    images: int = 300
    image_size: int | None = None  # default: the world's image_size
    vocabulary: str = "base"  # base: the training split's classes | wide: + spec.EXTRA_THINGS (as ADE-847 to COCO)
    things: tuple[int, int] = (2, 5)
    thing_size: tuple[float, float] = (0.2, 0.45)


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    image_size: int = 64
    web_images: int = 8000
    web_captions_per_image: int = 2
    coco_images: int = 1500
    captions_per_image: int = 5
    web_vocabulary: str = "wide"  # the web split's things: base | wide (+ spec.EXTRA_THINGS, never in coco)
    unseen: tuple[str, ...] = DEFAULT_UNSEEN
    scene: SceneParams = field(default_factory=SceneParams)
    eval_sets: dict[str, EvalSetConfig] = field(default_factory=lambda: {"world-eval": EvalSetConfig()})
    jpeg_quality: int = 95

    def eval_size(self, name: str) -> int:
        return self.eval_sets[name].image_size or self.image_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str | Path = "world config") -> "WorldConfig":
        """Build from a plain mapping (e.g. params.yaml's `world` section); unknown keys or bad values
        raise DataError naming `source` and the offending key."""
        d = dict(d or {})
        kwargs = _fields(cls, d, source, "world", skip={"scene", "eval_sets"})
        if "scene" in d:
            kwargs["scene"] = SceneParams(**_fields(SceneParams, d["scene"], source, "world.scene"))
        if "eval_sets" in d:
            sets = d["eval_sets"]
            if not isinstance(sets, dict) or not sets:
                raise DataError(source, "world.eval_sets must be a non-empty mapping of set name -> settings")
            kwargs["eval_sets"] = {
                str(name): EvalSetConfig(**_fields(EvalSetConfig, v or {}, source, f"world.eval_sets.{name}"))
                for name, v in sets.items()
            }
        cfg = cls(**kwargs)
        cfg.validate(source)
        return cfg

    def validate(self, source: str | Path = "world config") -> None:
        if self.seed < 0:
            raise DataError(source, f"world.seed must be a non-negative integer, got {self.seed}")
        base = [c.name for c in BASE_CLASSES]
        unknown = [n for n in self.unseen if n not in base]
        if unknown:
            extra = [n for n in unknown if n in CLASS_INDEX]
            why = f" ({extra}: extra things, never in the training split, so always unseen)" if extra else ""
            raise DataError(source, f"world.unseen names classes outside the base vocabulary {unknown}{why}; "
                                    f"known: {base}")
        _check_vocabulary(self.web_vocabulary, source, "world.web_vocabulary")
        for kind in ("thing", "stuff"):
            if all(c.name in self.unseen for c in BASE_CLASSES if c.kind == kind):
                raise DataError(source, f"world.unseen leaves no seen {kind} class to train on")
        if self.image_size < 32:
            raise DataError(source, f"world.image_size must be at least 32, got {self.image_size}")
        for name in ("web_images", "coco_images"):
            if getattr(self, name) < 1:
                raise DataError(source, f"world.{name} must be at least 1")
        if self.web_captions_per_image < 1:
            raise DataError(source, "world.web_captions_per_image must be at least 1")
        if self.captions_per_image < 3:
            raise DataError(source, f"world.captions_per_image must be at least 3 (COCO has 5), got "
                                    f"{self.captions_per_image}")
        if not 1 <= self.jpeg_quality <= 100:
            raise DataError(source, "world.jpeg_quality must be in 1..100")
        self.scene.validate(source, "world.scene")
        for name, es in self.eval_sets.items():
            if not name or "/" in name:
                raise DataError(source, f"world.eval_sets: bad set name {name!r}")
            es.validate(source, f"world.eval_sets.{name}")
            _check_vocabulary(es.vocabulary, source, f"world.eval_sets.{name}.vocabulary")
            if es.images < 1 or (es.image_size is not None and es.image_size < 32):
                raise DataError(source, f"world.eval_sets.{name}: images must be >= 1 and image_size >= 32")


def _fields(cls: type, d: Any, source: str | Path, where: str, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Check a mapping's keys and value types against a dataclass's fields (the default's type is the
    expected one); lists become tuples where the field is one."""
    if not isinstance(d, dict):
        raise DataError(source, f"{where} must be a mapping, got {type(d).__name__}")
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(defaults))
    if unknown:
        raise DataError(source, f"unknown key(s) {unknown} in {where}; known keys: {sorted(defaults)}")
    out = {}
    for k, v in d.items():
        if k in skip:
            continue
        default = defaults[k]
        if k == "unseen":
            if not isinstance(v, (list, tuple)) or not all(isinstance(n, str) for n in v):
                raise DataError(source, f"{where}.{k} must be a list of class names, got {v!r}")
            v = tuple(v)
        elif isinstance(default, tuple):  # an inclusive [min, max] range
            check = _is_int if isinstance(default[0], int) else _is_number
            if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(check(x) for x in v):
                kind = "integers" if check is _is_int else "numbers"
                raise DataError(source, f"{where}.{k} must be a [min, max] pair of {kind}, got {v!r}")
            v = tuple(v)
        elif k == "image_size" or isinstance(default, int):
            if not (_is_int(v) or (v is None and default is None)):
                raise DataError(source, f"{where}.{k} must be an integer, got {v!r}")
        elif isinstance(default, float) and not _is_number(v):
            raise DataError(source, f"{where}.{k} must be a number, got {v!r}")
        elif k == "stuff_weights" and v is not None and (
                not isinstance(v, dict) or not all(_is_number(w) for w in v.values())):
            raise DataError(source, f"{where}.{k} must map stuff names to numbers, got {v!r}")
        out[k] = v
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
