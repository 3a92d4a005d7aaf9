"""Inputs that latent diffusion models are conditioned on besides text: depth maps, label maps, layouts, low-resolution images."""
