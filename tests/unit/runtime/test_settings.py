from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from runtime.settings import Settings, unknown_variables


def test_defaults_serve_the_trained_toy_preset_without_weight_paths(
    monkeypatch: pytest.MonkeyPatch,
):
    for name in ("DITMEM_PRESET", "DITMEM_WAN_PATH", "DITMEM_DIT_MEM_PATH"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    assert settings.preset == "toy"
    assert settings.wan_path is None


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [("DITMEM_PRESETT", "DITMEM_PRESET"), ("DITMEM_DATA_DIR", "DITMEM_BANK_DIR")],
)
def test_a_variable_no_setting_reads_is_a_warning_naming_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, variable, suggestion
):
    monkeypatch.setenv(variable, "x")
    assert unknown_variables(os.environ) == [
        f"environment variable {variable} is not a ditmem setting; did you mean {suggestion}?"
    ]
    with caplog.at_level(logging.WARNING, logger="runtime.settings"):
        Settings(_env_file=None)
    assert any(variable in r.getMessage() and suggestion in r.getMessage() for r in caplog.records)


def test_settings_and_deployment_variables_are_not_reported():
    environ = {
        "DITMEM_PRESET": "toy", "DITMEM_JOB_LEASE_S": "5", "DITMEM_WEIGHTS_DIR": "/w",
        "DITMEM_ZZZZZZZZ": "1", "HOME": "/root",
    }  # fmt: skip
    assert unknown_variables(environ) == [
        "environment variable DITMEM_ZZZZZZZZ is not a ditmem setting"
    ]


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("DITMEM_PRESET", "wan2.1-t2v-1.3b")
    monkeypatch.setenv("DITMEM_WAN_PATH", str(tmp_path))
    monkeypatch.setenv("DITMEM_DIT_MEM_PATH", str(tmp_path / "DiT-Mem-1.3B.safetensors"))
    monkeypatch.setenv("DITMEM_VAE_TILING", "false")
    settings = Settings(_env_file=None)
    assert settings.preset == "wan2.1-t2v-1.3b"
    assert settings.wan_path == tmp_path
    assert settings.vae_tiling is False


def test_real_preset_without_weight_paths_is_rejected(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DITMEM_WAN_PATH", raising=False)
    monkeypatch.delenv("DITMEM_DIT_MEM_PATH", raising=False)
    with pytest.raises(ValidationError, match="DITMEM_WAN_PATH"):
        Settings(_env_file=None, preset="wan2.1-t2v-1.3b")


def test_unknown_preset_is_rejected():
    with pytest.raises(ValidationError):
        Settings(_env_file=None, preset="huge")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("storage_url", "ftp://bucket/x", "expected s3://bucket"),
        ("storage_url", "s3://", "expected s3://bucket"),
        ("database_url", "mysql://user@host/db", "unsupported manifest database 'mysql'"),
        ("database_url", "not a url", "is not a database URL"),
    ],
)
def test_an_unusable_storage_or_database_url_is_refused_with_its_reason(field, value, message):
    with pytest.raises(ValidationError, match=message):
        Settings(_env_file=None, **{field: value})


def test_bucket_and_postgresql_urls_are_accepted():
    settings = Settings(
        _env_file=None, storage_url="s3://ditmem/prod",
        database_url="postgresql://ditmem@db.internal:5432/ditmem",
    )  # fmt: skip
    assert settings.storage_url == "s3://ditmem/prod"


def test_two_keys_of_one_name_or_one_secret_are_refused():
    from runtime.keys import hash_key

    def key(name: str, secret: str) -> dict:
        return {"name": name, "sha256": hash_key(secret), "scopes": ["read"]}

    ok = Settings(_env_file=None, auth="keys", api_keys=[key("alice", "a"), key("bob", "b")])
    assert [k.name for k in ok.api_keys] == ["alice", "bob"]
    with pytest.raises(ValidationError, match="share the name alice"):
        Settings(_env_file=None, auth="keys", api_keys=[key("alice", "a"), key("alice", "b")])
    with pytest.raises(ValidationError, match="share the secret"):
        Settings(_env_file=None, auth="keys", api_keys=[key("alice", "a"), key("bob", "a")])
