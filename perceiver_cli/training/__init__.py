"""Training machinery: optimizers and schedules, the Lightning trainer and its callbacks, run directories."""
