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

import importlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.encoder import MemoryEncoder
from model.errors import CheckpointError, WeightsNotFound
from model.placement import Placement, check_placement, place_pipeline
from model.presets import Preset, get_preset

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

PIPELINE_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
PIPELINE_INDEX = "model_index.json"
# model_index.json names our own component classes by module path ("model.toy.components");
# diffusers resolves such names only from modules already imported, so we import those, and
# only those of this package.
OWN_PACKAGE = __name__.split(".")[0]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_pipeline_folder(path: Path, hint: str, kind: str = "pipeline") -> None:
    """Raise :class:`WeightsNotFound` naming the first part of a pipeline folder that is missing."""
    if not path.is_dir():
        raise WeightsNotFound(f"{kind} weights folder {path} does not exist; {hint}")
    for name in (PIPELINE_INDEX, *PIPELINE_SUBFOLDERS):
        if not (path / name).exists():
            raise WeightsNotFound(f"{path} has no {name}: not a {kind} folder; {hint}")


def component_dtypes(preset: Preset, device: torch.device) -> dict[str, torch.dtype]:
    """``from_pretrained``'s per-component ``dtype``: the preset's on a GPU, float32 elsewhere."""
    dtypes = {"default": torch.float32}
    if device.type == "cuda":
        dtypes |= {name: getattr(torch, dtype) for name, dtype in preset.gpu_dtypes.items()}
    return dtypes


def _import_own_components(index: dict) -> None:
    """Import the modules of this package that ``model_index.json`` names as libraries."""
    libraries = {v[0] for v in index.values() if isinstance(v, list) and isinstance(v[0], str)}
    for library in sorted(libraries):
        if library == OWN_PACKAGE or library.startswith(OWN_PACKAGE + "."):
            importlib.import_module(library)


def _encoder_config(folder: Path) -> dict | None:
    """The architecture of the folder's own memory encoder, for a bare checkpoint trained on it."""
    path = folder / "memory_encoder" / "config.json"
    if not path.is_file():
        return None
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _seeded_pipeline(preset: Preset, seed: int, dit_mem_path: str | Path | None):
    from model.pipeline import MemoryWanPipeline

    module, _, function = preset.seeded_components.partition(":")
    components = getattr(importlib.import_module(module), function)(seed)
    if dit_mem_path is not None:
        # An encoder trained on these components (a `ditmem train` output).
        components["memory_encoder"] = load_memory_encoder(dit_mem_path).eval()
    return MemoryWanPipeline(**components)


def _pretrained_pipeline(
    preset: Preset, folder: Path, dit_mem_path: str | Path | None, target: torch.device
):
    from model.pipeline import MemoryWanPipeline

    check_pipeline_folder(folder, preset.weights_hint, kind=f"{preset.name} pipeline")
    index = json.loads((folder / PIPELINE_INDEX).read_text())
    _import_own_components(index)
    dtypes = component_dtypes(preset, target)
    passed = {}
    if dit_mem_path is not None:
        # Passed explicitly, it replaces the folder's own encoder if there is one.
        passed["memory_encoder"] = load_memory_encoder(
            dit_mem_path,
            config=_encoder_config(folder),
            device=target,
            dtype=dtypes.get("memory_encoder", dtypes["default"]),
        )
    elif "memory_encoder" not in index:
        raise WeightsNotFound(
            f"preset {preset.name} needs a memory encoder and {folder} carries none: set "
            "DITMEM_DIT_MEM_PATH (DiT-Mem-1.3B.safetensors for Wan2.1)"
        )
    # The scheduler class the folder names, with the preset's flow shift.
    library, class_name = index["scheduler"]
    scheduler_class = getattr(importlib.import_module(library), class_name)
    passed["scheduler"] = scheduler_class.from_pretrained(
        folder, subfolder="scheduler", flow_shift=preset.flow_shift
    )
    return MemoryWanPipeline.from_pretrained(folder, dtype=dtypes, **passed)


def load_pipeline(
    preset_name: str,
    *,
    wan_path: str | Path | None = None,
    dit_mem_path: str | Path | None = None,
    device: str = "auto",
    placement: Placement | None = None,
    vae_tiling: bool = True,
    seed: int = 0,
):
    """Build a ready :class:`~model.pipeline.MemoryWanPipeline` for a preset.

    The preset says where its components come from (``model.presets.Preset``): ``tiny`` builds
    seeded random components and reads nothing (``dit_mem_path``: an encoder trained on them);
    every other preset loads a diffusers pipeline folder with
    ``MemoryWanPipeline.from_pretrained``: ``wan_path`` or the preset's default folder (``toy``:
    the shipped ``model/toy/weights``; ``wan2.1-t2v-1.3b`` has none, the Wan2.1 Diffusers folder
    must be given). ``dit_mem_path`` (the DiT-Mem checkpoint, or an encoder trained on the
    folder's transformer) replaces the folder's memory encoder and is required when the folder
    has none, as Wan2.1 folders do. On a GPU the preset picks each component's dtype (real: DiT
    and text encoder in bf16, VAE in float32); on the CPU everything is float32. ``placement``
    says how the weights are offloaded and quantised (``model.placement``); it is checked
    before any weight is read, so an impossible choice fails at once.
    """
    preset = get_preset(preset_name)
    target = resolve_device(device)
    placement = placement or Placement()
    check_placement(placement, target)
    if preset.seeded_components is not None:
        pipe = _seeded_pipeline(preset, seed, dit_mem_path)
    else:
        folder = wan_path if wan_path is not None else preset.weights_dir
        if folder is None:
            raise WeightsNotFound(
                f"preset {preset.name} needs local weights: set DITMEM_WAN_PATH to its pipeline "
                f"folder ({preset.weights_hint}) and DITMEM_DIT_MEM_PATH to the memory encoder "
                "checkpoint (DiT-Mem-1.3B.safetensors for Wan2.1)"
            )
        pipe = _pretrained_pipeline(preset, Path(folder), dit_mem_path, target)
    if vae_tiling:
        pipe.vae.enable_tiling()
    place_pipeline(pipe, placement, target)
    return pipe
