"""AUTOMATIC1111's own samplers (the ones k-diffusion lacks), for the parity tests: its torch code
written out from stable-diffusion-webui 1.10, driven like k-diffusion's samplers
(tests/kdiffusion_reference.py: the model is A1111's CFGDenoiser over CompVisDenoiser, the noise
k-diffusion's ``torch.randn_like``, which A1111's TorchHijack points at the image generators)."""

from __future__ import annotations

from itertools import pairwise

import torch

from kdiffusion_reference import sampling


@torch.no_grad()
def restart_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0, restart_list=None):
    """modules/sd_samplers_extra.py ``restart_sampler`` (lines 7-74), unchanged but for the
    progress bar and the callback."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])

    def heun_step(x, old_sigma, new_sigma, second_order=True):
        denoised = model(x, old_sigma * s_in, **extra_args)
        d = sampling.to_d(x, old_sigma, denoised)
        dt = new_sigma - old_sigma
        if new_sigma == 0 or not second_order:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, new_sigma * s_in, **extra_args)
            d_2 = sampling.to_d(x_2, new_sigma, denoised_2)
            x = x + (d + d_2) / 2 * dt
        return x

    steps = sigmas.shape[0] - 1
    if restart_list is None:
        if steps >= 20:
            restart_steps = 9
            restart_times = 1
            if steps >= 36:
                restart_steps = steps // 4
                restart_times = 2
            sigmas = sampling.get_sigmas_karras(
                steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item(), device=sigmas.device
            )
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
        else:
            restart_list = {}

    restart_list = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}

    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            restart_steps, restart_times, restart_max = restart_list[i + 1]
            min_idx = i + 1
            max_idx = int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < min_idx:
                sigma_restart = sampling.get_sigmas_karras(
                    restart_steps, sigmas[min_idx].item(), sigmas[max_idx].item(), device=sigmas.device
                )[:-1]
                while restart_times > 0:
                    restart_times -= 1
                    step_list.extend(pairwise(sigma_restart))

    last_sigma = None
    for old_sigma, new_sigma in step_list:
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            x = x + sampling.torch.randn_like(x) * s_noise * (old_sigma**2 - last_sigma**2) ** 0.5
        x = heun_step(x, old_sigma, new_sigma)
        last_sigma = new_sigma
    return x
