"""The bottom layer: configs, errors, atomic file writes, the tokenizer, process settings.
Imports nothing else of ``palm``."""
