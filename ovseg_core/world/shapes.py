"""Thing silhouettes as implicit functions of object-frame coordinates.

Each function takes float arrays u (right) and v (down), both in the object's own rotated frame,
and returns a boolean mask. Every shape lies inside the unit disc, so a rotated shape never leaves
its square box. Written by hand because no installed library rasterises filled shapes into numpy
masks with sub-pixel transforms (PIL's ImageDraw works in integer pixels on unrotated primitives).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

Mask = np.ndarray
ShapeFn = Callable[[np.ndarray, np.ndarray], Mask]


def _box(u: np.ndarray, v: np.ndarray, u0: float, u1: float, v0: float, v1: float) -> Mask:
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _disc(u: np.ndarray, v: np.ndarray, cu: float, cv: float, r: float) -> Mask:
    du, dv = u - cu, v - cv
    return du * du + dv * dv <= r * r


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, apothem: float, phase: float) -> Mask:
    """Regular polygon: inside all `sides` half-planes."""
    inside = np.ones(u.shape, bool)
    for k in range(sides):
        a = phase + 2 * math.pi * k / sides
        inside &= u * math.cos(a) + v * math.sin(a) <= apothem
    return inside


def circle(u, v):
    return _disc(u, v, 0, 0, 0.9)


def ring(u, v):
    r2 = u * u + v * v
    return (r2 <= 0.95**2) & (r2 >= 0.55**2)


def square(u, v):
    return _box(u, v, -0.68, 0.68, -0.68, 0.68)


def triangle(u, v):
    # apex up: half-plane normals point down, upper-right and upper-left
    return _polygon(u, v + 0.15, 3, 0.5, np.pi / 2)


def diamond(u, v):
    return np.abs(u) / 0.62 + np.abs(v) / 0.98 <= 1


def crescent(u, v):
    return _disc(u, v, 0, 0, 0.92) & ~_disc(u, v, 0.42, -0.18, 0.75)


def heart(u, v):
    x, y = u * (1 / 0.78), (v + 0.05) * (-1 / 0.78)
    x2, r = x * x, x * x + y * y - 1
    return r * r * r <= x2 * y * y * y


def chair(u, v):
    back = _box(u, v, -0.65, -0.38, -0.92, 0.3)
    seat = _box(u, v, -0.65, 0.65, 0.05, 0.3)
    legs = _box(u, v, -0.65, -0.42, 0.3, 0.72) | _box(u, v, 0.42, 0.65, 0.3, 0.72)
    return back | seat | legs


def chevron(u, v):
    # a flying bird: two swept wings meeting at the body
    return (np.abs(v + 0.2 - 0.6 * np.abs(u)) <= 0.22) & (np.abs(u) <= 0.92)


def bottle(u, v):
    body = _box(u, v, -0.38, 0.38, -0.1, 0.9)
    shoulder = u * u / 0.38**2 + (v + 0.1) ** 2 / 0.35**2 <= 1
    neck = _box(u, v, -0.14, 0.14, -0.9, -0.1)
    return body | shoulder | neck


def umbrella(u, v):
    dome = _disc(u, v, 0, 0.05, 0.92) & (v <= 0.05)
    stem = _box(u, v, -0.07, 0.07, 0.0, 0.78)
    hook = _disc(u, v, 0.17, 0.78, 0.24) & ~_disc(u, v, 0.17, 0.78, 0.1) & (v >= 0.78)
    return dome | stem | hook


def boat(u, v):
    hull = _box(u, v, -0.92, 0.92, 0.22, 0.6) & (np.abs(u) <= 0.92 - (v - 0.22) * 1.2)
    mast = _box(u, v, -0.05, 0.05, -0.85, 0.22)
    sail = (u >= 0.08) & (v <= 0.15) & (v >= -0.82) & (u <= 0.08 + (v + 0.82) * 0.75)
    return hull | mast | sail


def car(u, v):
    body = _box(u, v, -0.92, 0.92, -0.1, 0.35)
    cabin = _box(u, v, -0.5, 0.38, -0.5, -0.1) & (u <= 0.38 - (-0.1 - v) * 0.6)
    wheels = _disc(u, v, -0.52, 0.4, 0.24) | _disc(u, v, 0.52, 0.4, 0.24)
    return body | cabin | wheels


def cup(u, v):
    body = _box(u, v, -0.62, 0.28, -0.6, 0.65)
    handle = _disc(u, v, 0.3, 0.0, 0.42) & ~_disc(u, v, 0.3, 0.0, 0.22) & (u >= 0.28)
    return body | handle


def sign(u, v):
    panel = _box(u, v, -0.82, 0.82, -0.8, -0.05)
    post = _box(u, v, -0.09, 0.09, -0.05, 0.92)
    return panel | post


def cloud(u, v):
    return (_disc(u, v, -0.45, 0.15, 0.42) | _disc(u, v, 0.45, 0.15, 0.42) | _disc(u, v, 0.0, -0.2, 0.5)
            | _box(u, v, -0.45, 0.45, 0.0, 0.57))


# ---- the extra (wide-vocabulary) things' shapes

def fish(u, v):
    body = (u + 0.15) ** 2 / 0.62**2 + v * v / 0.4**2 <= 1
    tail = (u >= 0.38) & (u <= 0.92) & (np.abs(v) <= (u - 0.38) * 0.95)
    return body | tail


def tree(u, v):
    canopy = (v >= -0.9) & (v <= 0.38) & (np.abs(u) <= (v + 0.9) * 0.58)
    trunk = _box(u, v, -0.15, 0.15, 0.38, 0.9)
    return canopy | trunk


def house(u, v):
    body = _box(u, v, -0.55, 0.55, -0.05, 0.75)
    roof = (v <= -0.05) & (np.abs(u) <= (v + 0.78) * 1.0)
    return body | roof


def hat(u, v):
    return _box(u, v, -0.9, 0.9, 0.18, 0.38) | _box(u, v, -0.5, 0.5, -0.58, 0.18)


def lamp(u, v):
    shade = (v >= -0.85) & (v <= -0.2) & (np.abs(u) <= 0.3 + (v + 0.85) * 0.6)
    return shade | _box(u, v, -0.07, 0.07, -0.2, 0.6) | _box(u, v, -0.45, 0.45, 0.6, 0.8)


def key(u, v):
    head = _disc(u, v, -0.5, 0.0, 0.4) & ~_disc(u, v, -0.5, 0.0, 0.17)
    shaft = _box(u, v, -0.12, 0.9, -0.08, 0.08)
    teeth = _box(u, v, 0.5, 0.62, 0.08, 0.32) | _box(u, v, 0.75, 0.87, 0.08, 0.32)
    return head | shaft | teeth


def bell(u, v):
    dome = _disc(u, v, 0, -0.25, 0.5) & (v <= -0.25)
    body = (v >= -0.25) & (v <= 0.5) & (np.abs(u) <= 0.5 + (v + 0.25) * 0.4)
    return dome | body | _disc(u, v, 0, 0.68, 0.18)


def mushroom(u, v):
    cap = _disc(u, v, 0, 0.05, 0.88) & (v <= 0.05)
    return cap | _box(u, v, -0.26, 0.26, 0.05, 0.82)


SHAPES: dict[str, ShapeFn] = {
    f.__name__: f for f in (circle, ring, square, triangle, diamond, crescent, heart, chair, chevron, bottle,
                            umbrella, boat, car, cup, sign, cloud, fish, tree, house, hat, lamp, key, bell, mushroom)
}
