"""Training: typed configs, the torchrun-ready trainer, checkpoints and resume."""
