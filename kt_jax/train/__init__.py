"""Training: state (trainable/frozen split), optimizer, SFT/DPO steps, loop with eval and orbax checkpoints."""
