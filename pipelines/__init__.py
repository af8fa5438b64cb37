"""Prefect flows over the DVC stages (one task per stage, the same DVC cache as `dvc repro`)."""
