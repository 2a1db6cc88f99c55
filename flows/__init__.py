"""Prefect layer: every DVC stage runs as a Prefect flow (`python -m flows.stage <name>`), a driver
flow wraps `dvc repro` (`python -m flows.pipeline`), and `python -m flows.server` runs the local UI.

Importing this package configures Prefect's environment (home directory, local server) before
Prefect itself is imported.
"""
from flows.env import configure

configure()
