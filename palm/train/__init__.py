"""Training: the engine, the training loop and checkpoints, and each stage's objective (pretrain, SFT,
reward, PPO and its kin, DPO), launched as megatron-core workers."""
