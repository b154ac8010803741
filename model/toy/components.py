"""Pipeline components of the ``toy`` preset: the real classes at toy size, trained weights.

The world is 16x16 pixels, small enough for the diffusion transformer to work on pixels
directly, so the "VAE" is :class:`PixelSpaceVAE`: an exact, parameter-free stand-in with the
``AutoencoderKLWan`` interface the pipeline and the memory bank use. Everything else is what
the real preset runs: ``WanTransformer3DModel``, our memory encoder and injection, and
``MemoryWanPipeline``.

Shipped weights live in ``model/toy/weights/`` (see its ``README.md`` for how they were made).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file
from transformers import UMT5Config, UMT5EncoderModel

from model.encoder import MemoryEncoder
from model.errors import WeightsNotFound
from model.injection import transformer_width
from model.tiny import offline_tokenizer
from model.toy.world import FRAMES, SIZE

WEIGHTS_DIR = Path(__file__).parent / "weights"
TRANSFORMER_FILE = "transformer.safetensors"
TRANSFORMER_CONFIG_FILE = "transformer_config.json"
TEXT_ENCODER_FILE = "text_encoder.safetensors"
ENCODER_DIR = "memory_encoder"

MAX_SEQUENCE_LENGTH = 12

# A token holds all 8 frames of a 2x2 pixel patch: where the ball is in each frame is then
# plain channel layout, so the transformer renders a motion as one coherent whole. With one
# token per frame (patch (1, 4, 4)) it learned the ball's look quickly but not its dynamics.
TOY_DIT_CONFIG: dict[str, Any] = dict(
    patch_size=(FRAMES, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=3,
    out_channels=3,
    text_dim=32,
    freq_dim=64,
    ffn_dim=512,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=32,
)

TOY_TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    d_model=32,
    d_kv=16,
    d_ff=64,
    num_layers=2,
    num_heads=2,
    relative_attention_num_buckets=8,
)

# Latent = pixels: (3, 8, 16, 16). Spatial-only pooling keeps all 8 time steps, and one token per
# frame carries where the ball is in that frame, which is what the motion is made of.
TOY_ENCODER_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    num_tokens=FRAMES,
    token_dim=TOY_DIT_CONFIG["num_attention_heads"] * TOY_DIT_CONFIG["attention_head_dim"],
    latent_shape=(FRAMES, SIZE, SIZE),
    conv_channels=(16, 32),
    conv1=(3, 1, 1),
    conv2=(3, 1, 1),
    pool_kernel=(1, 2, 2),
    num_heads=4,
    fft_dropout=0.1,
)


class PixelSpaceVAE(ModelMixin, ConfigMixin):
    """Identity autoencoder with the ``AutoencoderKLWan`` interface (no compression).

    Latents are the pixels shifted so that the black background is 0 and scaled so that the
    ball stands out of the noise (a lit channel is 4): ``latent = (pixel - latents_mean) /
    latents_std``, as the pipeline expects to undo. The ball covers a few percent of the
    pixels, so at the unit scale the high-noise steps, where motion is decided, barely saw it.
    """

    @register_to_config
    def __init__(
        self,
        z_dim: int = 3,
        latents_mean: tuple[float, ...] = (-1.0, -1.0, -1.0),
        latents_std: tuple[float, ...] = (0.5, 0.5, 0.5),
        scale_factor_temporal: int = 1,
        scale_factor_spatial: int = 1,
    ) -> None:
        super().__init__()
        # Only so the pipeline can read a device and a dtype off this module.
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        # Wan's VAE returns unnormalised latents; the caller normalises with latents_mean/std.
        posterior = DiagonalGaussianDistribution(
            torch.cat([x, torch.full_like(x, -30.0)], dim=1), deterministic=True
        )
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        return DecoderOutput(sample=z) if return_dict else (z,)


def pixels_to_latents(videos: torch.Tensor, vae: PixelSpaceVAE) -> torch.Tensor:
    """``(N, 3, F, H, W)`` pixels in [-1, 1] -> the normalised latents the transformer denoises."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return (videos - mean) / std


def toy_scheduler() -> UniPCMultistepScheduler:
    from model.presets import TOY

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=TOY.flow_shift,
    )


def new_transformer(seed: int = 0, **overrides: Any) -> WanTransformer3DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**(TOY_DIT_CONFIG | overrides))


def _transformer_config(folder: Path) -> dict[str, Any]:
    """The architecture recorded with the weights (defaults for anything not recorded)."""
    path = folder / TRANSFORMER_CONFIG_FILE
    if not path.is_file():
        return {}
    recorded = json.loads(path.read_text())
    return {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in recorded.items()
        if k in TOY_DIT_CONFIG
    }


def new_text_encoder(seed: int = 0) -> UMT5EncoderModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UMT5EncoderModel(
            UMT5Config(vocab_size=offline_tokenizer().vocab_size, **TOY_TEXT_ENCODER_CONFIG)
        )


def new_memory_encoder(seed: int = 0, **overrides: Any) -> MemoryEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MemoryEncoder(**(TOY_ENCODER_CONFIG | overrides), filter_seed=seed)


def _load_into(module: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise WeightsNotFound(
            f"toy weights {path} are missing; they ship with the package "
            "(recreate them with `ditmem toy train`)"
        )
    state = {k: v.float() for k, v in load_file(path).items()}
    module.load_state_dict(state, strict=True)


def build_toy_components(
    weights_dir: str | Path | None = None, *, memory_encoder: bool = True
) -> dict[str, Any]:
    """Pipeline components with the trained toy weights from ``weights_dir``.

    Without ``memory_encoder`` (a backbone still being trained) the encoder is freshly
    initialised.
    """
    from model.loading import load_memory_encoder

    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    transformer = new_transformer(**_transformer_config(folder))
    _load_into(transformer, folder / TRANSFORMER_FILE)
    text_encoder = new_text_encoder()
    _load_into(text_encoder, folder / TEXT_ENCODER_FILE)
    encoder = (
        load_memory_encoder(folder / ENCODER_DIR)
        if memory_encoder
        else new_memory_encoder(token_dim=transformer_width(transformer))
    )
    tokenizer = offline_tokenizer()
    tokenizer.model_max_length = MAX_SEQUENCE_LENGTH
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=PixelSpaceVAE().eval(),
        scheduler=toy_scheduler(),
        transformer=transformer.eval(),
        memory_encoder=encoder.eval(),
    )
