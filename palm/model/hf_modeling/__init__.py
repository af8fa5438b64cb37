"""The transformers side of ``palm export hf``: a configuration and a modelling file in plain
PyTorch, copied as they are into every exported folder (transformers loads them with
``trust_remote_code=True``). They import transformers and torch only, never the project: the
folder must work without palm-rlhf installed. :mod:`palm.model.hf` writes and reads the folders."""
