"""Where a pipeline's weights live while it generates: offloading and quantisation.

Both are worker-level choices (``DITMEM_OFFLOAD``, ``DITMEM_QUANTIZE``), made once when the
pipeline is built, and both use maintained implementations: diffusers' model and group offload
hooks, torchao's weight quantisation.

* ``offload="model"``: one component at a time on the accelerator (diffusers'
  ``enable_model_cpu_offload``): the text encoder, then the transformer, then the VAE.
* ``offload="group"``: ``group_blocks`` transformer blocks at a time (diffusers' group offload,
  with CUDA streams to prefetch the next group when ``streams`` is on); every other component is
  offloaded the same way, whole when it has no block list.
* On a CPU-only worker there is no faster memory to offload from: both modes keep idle weights
  in files under ``offload_dir`` (diffusers' disk offload), which bounds the resident set.
* ``quantize``: the transformer blocks' linear layers get int8 or fp8 weights (torchao,
  weight-only); embeddings, norms and the output projection keep their dtype, and so does the
  memory encoder. The memory tokens go through the same quantised ``to_k``/``to_v`` as the video
  tokens, because the memory processor calls those modules rather than reading their weights.

The memory tokens follow the computation: the pipeline puts them on its execution device and
every block's processor moves them next to the block's activations, so an offloaded block finds
them where it runs.
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from model.errors import ModelError

if TYPE_CHECKING:
    import torch

    from model.pipeline import MemoryWanPipeline

OffloadMode = Literal["none", "model", "group"]
QuantizeMode = Literal["none", "int8", "fp8"]
FP8_MIN_CAPABILITY = (8, 9)  # fp8 matrix units: Ada Lovelace, Hopper and newer

# One group holding every block: "the whole component at a time" in group-offload terms.
_WHOLE_COMPONENT = 1 << 30


class UnsupportedPlacement(ModelError):
    """An offload or quantisation choice this worker cannot run (raised before any weight
    moves, so a worker fails at start instead of mid-job)."""


class Placement(BaseModel):
    """How a worker keeps its pipeline's weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    offload: OffloadMode = "none"
    group_blocks: int = Field(1, ge=1, le=64, description="group offload: blocks per group")
    streams: bool = Field(False, description="group offload: prefetch on a CUDA stream")
    offload_dir: Path | None = Field(
        None, description="CPU offload: where idle weights wait (default: the temp directory)"
    )
    quantize: QuantizeMode = "none"

    @property
    def label(self) -> str:
        """``group(2)+int8`` and the like, for logs and benchmark tables."""
        parts = []
        if self.offload != "none":
            parts.append(f"group({self.group_blocks})" if self.offload == "group" else "model")
        if self.quantize != "none":
            parts.append(self.quantize)
        return "+".join(parts) or "none"


def check_placement(placement: Placement, device: torch.device) -> None:
    """Raise :class:`UnsupportedPlacement` when ``placement`` cannot run on ``device``."""
    import torch

    if placement.streams and (placement.offload != "group" or device.type != "cuda"):
        raise UnsupportedPlacement(
            "offload streams prefetch the next group onto a CUDA device: they need "
            "DITMEM_OFFLOAD=group on a CUDA device"
        )
    if placement.quantize != "none" and importlib.util.find_spec("torchao") is None:
        raise UnsupportedPlacement(
            f"DITMEM_QUANTIZE={placement.quantize} needs torchao (pip install torchao)"
        )
    if placement.quantize == "fp8":
        if device.type != "cuda":
            raise UnsupportedPlacement(
                "fp8 weights need a CUDA GPU with fp8 units (compute capability 8.9 or newer); "
                "on a CPU use DITMEM_QUANTIZE=int8"
            )
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise UnsupportedPlacement(
                f"fp8 weights need compute capability 8.9 or newer, {device} has "
                f"{capability[0]}.{capability[1]}; use DITMEM_QUANTIZE=int8"
            )
    if placement.quantize != "none" and placement.offload != "none" and device.type == "cpu":
        # On a CPU, offloading writes the weights to files, and diffusers' disk offload
        # cannot serialise torchao's quantised tensors.
        raise UnsupportedPlacement(
            "on a CPU, offloading keeps weights in files, which quantised weights cannot be "
            "written to: choose DITMEM_OFFLOAD or DITMEM_QUANTIZE, not both"
        )


def quantize_transformer(transformer: torch.nn.Module, mode: QuantizeMode) -> None:
    """Quantise the weights of the transformer blocks' linear layers to ``mode`` in place."""
    if mode == "none":
        return
    import torch
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    config = Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()

    def in_a_block(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and name.startswith("blocks.")

    quantize_(transformer, config, filter_fn=in_a_block)
    return_freed_memory()


def return_freed_memory() -> None:
    """Give freed heap (the float weights quantisation replaced, say) back to the OS: glibc
    keeps freed blocks of this size for reuse, so without this a CPU worker's resident set would
    not shrink with its weights."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name is not None else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _offload_folder(placement: Placement) -> Path:
    """A fresh folder for this process's offloaded weights, removed at exit.

    Fresh because diffusers reuses a group's file when one of its name exists, whatever weights
    wrote it.
    """
    parent = placement.offload_dir
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="ditmem-offload-", dir=parent))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _group_offload(
    pipe: MemoryWanPipeline, placement: Placement, device: torch.device, blocks: int
) -> None:
    import torch
    from diffusers.hooks import apply_group_offloading

    on_cpu = device.type == "cpu"
    folder = _offload_folder(placement) if on_cpu else None
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module) or next(component.parameters(), None) is None:
            continue
        if name == "memory_encoder":  # a handful of tokens per request: it stays put
            component.to(device)
            continue
        apply_group_offloading(
            component,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=blocks,
            use_stream=placement.streams,
            # One subfolder per component: group names repeat across components.
            offload_to_disk_path=None if folder is None else str(folder / name),
        )


def place_pipeline(pipe: MemoryWanPipeline, placement: Placement, device: torch.device) -> None:
    """Quantise and offload ``pipe`` as ``placement`` says, onto ``device``."""
    check_placement(placement, device)
    if placement.offload == "model" and device.type == "cuda":
        quantize_transformer(pipe.transformer, placement.quantize)
        pipe.enable_model_cpu_offload(device=device)
        return
    if placement.offload == "none":
        pipe.to(device)  # quantise where the weights will run
        quantize_transformer(pipe.transformer, placement.quantize)
        return
    quantize_transformer(pipe.transformer, placement.quantize)
    blocks = placement.group_blocks if placement.offload == "group" else _WHOLE_COMPONENT
    _group_offload(pipe, placement, device, blocks)
