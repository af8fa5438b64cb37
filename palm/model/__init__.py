"""The network and how it is split: PaLM (:mod:`~palm.model.network`), the reward model's scalar
head, the TP/PP plan and its collectives (:mod:`~palm.model.parallel`), megatron-core on CPU,
and loading exported weights. No decoding, no training."""
