"""Live previews without the VAE: the toy's pixel space maps back exactly; a Wan VAE's map,
fitted on its own encodings of flat colours, brings a flat colour's latent back to it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from model.previews import LatentPreviewer, png_bytes
from model.tiny import build_tiny_components
from model.toy.components import PixelSpaceVAE


def normalised(vae, video: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return (vae.encode(video).latent_dist.mode().float() - mean) / std


def test_the_pixel_space_preview_is_the_frame_itself():
    vae = PixelSpaceVAE()
    frames = torch.rand(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    image = LatentPreviewer.for_vae(vae).image(normalised(vae, frames * 2 - 1))
    expected = (frames[0, :, 4].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1


class LinearVAE(torch.nn.Module):
    """A VAE whose encoder is a known linear map (8x8 average, then 3 -> 16 channels): the fit
    must find its exact inverse."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.mix = torch.nn.Parameter(torch.randn(16, 3, generator=generator))
        self.offset = torch.nn.Parameter(torch.randn(16, generator=generator))
        self.config = SimpleNamespace(latents_mean=[0.1] * 16, latents_std=[2.0] * 16,
                                      z_dim=16, scale_factor_spatial=8,
                                      scale_factor_temporal=4)  # fmt: skip

    def encode(self, video: torch.Tensor):
        frames = video[:, :, ::4]  # the temporal stride (colours are flat in time here)
        pooled = torch.nn.functional.avg_pool3d(frames, (1, 8, 8))
        latent = torch.einsum("oc,bcfhw->bofhw", self.mix, pooled) + self.offset.view(
            1, -1, 1, 1, 1
        )
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: latent))


def test_the_fit_inverts_a_linear_encoder():
    vae = LinearVAE()
    previewer = LatentPreviewer.for_vae(vae)
    colours = torch.rand(1, 3, 1, 6, 7, generator=torch.Generator().manual_seed(1))
    video = colours.repeat_interleave(8, 3).repeat_interleave(8, 4).expand(1, 3, 9, 48, 56)
    image = previewer.image(normalised(vae, video * 2 - 1))
    expected = (colours[0, :, 0].permute(1, 2, 0).numpy() * 255).round()
    assert image.shape == (6, 7, 3)
    assert np.abs(image.astype(float) - expected).max() <= 1


def test_a_wan_vae_gets_a_map_of_its_latent_width():
    vae = build_tiny_components(0)["vae"]
    previewer = LatentPreviewer.for_vae(vae)
    assert previewer.weight.shape == (3, vae.config.z_dim)
    assert torch.isfinite(previewer.weight).all() and torch.isfinite(previewer.bias).all()
    latents = torch.randn(1, vae.config.z_dim, 3, 8, 8)
    image = previewer.image(latents)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8


def test_previews_are_small_pngs():
    image = np.zeros((60, 104, 3), dtype=np.uint8)
    data = png_bytes(image)
    assert data.startswith(b"\x89PNG") and len(data) < 2000
