from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_defaults_run_the_tiny_preset_without_weights(monkeypatch: pytest.MonkeyPatch):
    for name in ("DITMEM_PRESET", "DITMEM_WAN_PATH", "DITMEM_DIT_MEM_PATH"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    assert settings.preset == "tiny"
    assert settings.wan_path is None


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
