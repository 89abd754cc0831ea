"""Sweeps run by these tests track into a session-private MLflow store, not the working
directory's default `projsweep-runs/mlflow.db` (tests that want the default clear this)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    before = os.environ.get("MLFLOW_TRACKING_URI")
    store = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
