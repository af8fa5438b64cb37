"""What a person runs: the ``palm`` command, chat, the feedback page, the MLflow UI link and the
served pyfunc model."""
