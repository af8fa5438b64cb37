"""Prefect flows over the DVC stages (one task per stage, the same DVC cache as `dvc repro`)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project this package belongs to
