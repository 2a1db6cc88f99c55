"""Progress reporting: tqdm on the terminal, plus hooks an orchestrator can register.

`ovseg_core` knows nothing of Prefect; the flows layer registers a hook that turns these calls into
Prefect progress artifacts. Hooks receive (description, done, total) and are throttled here.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
ProgressHook = Callable[[str, int, int], None]

_hooks: list[ProgressHook] = []


def add_hook(hook: ProgressHook) -> None:
    _hooks.append(hook)


def remove_hook(hook: ProgressHook) -> None:
    if hook in _hooks:
        _hooks.remove(hook)


def notify(desc: str, done: int, total: int) -> None:
    """Pass one progress report to the hooks (e.g. relayed from another process)."""
    for hook in list(_hooks):
        hook(desc, done, total)


class Progress:
    """A tqdm bar that also calls the registered hooks at most every `every_s` seconds (and at the end)."""

    def __init__(self, total: int, desc: str, every_s: float = 2.0):
        self.total = int(total)
        self.desc = desc
        self.done = 0
        self.every_s = every_s
        self._last = 0.0
        self._bar = tqdm(total=self.total, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        self._notify(force=True)

    def update(self, n: int = 1, **postfix: float) -> None:
        self.done += n
        self._bar.update(n)
        if postfix:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self._notify(force=self.done >= self.total)

    def _notify(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            self._last = now
            notify(self.desc, self.done, self.total)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """Iterate with progress (terminal + hooks)."""
    with Progress(total, desc) as p:
        for item in items:
            yield item
            p.update(1)
