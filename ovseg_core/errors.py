"""Errors that name the offending file and what is wrong with it."""
from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """Bad or missing input data: always names the file (or directory) and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class MissingWeightsError(Exception):
    """Pretrained weights that cannot be found offline; the message says what to provide."""
