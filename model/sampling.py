"""Sampling profiles: how a generation turns noise into a video.

``default`` runs the scheduler the pipeline folder names (Wan's UniPC with the preset's flow
shift) with diffusers' own noise. ``reference`` reproduces the sampling of the DiT-Mem reference
implementation, so its PhyGenBench and VBench runs can be repeated and compared:

* flow-matching Euler with shift 5 over ``linspace(1, 0, steps + 1)[:-1]`` (the final sigma 0 is
  a step of its own, not a point of the schedule), diffusers' ``FlowMatchEulerDiscreteScheduler``
  given those sigmas;
* the timestep as the reference's bf16 DiT sees it (``994.9`` becomes ``996.0``);
* noise from one CPU generator per seed, drawn in float32 and then cast to the transformer's
  dtype, and the Euler update done in the model output's dtype as the reference does;
* its scripts' defaults: 40 steps, guidance 5.0, Wan's Chinese negative prompt, memory in both
  branches of classifier-free guidance.

``tests/golden/sampler_golden.json`` holds the reference's own values for all of it.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteSchedulerOutput,
)

from model.profiles import REFERENCE_SHIFT


def reference_unshifted_sigmas(steps: int) -> torch.Tensor:
    """``steps`` evenly spaced sigmas from 1 towards 0, 0 itself left out (float32).

    ``torch.linspace`` rather than NumPy's: the two round differently, and the reference's
    values are torch's.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)[:-1]


def as_dit_timesteps(timesteps: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The timesteps as a DiT running in ``dtype`` receives them, back in float32."""
    return timesteps.to(dtype).to(torch.float32)


class ReferenceFlowMatchScheduler(FlowMatchEulerDiscreteScheduler):
    """diffusers' flow-matching Euler scheduler on the reference's schedule and arithmetic.

    Two things differ from the parent, both to match the reference bit for bit:

    * ``set_timesteps`` (what ``WanPipeline`` calls with the step count alone) hands the parent
      the reference's unshifted sigmas, which it shifts, and the timesteps rounded to bf16;
    * ``step`` adds the update in the model output's dtype (the reference's latents live in the
      pipeline dtype) instead of upcasting; in float32 both are the same Euler step.
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = REFERENCE_SHIFT) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, shift=shift)

    def set_timesteps(  # type: ignore[override]
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        if sigmas is None and timesteps is None and num_inference_steps is not None:
            unshifted = reference_unshifted_sigmas(num_inference_steps)
            shifted = self.shift * unshifted / (1 + (self.shift - 1) * unshifted)
            sigmas = unshifted.numpy()
            timesteps = as_dit_timesteps(shifted * self.config.num_train_timesteps).numpy()
        super().set_timesteps(
            num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps
        )

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        *args,
        return_dict: bool = True,
        **kwargs,
    ):
        if model_output.dtype == torch.float32 or args or kwargs:
            return super().step(
                model_output, timestep, sample, *args, return_dict=return_dict, **kwargs
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        sigma_next = self.sigmas[self.step_index + 1]
        # A low-precision tensor times a 0-d float32 tensor stays low precision: two roundings,
        # as in the reference, where diffusers would round once.
        prev_sample = sample.to(model_output.dtype) + model_output * (sigma_next - sigma)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


def reference_noise(
    shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The reference's initial latents: one CPU generator per seed, float32, then ``dtype``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
