"""Compact memory-token containers shared by the encoder, the bank and the injection.

The reference model pools each clip's CNN features to ``num_tokens`` positions with
``adaptive_avg_pool1d``. When the pooled axis is shorter than ``num_tokens`` (the canonical Wan
latent pools to a single temporal step), several output positions average the *same* window and
are therefore exactly equal. We keep each distinct token once together with its multiplicity.

Attention over a key repeated ``m`` times equals attention over that key once with ``log(m)``
added to its logit, so downstream attention can run on distinct tokens without changing results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def adaptive_pool_windows(length: int, num_outputs: int) -> list[tuple[int, int]]:
    """Windows ``[start, end)`` that ``adaptive_avg_pool1d`` averages for each output position."""
    return [
        ((i * length) // num_outputs, -((-(i + 1) * length) // num_outputs))
        for i in range(num_outputs)
    ]


def distinct_pool_windows(length: int, num_outputs: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Distinct pooling windows in output order, with how many output positions use each.

    Adaptive pooling windows are non-decreasing, so equal windows are always adjacent and the
    expanded sequence is ``repeat_interleave(distinct, counts)``.
    """
    windows: list[tuple[int, int]] = []
    counts: list[int] = []
    for window in adaptive_pool_windows(length, num_outputs):
        if windows and windows[-1] == window:
            counts[-1] += 1
        else:
            windows.append(window)
            counts.append(1)
    return windows, counts


@dataclass(frozen=True)
class ClipTokens:
    """Per-clip resampler output, what the memory bank caches for each clip.

    Attributes:
        high: ``(N, U, F)`` distinct high-pass tokens of N clips.
        low: ``(N, U, F)`` distinct low-pass tokens of N clips.
        counts: ``(U,)`` int64 multiplicity of each distinct token; sums to ``num_tokens``.
            Identical for every clip because it depends only on the (fixed) latent shape.
    """

    high: torch.Tensor
    low: torch.Tensor
    counts: torch.Tensor

    def __post_init__(self) -> None:
        if self.high.shape != self.low.shape or self.high.ndim != 3:
            raise ValueError(
                f"high and low must both be (N, U, F); got {tuple(self.high.shape)} "
                f"and {tuple(self.low.shape)}"
            )
        if self.counts.shape != (self.high.shape[1],):
            raise ValueError(
                f"counts must be ({self.high.shape[1]},), got {tuple(self.counts.shape)}"
            )

    @property
    def num_clips(self) -> int:
        return self.high.shape[0]

    def clip(self, index: int) -> ClipTokens:
        """Tokens of one clip, still shaped ``(1, U, F)``."""
        return ClipTokens(self.high[index : index + 1], self.low[index : index + 1], self.counts)

    @staticmethod
    def stack(clips: list[ClipTokens]) -> ClipTokens:
        """Concatenate clips (e.g. the k retrieved from the bank) along the clip axis."""
        if not clips:
            raise ValueError("need at least one clip")
        counts = clips[0].counts
        for other in clips[1:]:
            if not torch.equal(other.counts, counts):
                raise ValueError("clips were resampled with different token layouts")
        return ClipTokens(
            torch.cat([c.high for c in clips]), torch.cat([c.low for c in clips]), counts
        )

    def expand(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's ``(N, num_tokens, F)`` high and low tensors, duplicates included."""
        return (
            self.high.repeat_interleave(self.counts.to(self.high.device), dim=1),
            self.low.repeat_interleave(self.counts.to(self.low.device), dim=1),
        )


@dataclass(frozen=True)
class MemoryTokens:
    """Request-time memory for the DiT: distinct tokens and their multiplicities.

    Attributes:
        tokens: ``(B, M, F)`` distinct memory tokens (high band of every clip, then low band).
        counts: ``(M,)`` int64 multiplicity of each token in the reference's expanded sequence.
    """

    tokens: torch.Tensor
    counts: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3 or self.counts.shape != (self.tokens.shape[1],):
            raise ValueError(
                f"tokens must be (B, M, F) and counts (M,); got {tuple(self.tokens.shape)} "
                f"and {tuple(self.counts.shape)}"
            )
        if bool((self.counts < 1).any()):
            raise ValueError("every memory token needs a count of at least 1")

    @property
    def log_counts(self) -> torch.Tensor:
        """``(M,)`` float32 ``log(count)``, the logit bias that stands in for the duplicates."""
        return self.counts.to(torch.float32).log()

    @property
    def num_expanded(self) -> int:
        """Length of the reference's memory sequence (``N * 2 * num_tokens``)."""
        return int(self.counts.sum())

    def expand(self) -> torch.Tensor:
        """``(B, sum(counts), F)``: the reference's memory tensor, duplicates included."""
        return self.tokens.repeat_interleave(self.counts.to(self.tokens.device), dim=1)

    @classmethod
    def from_dense(cls, tokens: torch.Tensor) -> MemoryTokens:
        """Wrap an already expanded ``(B, M, F)`` memory tensor (each token counted once)."""
        counts = torch.ones(tokens.shape[1], dtype=torch.int64, device=tokens.device)
        return cls(tokens, counts)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        return MemoryTokens(self.tokens.to(device=device, dtype=dtype), self.counts.to(device))
