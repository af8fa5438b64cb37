"""Evaluation of the trained models on held-out data, and the report."""
