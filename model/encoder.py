"""DiT-Mem memory encoder: reference clip latents -> memory tokens for the Wan DiT.

Two resamplers (a high-pass and a low-pass branch of two Conv3d + FFT-filter blocks, adaptive
pooling to ``num_tokens`` and a feature projection) turn each clip latent into tokens; one shared
self-attention then mixes the tokens of the retrieved clips within each band.

The forward is split in two public steps so the expensive part runs once per clip:

* :meth:`MemoryEncoder.resample` - one clip latent -> its distinct high/low tokens. In eval mode a
  clip's tokens depend on that clip only, so the memory bank computes them at ingest and caches
  them (a few KB per clip).
* :meth:`MemoryEncoder.mix` - the cached tokens of the k retrieved clips -> memory tokens. Cheap:
  it runs the shared attention on distinct tokens only.

``forward`` composes both and returns the reference's expanded ``(B, N*2*num_tokens, F)`` tensor.
Module and parameter names follow the official checkpoint so its state dict loads unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from model.errors import LatentShapeError
from model.tokens import ClipTokens, MemoryTokens, distinct_pool_windows

logger = logging.getLogger(__name__)

Band = Literal["high", "low"]

# The reference initialises the filters from the global RNG without a seed, so two runs of the
# released checkpoint (which carries no buffers) differ. We draw the same formula's noise from
# generators seeded with DEFAULT_FILTER_SEED + filter index, so the result is reproducible.
DEFAULT_FILTER_SEED = 0
FILTER_NOISE_STD = 0.05


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def initial_filter_weight(
    num_channels: int, grid: tuple[int, int, int], band: Band, generator: torch.Generator
) -> torch.Tensor:
    """The reference filter initialisation, ``(C, D, H, W//2+1, 2)`` float32 (real, imag).

    Gain rises (high-pass) or falls (low-pass) with the square root of a normalised frequency
    magnitude built on plain ``linspace`` grids, is spread per channel by a slope and an offset,
    then perturbed by small Gaussian noise.
    """
    depth, height, width = grid
    axes = [torch.linspace(0, 1, n) for n in (depth, height, width // 2 + 1)]
    mesh = torch.meshgrid(*axes, indexing="ij")
    magnitude = torch.sqrt(sum(axis**2 for axis in mesh)) / math.sqrt(3.0)
    base = 0.2 + 0.8 * magnitude.sqrt() if band == "high" else 1.2 - 0.8 * magnitude.sqrt()
    slopes = torch.linspace(0.7, 1.3, num_channels).view(-1, 1, 1, 1)
    offsets = torch.linspace(-0.05, 0.05, num_channels).view(-1, 1, 1, 1)
    real = (slopes * base + offsets).clamp(0.2, 1.2)
    weight = torch.stack([real, torch.zeros_like(real)], dim=-1)
    weight += FILTER_NOISE_STD * torch.randn(weight.shape, generator=generator)
    weight[..., 0].clamp_(0.05, 1.2)
    return weight


class FrequencyFilter3d(nn.Module):
    """Fixed (non-trained) per-channel filter in the 3-D Fourier domain, residual and BatchNorm.

    The filter is bound to one input grid: the reference silently re-draws it for any other
    shape, which would discard the loaded weights, so we reject other shapes instead.
    """

    def __init__(
        self,
        num_channels: int,
        grid: tuple[int, int, int],
        band: Band,
        dropout: float,
        seed: int,
    ) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.band = band
        self.seed = seed
        self.register_buffer("complex_weight", self._initial_weight(num_channels))
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.BatchNorm3d(num_channels)

    def _initial_weight(self, num_channels: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return initial_filter_weight(num_channels, self.grid, self.band, generator)

    def reset_buffers(self) -> None:
        """Initial filter weights (same seed) and default BatchNorm statistics."""
        with torch.no_grad():
            self.complex_weight.copy_(self._initial_weight(self.complex_weight.shape[0]))
        self.norm.reset_running_stats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> same shape."""
        if tuple(x.shape[2:]) != self.grid:
            raise LatentShapeError(
                f"frequency filter was built for a {self.grid} grid, got {tuple(x.shape[2:])}"
            )
        # FFTs in float32: half precision FFTs are unsupported on CPU and lossy on GPU.
        spectrum = torch.fft.rfftn(x.float(), dim=(2, 3, 4), norm="ortho")
        spectrum = spectrum * torch.view_as_complex(self.complex_weight.float().contiguous())
        filtered = torch.fft.irfftn(spectrum, s=self.grid, dim=(2, 3, 4), norm="ortho")
        return self.norm(self.dropout(filtered.to(x.dtype)) + x)


class ConvFilterBlock(nn.Module):
    """Conv3d -> frequency filter -> ReLU -> MaxPool3d."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        pool_kernel: tuple[int, int, int],
        filter_grid: tuple[int, int, int],
        band: Band,
        dropout: float,
        seed: int,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding)
        self.fft_filter = FrequencyFilter3d(out_channels, filter_grid, band, dropout, seed)
        # Never applied: the reference builds it and saves its parameters, so official
        # checkpoints carry it. Kept only so those checkpoints load strictly.
        self.bn = nn.BatchNorm3d(out_channels)
        self.pool = nn.MaxPool3d(pool_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.fft_filter(self.conv(x))))


class BandResampler(nn.Module):
    """One frequency band: clip latent ``(N, C, D, H, W)`` -> distinct tokens ``(N, U, F)``."""

    def __init__(
        self,
        band: Band,
        in_channels: int,
        latent_shape: tuple[int, int, int],
        conv_channels: tuple[int, int],
        conv1: tuple[int, int, int],
        conv2: tuple[int, int, int],
        pool_kernel: tuple[int, int, int],
        num_tokens: int,
        token_dim: int,
        dropout: float,
        seed: int,
    ) -> None:
        super().__init__()
        grid1 = tuple(conv_output_size(n, *conv1) for n in latent_shape)
        pooled1 = tuple(n // p for n, p in zip(grid1, pool_kernel, strict=True))
        grid2 = tuple(conv_output_size(n, *conv2) for n in pooled1)
        pooled2 = tuple(n // p for n, p in zip(grid2, pool_kernel, strict=True))
        if min(pooled2) < 1:
            raise ValueError(f"latent shape {latent_shape} is too small for this CNN")
        self.conv_block1 = ConvFilterBlock(
            in_channels, conv_channels[0], *conv1, pool_kernel, grid1, band, dropout, seed
        )
        self.conv_block2 = ConvFilterBlock(
            conv_channels[0], conv_channels[1], *conv2, pool_kernel, grid2, band, dropout, seed + 1
        )
        self.cnn_output_shape = pooled2
        depth, height, width = pooled2
        self.feature_proj = nn.Linear(conv_channels[1] * height * width, token_dim)
        self.num_tokens = num_tokens
        windows, counts = distinct_pool_windows(depth, num_tokens)
        # First output position of each distinct pooling window, in output order.
        first_positions = torch.tensor(counts).cumsum(0) - torch.tensor(counts)
        self.register_buffer("distinct_positions", first_positions, persistent=False)
        self.register_buffer("token_counts", torch.tensor(counts), persistent=False)

    def features(self, latents: torch.Tensor) -> torch.Tensor:
        """Pooled CNN features ``(N, num_tokens, C2*H'*W')`` (the reference's pre-projection)."""
        x = self.conv_block2(self.conv_block1(latents))
        n, channels, depth, height, width = x.shape
        # Flatten order (C, H', W') per temporal step, as the reference's feature_proj expects.
        x = x.permute(0, 2, 1, 3, 4).reshape(n, depth, channels * height * width)
        return F.adaptive_avg_pool1d(x.transpose(1, 2), self.num_tokens).transpose(1, 2)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """``(N, C, D, H, W)`` -> distinct tokens ``(N, U, F)``; multiplicities in token_counts."""
        pooled = self.features(latents)
        return self.feature_proj(pooled[:, self.distinct_positions])


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, normalised in float32 like the reference."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class TokenSelfAttention(nn.Module):
    """Multi-head self-attention with RMS-normed q/k and no positional encoding.

    Accepts a per-token logit bias, ``log(multiplicity)``, so a sequence of distinct tokens
    gives exactly the result of the sequence with every duplicate present.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, L, F)``, ``key_bias (L,)`` float -> ``(B, L, F)``."""
        batch, length, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

        q = heads(self.norm_q(self.q(x)))
        k = heads(self.norm_k(self.k(x)))
        v = heads(self.v(x))
        mask = None if key_bias is None else key_bias.to(q.dtype).view(1, 1, 1, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(batch, length, dim))


class MemoryEncoder(ModelMixin, ConfigMixin):
    """DiT-Mem memory encoder (see module docstring).

    Defaults are the released DiT-Mem-1.3B configuration: latent ``(16, 21, 60, 104)`` (81 frames
    at 832x480 through the Wan2.1 VAE), 100 tokens per clip and band, width 1536.

    Args:
        in_channels: Latent channels (Wan VAE: 16).
        num_tokens: Tokens per clip and band before de-duplication (reference ``target_seq_len``).
        token_dim: Token width; must equal the DiT width.
        latent_shape: The one ``(D, H, W)`` latent grid the frequency filters are built for.
        conv_channels: Output channels of the two conv blocks.
        conv1, conv2: ``(kernel, stride, padding)`` of the two Conv3d layers.
        pool_kernel: MaxPool3d kernel after each block.
        num_heads: Heads of the shared self-attention.
        fft_dropout: Dropout inside the filters (training only).
        filter_seed: Seed of the filter initialisation noise, used when a checkpoint carries
            no filter buffers (see ``model.loading``).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        num_tokens: int = 100,
        token_dim: int = 1536,
        latent_shape: tuple[int, int, int] = (21, 60, 104),
        conv_channels: tuple[int, int] = (512, 768),
        conv1: tuple[int, int, int] = (7, 4, 3),
        conv2: tuple[int, int, int] = (3, 1, 1),
        pool_kernel: tuple[int, int, int] = (2, 2, 2),
        num_heads: int = 8,
        fft_dropout: float = 0.5,
        filter_seed: int = DEFAULT_FILTER_SEED,
    ) -> None:
        super().__init__()
        common = dict(
            in_channels=in_channels,
            latent_shape=tuple(latent_shape),
            conv_channels=tuple(conv_channels),
            conv1=tuple(conv1),
            conv2=tuple(conv2),
            pool_kernel=tuple(pool_kernel),
            num_tokens=num_tokens,
            token_dim=token_dim,
            dropout=fft_dropout,
        )
        self.high_pass_module = BandResampler("high", seed=filter_seed, **common)
        self.low_pass_module = BandResampler("low", seed=filter_seed + 2, **common)
        self.self_attention = TokenSelfAttention(token_dim, num_heads)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """The canonical per-clip latent shape ``(C, D, H, W)`` this encoder accepts."""
        return (self.config.in_channels, *self.config.latent_shape)

    @property
    def token_counts(self) -> torch.Tensor:
        """``(U,)`` int64 multiplicity of each distinct per-clip token."""
        return self.high_pass_module.token_counts

    def check_latents(self, latents: torch.Tensor) -> None:
        if tuple(latents.shape[-4:]) != self.latent_shape:
            raise LatentShapeError(
                f"memory encoder expects clip latents of shape {self.latent_shape}, got "
                f"{tuple(latents.shape[-4:])}; re-encode the clip with this preset's "
                "clip preprocessing"
            )

    def resample(self, latents: torch.Tensor) -> ClipTokens:
        """Per-clip step: canonical latents ``(N, C, D, H, W)`` -> distinct tokens of N clips."""
        if latents.ndim != 5:
            raise LatentShapeError(f"expected (N, C, D, H, W) latents, got {tuple(latents.shape)}")
        self.check_latents(latents)
        latents = latents.to(self.dtype)
        return ClipTokens(
            self.high_pass_module(latents), self.low_pass_module(latents), self.token_counts
        )

    def mix(self, clips: ClipTokens | Sequence[ClipTokens]) -> MemoryTokens:
        """Request-time step: cached tokens of the retrieved clips -> memory tokens for the DiT.

        Args:
            clips: The N clips of one request, or a sequence of B such groups (same N each).

        Returns:
            ``MemoryTokens`` with ``tokens (B, 2*N*U, F)``: the high band of every
            clip (clip-major), then the low band, each band mixed by the shared self-attention
            on its own.
        """
        groups = [clips] if isinstance(clips, ClipTokens) else list(clips)
        if not groups or len({g.num_clips for g in groups}) != 1:
            raise ValueError("every request in a batch needs the same number of memory clips")
        counts = groups[0].counts
        num_clips = groups[0].num_clips
        # Bank tokens usually arrive on the CPU; the encoder may live on a GPU.
        high = torch.stack([g.high for g in groups]).flatten(1, 2).to(self.device, self.dtype)
        low = torch.stack([g.low for g in groups]).flatten(1, 2).to(self.device, self.dtype)
        band_counts = counts.repeat(num_clips)
        bias = band_counts.to(high.device, torch.float32).log()
        tokens = torch.cat([self.self_attention(high, bias), self.self_attention(low, bias)], dim=1)
        return MemoryTokens(tokens, band_counts.repeat(2))

    def encode(self, latents: torch.Tensor) -> MemoryTokens:
        """Both steps at once: ``(B, N, C, D, H, W)`` latents -> compact memory tokens."""
        if latents.ndim != 6:
            raise LatentShapeError(
                f"expected (B, N, C, D, H, W) latents, got {tuple(latents.shape)}"
            )
        self.check_latents(latents)
        batch, num_clips = latents.shape[:2]
        clips = self.resample(latents.flatten(0, 1))
        groups = [
            ClipTokens(
                clips.high[b * num_clips : (b + 1) * num_clips],
                clips.low[b * num_clips : (b + 1) * num_clips],
                clips.counts,
            )
            for b in range(batch)
        ]
        return self.mix(groups)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Reference-compatible output ``(B, N*2*num_tokens, F)``, duplicates expanded."""
        return self.encode(latents).expand()

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters the forward never touches (the reference's unapplied ``.bn`` modules).

        Training must freeze them: they get no gradient, which distributed data parallel
        would otherwise wait for forever.
        """
        return [
            p
            for module in self.modules()
            if isinstance(module, ConvFilterBlock)
            for p in module.bn.parameters()
        ]

    def reset_buffers(self) -> None:
        """Put every buffer back to its initial value, as a checkpoint without buffers expects.

        Filters are re-drawn from the formula with ``filter_seed``; BatchNorm statistics (used
        and unused ones) return to mean 0, variance 1.
        """
        for module in self.modules():
            if isinstance(module, FrequencyFilter3d):
                module.reset_buffers()
            elif isinstance(module, nn.BatchNorm3d):
                module.reset_running_stats()

    def fingerprint(self) -> str:
        """Short hash of every weight and buffer; keys cached bank tokens to these weights."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(
                tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            )
        return digest.hexdigest()[:16]
