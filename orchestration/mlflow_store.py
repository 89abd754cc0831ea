"""Where MLflow lives: the tracking URI, whether it answers, and a light local server for `ui`.

The default store is `sqlite:///projsweep-runs/mlflow.db` (relative to the working directory) with
artifacts beside it in `projsweep-runs/mlartifacts/`, unless `--mlflow-uri` or
`MLFLOW_TRACKING_URI` says otherwise. Relative SQLite paths are made absolute once, when a sweep
starts, so that `resume` from another directory writes to the same store.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_STORE_DIR = "projsweep-runs"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
SQLITE_PREFIX = "sqlite:///"

QUICK_HTTP = {
    # MLflow's REST client retries 7 times with exponential backoff (minutes against a dead
    # server); the sweep journals and retries on its own, so each call should fail fast.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
LIGHT_SERVER_ENV = {
    # Without it `mlflow server` starts a job-execution pool (~15 processes, ~3.6 GB).
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


def default_tracking_uri(cwd: Path | None = None) -> str:
    db = Path(cwd or Path.cwd(), DEFAULT_STORE_DIR, DB_FILE).resolve()
    return SQLITE_PREFIX + str(db)


def resolve_tracking_uri(uri: str | None) -> str:
    """`uri`, else `MLFLOW_TRACKING_URI`, else the default store; local paths made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith(SQLITE_PREFIX):
        path = uri.removeprefix(SQLITE_PREFIX)
        # `sqlite:///rel/x.db` is relative, `sqlite:////abs/x.db` absolute; both end up absolute.
        return SQLITE_PREFIX + str(Path(path).resolve()) if path != ":memory:" else uri
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return str(Path(uri).resolve())  # a plain directory: MLflow's file store
    return uri


def is_server(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return Path(uri.removeprefix(SQLITE_PREFIX))


def artifact_root(uri: str) -> Path | None:
    """For a SQLite store, `mlartifacts/` beside the database; otherwise the store decides."""
    db = sqlite_path(uri)
    return db.parent / ARTIFACTS_DIR if db is not None else None


def quick_http_env() -> None:
    """Make MLflow's HTTP calls in this process fail fast (keeps any value the user set)."""
    for key, value in QUICK_HTTP.items():
        os.environ.setdefault(key, value)


def unreachable_reason(uri: str) -> str | None:
    """Why the tracking store cannot be used now, or None when it answers."""
    db = sqlite_path(uri)
    if db is not None:  # checked without writing: bad input must leave nothing behind
        existing = next(p for p in db.parents if p.exists())
        return None if os.access(existing, os.W_OK) else f"{existing} is not writable"
    if not is_server(uri):
        return None
    quick_http_env()
    from mlflow import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # connection refused, timeout, 5xx, auth: all mean "not usable"
        return str(err).splitlines()[0][:300]
    return None


def server_command(backend_uri: str, *, port: int, host: str = "127.0.0.1") -> list[str]:
    """`mlflow server` over `backend_uri` with the light settings (one worker, no job pool)."""
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    root = artifact_root(backend_uri)
    if root is not None:
        command += ["--artifacts-destination", str(root)]
    return command


def server_env() -> dict[str, str]:
    return {**os.environ, **LIGHT_SERVER_ENV}


def run_ui(port: int) -> int:
    """`mlflow server` on 127.0.0.1 over the default store (or `MLFLOW_TRACKING_URI`'s) until
    Ctrl-C. Exit code."""
    import subprocess

    uri = resolve_tracking_uri(None)
    if is_server(uri):
        print(f"projsweep ui: MLFLOW_TRACKING_URI is a server already: open {uri}")
        return 0
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        print(f"projsweep ui: no runs yet in {db} (run a sweep from this directory first)")
    print(f"projsweep ui: MLflow UI on http://127.0.0.1:{port} over {uri} (Ctrl-C stops it)")
    # Its own process group, so that stopping `ui` stops the server's uvicorn worker too.
    command = server_command(uri, port=port)
    server = subprocess.Popen(command, env=server_env(), start_new_session=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return server.wait()
    except KeyboardInterrupt:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
