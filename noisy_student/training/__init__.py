"""Training a teacher or a student: config, model state, the step, the loop, losses, optimizers, strategies."""
