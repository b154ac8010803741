"""Pipeline components of the ``toy`` preset: the real classes at toy size, trained weights.

The world is 16x16 pixels, small enough for the diffusion transformer to work on pixels
directly, so the "VAE" is :class:`PixelSpaceVAE`: an exact, parameter-free stand-in with the
``AutoencoderKLWan`` interface the pipeline and the memory bank use. Everything else is what
the real preset runs: ``WanTransformer3DModel``, our memory encoder and injection, and
``MemoryWanPipeline``.

Shipped weights live in ``model/toy/weights/``, a diffusers pipeline folder that
``MemoryWanPipeline.from_pretrained`` loads like any Wan2.1 folder (see its ``README.md`` for the
files and how they were made).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from transformers import UMT5Config, UMT5EncoderModel

from model.encoder import MemoryEncoder
from model.errors import WeightsNotFound
from model.injection import transformer_width
from model.tiny import offline_tokenizer
from model.toy.world import FRAMES, SIZE

WEIGHTS_DIR = Path(__file__).parent / "weights"
# The subfolders of a toy weights folder that hold trained (or frozen random) tensors. A full
# folder also has model_index.json, tokenizer/, scheduler/ and vae/ (write_pipeline_files).
TRANSFORMER_DIR = "transformer"
TEXT_ENCODER_DIR = "text_encoder"
ENCODER_DIR = "memory_encoder"
TRANSFORMER_FILE = f"{TRANSFORMER_DIR}/diffusion_pytorch_model.safetensors"
TRANSFORMER_CONFIG_FILE = f"{TRANSFORMER_DIR}/config.json"
TEXT_ENCODER_FILE = f"{TEXT_ENCODER_DIR}/model.safetensors"

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
        self.use_tiling = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **_):
        """Build from ``config.json`` alone: there are no weights to read.

        Pipeline loading passes dtype, device map and such; a parameter-free module ignores them.
        """
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        return cls.from_config(config)

    def enable_tiling(self, *args: Any, **kwargs: Any) -> None:
        """Accepted for the ``AutoencoderKLWan`` interface; the identity has nothing to tile."""
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

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


def save_text_encoder(text_encoder: UMT5EncoderModel, folder: str | Path) -> Path:
    """The frozen text encoder as a transformers model folder, in float16 (half the size).

    Round the weights through float16 first (the backbone does) and loading it back in float32
    gives the very same tensors.
    """
    copy.deepcopy(text_encoder).half().save_pretrained(folder)
    return Path(folder)


def write_pipeline_files(pipe: Any, folder: str | Path) -> Path:
    """``model_index.json`` and the parts that are code, not training: tokenizer/, scheduler/, vae/.

    With transformer/, text_encoder/ (the backbone's) and memory_encoder/ next to them, the
    folder is what :meth:`MemoryWanPipeline.from_pretrained` loads. ``model_index.json`` names
    our own classes by module path (``model.toy.components``, ``model.encoder``); diffusers
    resolves such names only from modules already imported, which ``model.loading`` sees to.
    """
    folder = Path(folder)
    pipe.save_config(folder)
    # Without the truncation and padding state the last call left behind (every pipeline call
    # sets its own), so the file does not depend on what was tokenized before.
    tokenizer = copy.deepcopy(pipe.tokenizer)
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.save_pretrained(folder / "tokenizer")
    pipe.scheduler.save_pretrained(folder / "scheduler")
    pipe.vae.save_pretrained(folder / "vae")
    return folder


def _require(path: Path) -> None:
    if not path.is_file():
        raise WeightsNotFound(
            f"toy weights {path} are missing; they ship with the package "
            "(recreate them with `ditmem toy train`)"
        )


def build_toy_components(
    weights_dir: str | Path | None = None, *, memory_encoder: bool = True
) -> dict[str, Any]:
    """Pipeline components with the trained toy weights from ``weights_dir``, built by hand.

    Only the trained parts are read (``transformer/``, ``text_encoder/``, ``memory_encoder/``,
    each by its own class); tokenizer, VAE and scheduler are made in code, so this also works on
    a backbone run directory. Serving loads the whole folder with
    ``MemoryWanPipeline.from_pretrained`` instead (``model.loading.load_pipeline``); both give
    the same components.

    Without ``memory_encoder`` (a backbone still being trained) the encoder is freshly
    initialised.
    """
    from model.loading import load_memory_encoder

    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    _require(folder / TRANSFORMER_FILE)
    _require(folder / TRANSFORMER_CONFIG_FILE)
    transformer = WanTransformer3DModel.from_pretrained(
        folder / TRANSFORMER_DIR, dtype=torch.float32
    )
    _require(folder / TEXT_ENCODER_FILE)
    text_encoder = UMT5EncoderModel.from_pretrained(folder / TEXT_ENCODER_DIR, dtype=torch.float32)
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
