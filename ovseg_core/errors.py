"""Errors that name the offending file and what is wrong with it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DataError(Exception):
    """Bad or missing input data: always names the file (or directory) and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class MissingWeightsError(Exception):
    """Pretrained weights that cannot be found offline; the message says what to provide."""


def read_text_file(path: str | Path, what: str) -> str:
    """A UTF-8 text file's contents, or DataError naming the file and saying what it was meant to be."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DataError(path, f"{what} is missing") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"{what} cannot be read as UTF-8 text: {e}") from e


def read_json_file(path: str | Path, what: str) -> Any:
    """A JSON file's contents, or DataError naming the file and saying what it was meant to be."""
    text = read_text_file(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"{what} is not valid JSON: {e}") from e
