"""Training: config, loss, the loop, checkpoints and metrics."""
