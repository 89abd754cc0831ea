"""`projsweep submit SWEEP.yaml --address http://HEAD:8265`: the sweep as a Ray job.

The project directory (the nearest one above the spec holding `pyproject.toml`) travels as the
job's `working_dir`, minus virtual environments, experiment outputs and caches; the job runs
`python -m orchestration run …` in it on the cluster. The same happens with Ray's own CLI:
`ray job submit --address http://HEAD:8265 --working-dir . -- projsweep run sweeps/moe.yaml`.

Token auth (Ray ≥ 2.59 turns it on for clusters started with `ray start`): the token is read from
`RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token` and sent as a bearer header,
unless `RAY_AUTH_MODE=disabled`.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from orchestration.runner import FORWARDED_ENV
from trainer.overrides import ConfigError

WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "venv", "projsweep-runs", "**/__pycache__", "*.egg-info",
    ".pytest_cache", ".ruff_cache", ".mypy_cache", "build", "dist",
]  # fmt: skip
DEFAULT_JOB_STORAGE = "~/projsweep-runs"
"""Where a submitted sweep writes when `--storage` is not given (on the node running the job)."""


def project_root(start: Path) -> Path:
    """The nearest directory at or above `start` with a `pyproject.toml`."""
    for directory in [start, *start.parents]:
        if (directory / "pyproject.toml").is_file():
            return directory
    raise ConfigError(f"no pyproject.toml at or above {start}: the sweep must be in the project")


def auth_token() -> str | None:
    """The Ray cluster's auth token as the Ray CLI would find it, or None."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def job_entrypoint(
    spec: Path, overrides: Sequence[str], storage: str | None, mlflow_uri: str | None
) -> str:
    args = ["python", "-m", "orchestration", "run", spec.as_posix()]
    args += ["--storage", storage or DEFAULT_JOB_STORAGE]
    if mlflow_uri:
        args += ["--mlflow-uri", mlflow_uri]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


def submit_sweep(
    spec_path: str,
    *,
    address: str,
    overrides: Sequence[str] = (),
    storage: str | None = None,
    mlflow_uri: str | None = None,
) -> int:
    """Submit the sweep; print the job id and how to follow it. Exit code."""
    from ray.job_submission import JobSubmissionClient

    spec = Path(spec_path).resolve()
    root = project_root(spec.parent)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    try:
        client = JobSubmissionClient(address, headers=headers)
        job_id = client.submit_job(
            entrypoint=job_entrypoint(spec.relative_to(root), overrides, storage, mlflow_uri),
            runtime_env={
                "working_dir": str(root),
                "excludes": WORKING_DIR_EXCLUDES,
                "env_vars": env,
            },
            metadata={"projsweep_spec": spec.relative_to(root).as_posix()},
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        hint = (
            ""
            if token
            else " (if the cluster uses token auth, set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
        )
        print(f"projsweep submit: {address}: {exc}{hint}", file=sys.stderr)
        return 1
    print(f"projsweep submit: job {job_id} submitted to {address}")
    print(f"  follow its logs: ray job logs --address {address} --follow {job_id}")
    print(f"  its status:      ray job status --address {address} {job_id}")
    print(f"  stop it:         ray job stop --address {address} {job_id}")
    if token:
        print("  (the ray CLI needs RAY_AUTH_MODE=token for this cluster's token auth)")
    return 0
