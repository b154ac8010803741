"""``ditmem doctor``: what this host and configuration can run, checked one item at a time."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from service.settings import Settings


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_torch() -> list[Check]:
    import torch

    checks = [Check("torch", True, torch.__version__)]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        checks.append(Check("cuda", True, f"CUDA {torch.version.cuda}: {', '.join(names)}"))
    else:
        checks.append(Check("cuda", False, "no CUDA device visible (CPU only: tiny preset)"))
    return checks


def check_faiss() -> Check:
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    flavour = "faiss-gpu" if hasattr(faiss, "StandardGpuResources") else "faiss-cpu"
    return Check("faiss", True, f"{faiss.__version__} ({flavour}, {gpus} GPU(s) usable)")


def check_weights(settings: Settings) -> list[Check]:
    from model.errors import WeightsNotFound
    from model.loading import check_wan_folder

    if settings.preset == "tiny":
        return [Check("weights", True, "tiny preset: seeded random weights, nothing to load")]
    checks = []
    try:
        check_wan_folder(Path(settings.wan_path))
        checks.append(Check("wan weights", True, str(settings.wan_path)))
    except WeightsNotFound as error:
        checks.append(Check("wan weights", False, str(error)))
    dit_mem = Path(settings.dit_mem_path)
    if dit_mem.is_file() or (dit_mem / "config.json").is_file():
        size = dit_mem.stat().st_size if dit_mem.is_file() else 0
        detail = f"{dit_mem} ({size / 2**20:.0f} MiB)" if size else str(dit_mem)
        checks.append(Check("dit-mem checkpoint", True, detail))
    else:
        checks.append(Check("dit-mem checkpoint", False, f"{dit_mem} not found"))
    return checks


def check_redis(settings: Settings) -> Check:
    if not settings.redis_url:
        return Check("redis", True, "not configured: embedded mode (jobs run in the API process)")
    import redis

    try:
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3)
        client.ping()
        workers = client.zcard("ditmem:workers")
        return Check("redis", True, f"{settings.redis_url} reachable, {workers} worker(s) seen")
    except redis.RedisError as error:
        return Check("redis", False, f"{settings.redis_url}: {error}")


def check_storage(settings: Settings) -> list[Check]:
    checks = []
    for name in ("bank_dir", "results_dir", "uploads_dir"):
        path = Path(getattr(settings, name)).absolute()
        # Missing folders are created at start-up; what matters is the nearest existing one.
        target = next(p for p in (path, *path.parents) if p.exists())
        writable = target.is_dir() and _writable(target)
        state = "exists" if path.exists() else "will be created"
        detail = f"{path} ({state}, {'writable' if writable else 'NOT writable'})"
        checks.append(Check(name.replace("_", " "), writable, detail))
    return checks


def _writable(folder: Path) -> bool:
    probe = folder / ".ditmem-doctor"
    try:
        probe.write_text("")
        probe.unlink()
        return True
    except OSError:
        return False


def run_checks(settings: Settings) -> list[Check]:
    """Every check, in the order a user would fix things."""
    versions = ", ".join(
        f"{p} {_version(p)}" for p in ("diffusers", "transformers", "celery", "fastapi")
    )
    return [
        Check("preset", True, settings.preset),
        Check("packages", True, versions),
        *check_torch(),
        check_faiss(),
        *check_weights(settings),
        check_redis(settings),
        *check_storage(settings),
    ]
