"""Live previews: the latent being denoised shown as a small RGB image, without the VAE.

A fixed affine map per latent space turns a latent pixel (its channels) into an RGB pixel:

* pixel space (the toy preset's VAE stores pixels): the exact inverse of the latent
  normalisation, the identity on the pixels;
* a real VAE (Wan's): fitted once by least squares on the VAE's own encodings of flat colours.
  A flat colour's latent is, away from the borders, one vector per colour; 27 colours give a
  map good enough to see composition and motion emerge, at the cost of one small matmul.

The middle latent frame is shown at latent resolution (Wan: 1/8 of the video's size); the client
enlarges it.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import torch
from PIL import Image

FIT_SIZE = 32  # pixels of each flat-colour clip encoded for the fit
# Frames of each clip: the first latent frame of Wan's causal VAE encodes one frame, the others
# four, with other statistics; previews show a middle frame, so the fit reads the last one.
FIT_FRAMES = 5
FIT_LEVELS = (0.0, 0.5, 1.0)  # per channel: 27 colours


class LatentPreviewer:
    """``image(latents)``: the middle frame of ``(B, C, F, H, W)`` latents as ``(H, W, 3)``
    uint8, through ``rgb = weight @ latent + bias`` (``rgb`` in [0, 1])."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight = weight.float()  # (3, C)
        self.bias = bias.float()  # (3,)
        self._weight = self.weight.numpy()
        self._bias = self.bias.numpy()[:, None, None]

    @classmethod
    def for_vae(cls, vae: torch.nn.Module) -> LatentPreviewer:
        config = vae.config
        mean = torch.tensor(config.latents_mean, dtype=torch.float32)
        std = torch.tensor(config.latents_std, dtype=torch.float32)
        pixel_space = (
            getattr(config, "scale_factor_spatial", 8) == 1
            and getattr(config, "scale_factor_temporal", 4) == 1
            and len(mean) == 3
        )
        if pixel_space:  # latent = (pixel - mean) / std, pixel in [-1, 1]
            return cls(torch.diag(std / 2), (mean + 1) / 2)
        return cls(*_fit(vae, mean, std))

    @torch.no_grad()
    def image(self, latents: torch.Tensor) -> np.ndarray:
        # NumPy, not torch, on the CPU: a thread that runs torch ops starts a thread pool of its
        # own beside the denoising loop's, and on a small machine the two fight for the cores.
        frame = latents[0, :, latents.shape[2] // 2].detach().float().cpu().numpy()  # (C, H, W)
        rgb = np.tensordot(self._weight, frame, axes=(1, 0)) + self._bias  # (3, H, W)
        return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0).copy()


@torch.no_grad()
def _fit(
    vae: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    colours = torch.tensor(list(itertools.product(FIT_LEVELS, repeat=3)), dtype=torch.float32)
    parameter = next(vae.parameters())
    images = (colours * 2 - 1).view(-1, 3, 1, 1, 1).expand(-1, 3, 1, FIT_SIZE, FIT_SIZE)
    latents = []
    for image in images:  # one at a time: the encoder's activations, not the batch, bound memory
        clip = image.unsqueeze(0).to(device=parameter.device, dtype=parameter.dtype)
        latent = vae.encode(clip).latent_dist.mode().float().cpu()[0]  # (C, 1, h, w)
        centre = latent[:, :, 1:-1, 1:-1] if latent.shape[-1] > 2 else latent
        latents.append((centre.mean(dim=(1, 2, 3)) - mean) / std)
    features = torch.cat([torch.stack(latents), torch.ones(len(latents), 1)], dim=1)
    solution = torch.linalg.lstsq(features.double(), colours.double()).solution.float()
    return solution[:-1].T.contiguous(), solution[-1]


def png_bytes(image: np.ndarray) -> bytes:
    """A small PNG, compressed lightly: a preview is written every few steps."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
