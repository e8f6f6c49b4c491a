"""Data sets for training: the synthetic shapes of the demo model and image-caption folders."""
