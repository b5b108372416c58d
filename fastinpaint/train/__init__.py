"""Training machinery: checkpoints and, later, the training engine."""
