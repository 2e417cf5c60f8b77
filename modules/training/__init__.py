"""Training: the loop every training script runs, its checkpoints, EMA, stopping and sizing."""
