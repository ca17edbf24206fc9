"""Flow-matching maths of Wan (schedules, noising, x0/v/eps) and the teacher's Euler sampler."""

from asd_jax.diffusion.flow import (add_noise, eps_from_v, sigma, v_target, x0_from_v)
from asd_jax.diffusion.schedule import (few_step_schedule, ffe_schedules, shift_sigma,
                                        shifted_timesteps, validate_timesteps,
                                        warp_timesteps)

__all__ = ["add_noise", "eps_from_v", "sigma", "v_target", "x0_from_v", "few_step_schedule",
           "ffe_schedules", "shift_sigma", "shifted_timesteps", "validate_timesteps",
           "warp_timesteps"]
