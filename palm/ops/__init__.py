"""Operations around the library: the stage runner, MLflow tracking, the model registry and
lineage. Imports only :mod:`palm.core` (no model, no training)."""
