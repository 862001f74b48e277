"""Training: typed config, GradCache, atomic checkpoints, distributed helpers, the trainer."""
