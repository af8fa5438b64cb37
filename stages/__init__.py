"""One thin command line per DVC stage: parse, load config, call ``palm``, write atomically, log."""

from palm.core.quiet import quiet_known

# first, before a stage module imports megatron or MLflow: the known-benign third-party warnings
# (some fire at import time) stay out of the stage's output
quiet_known()
