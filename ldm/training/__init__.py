"""Training with pytorch-lightning: the autoencoder (first stage) and latent diffusion.

Entry point: ``main.py`` (see docs/training.md).
"""
