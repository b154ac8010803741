from __future__ import annotations

from typer.testing import CliRunner

from ditmem.cli import app


def test_doctor_reports_each_check_and_passes_on_the_tiny_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("DITMEM_BANK_DIR", str(tmp_path / "bank"))
    monkeypatch.delenv("DITMEM_REDIS_URL", raising=False)
    result = CliRunner().invoke(app, ["doctor", "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    for name in ("torch", "cuda", "faiss", "weights", "redis", "bank dir"):
        assert name in result.output


def test_doctor_fails_on_missing_weights_and_unreachable_redis(tmp_path, monkeypatch):
    monkeypatch.setenv("DITMEM_WAN_PATH", str(tmp_path / "wan"))
    monkeypatch.setenv("DITMEM_DIT_MEM_PATH", str(tmp_path / "DiT-Mem-1.3B.safetensors"))
    monkeypatch.setenv("DITMEM_REDIS_URL", "redis://127.0.0.1:1/0")
    result = CliRunner().invoke(app, ["doctor", "--preset", "wan2.1-t2v-1.3b"])
    assert result.exit_code == 1
    assert "FAIL weights" in result.output and "huggingface-cli download" in result.output
    assert "FAIL dit-mem checkpoint" in result.output
    assert "FAIL redis" in result.output


def test_doctor_warns_about_a_variable_no_setting_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("DITMEM_BANK_DIR", str(tmp_path / "bank"))
    monkeypatch.delenv("DITMEM_REDIS_URL", raising=False)
    monkeypatch.setenv("DITMEM_RESULT_DIR", str(tmp_path / "results"))
    result = CliRunner().invoke(app, ["doctor", "--preset", "tiny"])
    assert result.exit_code == 0, result.output  # a warning, not a failure
    assert "warn environment" in result.output
    assert "DITMEM_RESULT_DIR is not a ditmem setting; did you mean DITMEM_RESULTS_DIR?" in (
        result.output
    )


def test_doctor_passes_on_the_default_toy_preset_with_its_shipped_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("DITMEM_BANK_DIR", str(tmp_path / "bank"))
    for name in ("DITMEM_REDIS_URL", "DITMEM_PRESET", "DITMEM_WAN_PATH", "DITMEM_DIT_MEM_PATH"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "ok   preset               toy" in result.output
    assert "model/toy/weights" in result.output


def test_doctor_reports_the_manifest_database(tmp_path, monkeypatch):
    from tests.postgres import temporary_database

    monkeypatch.setenv("DITMEM_BANK_DIR", str(tmp_path / "bank"))
    monkeypatch.delenv("DITMEM_REDIS_URL", raising=False)
    with temporary_database() as url:
        monkeypatch.setenv("DITMEM_DATABASE_URL", url)
        result = CliRunner().invoke(app, ["doctor", "--preset", "tiny"])
        assert result.exit_code == 0, result.output
        assert "ok   manifest             PostgreSQL 15" in result.output
    monkeypatch.setenv("DITMEM_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/none")
    result = CliRunner().invoke(app, ["doctor", "--preset", "tiny"])
    assert result.exit_code == 1 and "FAIL manifest" in result.output


def test_doctor_reports_the_object_storage(tmp_path, monkeypatch):
    from tests.s3 import moto_server

    monkeypatch.setenv("DITMEM_BANK_DIR", str(tmp_path / "bank"))
    monkeypatch.delenv("DITMEM_REDIS_URL", raising=False)
    with moto_server() as (endpoint, bucket):
        monkeypatch.setenv("DITMEM_STORAGE_URL", f"s3://{bucket}/ditmem")
        monkeypatch.setenv("DITMEM_S3_ENDPOINT_URL", endpoint)
        result = CliRunner().invoke(app, ["doctor", "--preset", "tiny"])
        assert result.exit_code == 0, result.output
        assert f"ok   object storage       results/ in s3://{bucket}/ditmem/" in result.output
        monkeypatch.setenv("DITMEM_STORAGE_URL", "s3://no-such-bucket/ditmem")
        result = CliRunner().invoke(app, ["doctor", "--preset", "tiny"])
        assert result.exit_code == 1 and "FAIL object storage" in result.output
