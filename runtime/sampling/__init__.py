"""Sampling in numpy, k-diffusion style: noise schedules (sigmas and timesteps), the samplers as
small pure loops over a denoiser, and torch-compatible random numbers."""
