"""`submit` builds a Ray job from the project; the real cluster round trip is issue 6's test."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from orchestration import submit
from orchestration.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_entrypoint_runs_the_sweep_from_the_working_dir() -> None:
    line = submit.job_entrypoint(
        Path("sweeps/moe.yaml"), ["base.train.max_steps=50"], None, "http://mlflow:5000"
    )
    assert shlex.split(line) == [
        "python", "-m", "orchestration", "run", "sweeps/moe.yaml",
        "--storage", submit.DEFAULT_JOB_STORAGE, "--mlflow-uri", "http://mlflow:5000",
        "--set", "base.train.max_steps=50",
    ]  # fmt: skip


def test_project_root_is_found_from_inside() -> None:
    assert submit.project_root(ROOT / "sweeps" / "trials") == ROOT


def test_auth_token_as_the_ray_cli_finds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert submit.auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-file\n")
    assert submit.auth_token() == "from-file"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.auth_token() == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submit.auth_token() is None


def test_a_bad_spec_is_not_submitted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\n")
    code = main(["submit", str(spec), "--address", "http://127.0.0.1:1"])
    assert code == 2
    assert "search: Field required" in capsys.readouterr().err


def test_unreachable_cluster_is_a_runtime_failure(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["submit", str(ROOT / "sweeps" / "smoke.yaml"), "--address", "http://127.0.0.1:9"])
    assert code == 1
    assert "http://127.0.0.1:9" in capsys.readouterr().err
