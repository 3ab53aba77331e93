"""Training: the outer optimiser and schedule, checkpoints, and the training run itself."""
