"""Decoding: the KV cache, the fused decoder and its per-CPU plan, the weight layouts, the native
kernels and sampling. A change here reruns the stages that generate (ppo, evaluate), never
pretrain, sft or reward."""
