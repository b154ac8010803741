"""``ditmem doctor``: what this host and configuration can run, checked one item at a time."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from runtime.settings import Settings, unknown_variables


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fatal: bool = True  # a failed non-fatal check is a warning: ditmem still runs


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_torch(settings: Settings) -> list[Check]:
    import torch

    checks = [Check("torch", True, torch.__version__)]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        checks.append(Check("cuda", True, f"CUDA {torch.version.cuda}: {', '.join(names)}"))
    else:
        # Only fatal for presets that need a GPU to be useful.
        fatal = settings.preset not in ("tiny", "toy")
        checks.append(Check("cuda", False, "no CUDA device visible (CPU only)", fatal=fatal))
    return checks


def check_placement(settings: Settings) -> Check:
    from model.errors import ModelError
    from model.loading import resolve_device
    from runtime.builders import check_placement_of

    try:
        check_placement_of(settings)
    except ModelError as error:
        return Check("offload/quantize", False, str(error))
    device = resolve_device(settings.device)
    return Check("offload/quantize", True, f"{settings.placement.label} on {device}")


def check_faiss() -> Check:
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    flavour = "faiss-gpu" if hasattr(faiss, "StandardGpuResources") else "faiss-cpu"
    return Check("faiss", True, f"{faiss.__version__} ({flavour}, {gpus} GPU(s) usable)")


def check_weights(settings: Settings) -> list[Check]:
    from model.errors import WeightsNotFound
    from model.loading import check_pipeline_folder
    from model.presets import get_preset

    preset = get_preset(settings.preset)
    if preset.seeded_components is not None:
        return [Check("weights", True, f"{preset.name} preset: seeded weights, nothing to load")]
    folder = settings.wan_path or preset.weights_dir
    checks = []
    if folder is None:
        checks.append(Check("weights", False, f"no pipeline folder: {preset.weights_hint}"))
    else:
        try:
            check_pipeline_folder(Path(folder), preset.weights_hint, kind=preset.name)
            checks.append(Check("weights", True, str(folder)))
        except WeightsNotFound as error:
            checks.append(Check("weights", False, str(error)))
    if settings.dit_mem_path is None:
        if preset.weights_dir is None:  # a folder the user brings carries no DiT-Mem encoder
            checks.append(Check("dit-mem checkpoint", False, "DITMEM_DIT_MEM_PATH is not set"))
        return checks
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


def check_database(settings: Settings) -> Check:
    if settings.database_url is None:
        return Check("manifest", True, f"SQLite file in {settings.bank_dir} (one host)")
    import sqlalchemy as sa

    from memory_bank.manifest import database_url

    url = database_url(Path(settings.bank_dir), settings.database_url)
    try:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            version = connection.execute(sa.text("SHOW server_version")).scalar()
        engine.dispose()
        return Check("manifest", True, f"PostgreSQL {version} at {url.render_as_string()}")
    except sa.exc.SQLAlchemyError as error:
        return Check("manifest", False, f"{url.render_as_string()}: {error.__cause__ or error}")


def check_object_storage(settings: Settings) -> Check:
    if settings.storage_url is None:
        return Check("object storage", True, "not configured: local folders (one host)")
    from memory_bank.errors import BankError
    from runtime.builders import open_storages

    try:
        results = open_storages(settings).results
        results.put_bytes("doctor-probe", b"ok")
        results.delete("doctor-probe")
        return Check("object storage", True, f"{results.describe()} writable")
    except (BankError, ValueError) as error:
        return Check("object storage", False, str(error))


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


def check_environment() -> list[Check]:
    problems = unknown_variables(os.environ)
    if not problems:
        return [Check("environment", True, "every DITMEM_* variable is a setting")]
    return [Check("environment", False, problem, fatal=False) for problem in problems]


def run_checks(settings: Settings) -> list[Check]:
    """Every check, in the order a user would fix things."""
    versions = ", ".join(
        f"{p} {_version(p)}" for p in ("diffusers", "transformers", "celery", "fastapi")
    )
    return [
        Check("preset", True, settings.preset),
        *check_environment(),
        Check("packages", True, versions),
        *check_torch(settings),
        check_placement(settings),
        check_faiss(),
        *check_weights(settings),
        check_redis(settings),
        check_database(settings),
        check_object_storage(settings),
        *check_storage(settings),
    ]
