"""The only module that reads weights from disk.

Memory encoder checkpoints come in three layouts, all accepted by :func:`load_memory_encoder`:

1. The released ``DiT-Mem-1.3B.safetensors``: parameters only (keys ``pipe.dit_mem.<name>`` or
   ``dit_mem.<name>``, usually bf16), no buffers. BatchNorm statistics then keep their defaults
   (mean 0, var 1) and the frequency filters come from the initialisation formula with a fixed
   seed, which is what the reference does at inference, minus its unseeded randomness.
2. A full reference ``state_dict`` (118 keys): parameters and buffers, plus the duplicate
   ``cnn.0.*``/``cnn.1.*`` aliases of ``conv_block1.*``/``conv_block2.*``.
3. What this project writes (:func:`save_memory_encoder`): a diffusers model folder with every
   buffer.

Anything else missing, unexpected or of the wrong shape is a :class:`CheckpointError` naming keys.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.encoder import MemoryEncoder
from model.errors import CheckpointError, WeightsNotFound

logger = logging.getLogger(__name__)

OFFICIAL_PREFIXES = ("pipe.dit_mem.", "dit_mem.")
ALIAS_BLOCKS = {"cnn.0.": "conv_block1.", "cnn.1.": "conv_block2."}
ENCODER_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def _strip_prefix(key: str) -> str:
    for prefix in OFFICIAL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _canonical_alias(key: str) -> str | None:
    """``high_pass_module.cnn.0.conv.weight`` -> ``high_pass_module.conv_block1.conv.weight``."""
    for alias, canonical in ALIAS_BLOCKS.items():
        marker = f"_module.{alias}"
        if marker in key:
            return key.replace(marker, f"_module.{canonical}", 1)
    return None


def _list(keys: set[str] | list[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def normalize_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the official prefixes and fold the ``cnn.N`` alias keys into their canonical names.

    Raises:
        CheckpointError: an alias disagrees with its canonical tensor.
    """
    stripped = {_strip_prefix(key): value for key, value in state.items()}
    normalized: dict[str, torch.Tensor] = {}
    aliases: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in stripped.items():
        canonical = _canonical_alias(key)
        if canonical is None:
            normalized[key] = value
        else:
            aliases[canonical] = (key, value)
    for canonical, (alias, value) in aliases.items():
        if canonical not in normalized:
            normalized[canonical] = value
        elif not torch.equal(normalized[canonical], value):
            raise CheckpointError(f"alias key {alias} differs from {canonical}")
    return normalized


def load_encoder_state(encoder: MemoryEncoder, state: dict[str, torch.Tensor]) -> list[str]:
    """Load an official-format state dict into ``encoder`` (strict, with the rules above).

    Returns:
        Names of the buffers the checkpoint did not carry (kept at their defaults).

    Raises:
        CheckpointError: missing parameters, unknown keys, a partial set of buffers, or shapes
            that do not match the encoder's configuration.
    """
    state = normalize_official_state_dict(state)
    own = encoder.state_dict()
    parameter_names = {name for name, _ in encoder.named_parameters()}
    buffer_names = set(own) - parameter_names

    unexpected = set(state) - set(own)
    missing_parameters = parameter_names - set(state)
    missing_buffers = buffer_names - set(state)
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if missing_parameters:
        problems.append(f"missing parameters: {_list(missing_parameters)}")
    if missing_buffers and missing_buffers != buffer_names:
        problems.append(
            f"checkpoint carries some buffers but not: {_list(missing_buffers)} "
            "(expected all buffers or none)"
        )
    wrong_shapes = [
        f"{name} {tuple(value.shape)} != {tuple(own[name].shape)}"
        for name, value in state.items()
        if name in own and value.shape != own[name].shape
    ]
    if wrong_shapes:
        problems.append(
            "shape mismatch (is the encoder configured for this checkpoint?): "
            + _list(wrong_shapes, limit=6)
        )
    if problems:
        raise CheckpointError("memory encoder checkpoint does not fit: " + "; ".join(problems))

    if missing_buffers:
        encoder.reset_buffers()
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.to(own[name].dtype))
    if missing_buffers:
        logger.warning(
            "memory encoder checkpoint carries no buffers: BatchNorm statistics keep their "
            "defaults and frequency filters use the initialisation formula (filter_seed=%d)",
            encoder.config.filter_seed,
        )
    return sorted(missing_buffers)


def load_memory_encoder(
    path: str | Path,
    config: dict | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MemoryEncoder:
    """Build a memory encoder from a checkpoint file or a folder written by this project.

    Args:
        path: ``DiT-Mem-1.3B.safetensors`` (or any official-layout ``.safetensors``/``.pt``),
            or a folder with ``config.json`` + weights from :func:`save_memory_encoder`.
        config: Encoder configuration for a bare file; defaults to the released 1.3B config.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsNotFound(
            f"memory encoder weights not found at {path}; download DiT-Mem-1.3B.safetensors from "
            "the DiT-Mem release and pass its local path"
        )
    if path.is_dir():
        config_path = path / "config.json"
        weights_path = path / ENCODER_WEIGHTS_NAME
        if not config_path.exists() or not weights_path.exists():
            raise WeightsNotFound(f"{path} must contain config.json and {ENCODER_WEIGHTS_NAME}")
        encoder = MemoryEncoder.from_config(json.loads(config_path.read_text()))
        state = load_file(weights_path)
    else:
        encoder = MemoryEncoder(**(config or {}))
        state = (
            load_file(path)
            if path.suffix == ".safetensors"
            else torch.load(path, map_location="cpu", weights_only=True)
        )
    load_encoder_state(encoder, state)
    if dtype != encoder.dtype:
        encoder = encoder.to(dtype=dtype)
    return encoder.to(device=device).eval()


def save_memory_encoder(encoder: MemoryEncoder, folder: str | Path) -> Path:
    """Write ``config.json`` and every parameter and buffer (float32) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder.save_config(folder)
    state = {
        name: (t.float() if t.is_floating_point() else t).detach().cpu().contiguous()
        for name, t in encoder.state_dict().items()
    }
    save_file(state, folder / ENCODER_WEIGHTS_NAME)
    return folder


def official_state_dict(encoder: MemoryEncoder) -> dict[str, torch.Tensor]:
    """Parameters under ``pipe.dit_mem.`` names: the layout the official loader reads."""
    return {
        f"{OFFICIAL_PREFIXES[0]}{name}": param.detach().cpu().contiguous()
        for name, param in encoder.named_parameters()
    }


# -- whole pipelines ------------------------------------------------------------------------------

WAN_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
WAN_DOWNLOAD_HINT = (
    "download it with `huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers "
    "--local-dir <path>` and pass that path (DITMEM_WAN_PATH or --wan-path)"
)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_wan_folder(path: Path) -> None:
    """Raise :class:`WeightsNotFound` naming the first part of a Wan folder that is missing."""
    if not path.is_dir():
        raise WeightsNotFound(f"Wan2.1 weights folder {path} does not exist; {WAN_DOWNLOAD_HINT}")
    for name in ("model_index.json", *WAN_SUBFOLDERS):
        if not (path / name).exists():
            raise WeightsNotFound(
                f"{path} has no {name}: not a Wan2.1 Diffusers folder; {WAN_DOWNLOAD_HINT}"
            )


def load_pipeline(
    preset_name: str,
    *,
    wan_path: str | Path | None = None,
    dit_mem_path: str | Path | None = None,
    device: str = "auto",
    cpu_offload: bool = False,
    vae_tiling: bool = True,
    seed: int = 0,
):
    """Build a ready :class:`~model.pipeline.MemoryWanPipeline` for a preset.

    ``tiny`` builds seeded random components and reads nothing; ``toy`` loads the trained toy
    weights shipped in ``model/toy/weights``. ``wan2.1-t2v-1.3b`` reads the
    Wan2.1 Diffusers folder at ``wan_path`` (DiT and text encoder in bf16 on GPU, VAE in float32)
    and the DiT-Mem checkpoint at ``dit_mem_path``.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    from model.pipeline import MemoryWanPipeline
    from model.presets import get_preset
    from model.tiny import build_tiny_components

    preset = get_preset(preset_name)
    target = resolve_device(device)
    if preset.name == "tiny":
        components = build_tiny_components(seed)
        if dit_mem_path is not None:
            # An encoder trained on the tiny backbone (a `ditmem train` output).
            components["memory_encoder"] = load_memory_encoder(dit_mem_path).eval()
        return MemoryWanPipeline(**components).to(target)
    if preset.name == "toy":
        from model.toy.components import TOY_ENCODER_CONFIG, build_toy_components

        # wan_path: a toy weights folder (default: the shipped one); dit_mem_path: an encoder
        # trained on top of it (a `ditmem train` output) instead of the shipped encoder.
        components = build_toy_components(wan_path)
        if dit_mem_path is not None:
            components["memory_encoder"] = load_memory_encoder(
                dit_mem_path, config=TOY_ENCODER_CONFIG
            ).eval()
        return MemoryWanPipeline(**components).to(target)

    if wan_path is None or dit_mem_path is None:
        raise WeightsNotFound(
            f"preset {preset.name} needs local weights: set DITMEM_WAN_PATH (Wan2.1-T2V-1.3B-"
            "Diffusers folder) and DITMEM_DIT_MEM_PATH (DiT-Mem-1.3B.safetensors)"
        )
    wan_path = Path(wan_path)
    check_wan_folder(wan_path)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    transformer = WanTransformer3DModel.from_pretrained(
        wan_path, subfolder="transformer", torch_dtype=dtype
    )
    # The Wan VAE is numerically fragile in half precision; it runs once per video.
    vae = AutoencoderKLWan.from_pretrained(wan_path, subfolder="vae", torch_dtype=torch.float32)
    text_encoder = UMT5EncoderModel.from_pretrained(
        wan_path, subfolder="text_encoder", torch_dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(wan_path, subfolder="tokenizer")
    scheduler = UniPCMultistepScheduler.from_pretrained(
        wan_path, subfolder="scheduler", flow_shift=preset.flow_shift
    )
    memory_encoder = load_memory_encoder(dit_mem_path, device=target)
    pipe = MemoryWanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        memory_encoder=memory_encoder,
    )
    if vae_tiling:
        pipe.vae.enable_tiling()
    if cpu_offload and target.type == "cuda":
        pipe.enable_model_cpu_offload(device=target)
    else:
        pipe.to(target)
    return pipe
