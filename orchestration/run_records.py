"""What a sweep tells MLflow, as plain data: run names, params, tags, curves, artifacts.

Pure functions over the spec, Tune's trial config and results, and the experiment directory; the
callback in `orchestration.tracking` journals what they return and `orchestration.mlflow_sink`
sends it. No MLflow or Ray import here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from orchestration.layout import (
    ERROR_FILE,
    LOG_POINTS,
    PROJECTOR_FILE,
    SKIP_REASON,
    STEP,
    trial_dirname_for,
)
from orchestration.space import display_params, resolve_trial_config
from orchestration.spec import SweepSpec, dump_sweep_spec
from trainer.config import TrialConfig, dump_trial_config
from trainer.overrides import ConfigError

MAX_PARAM_LENGTH = 6000
"""MLflow's limit on a param value."""
TRANSCRIPTS_FILE = "transcripts.tsv"
"""Eval transcripts the trainer writes into a checkpoint (`reference`, `hypothesis`, `wer`)."""
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
"""Terminal colour codes, which Ray puts in the tracebacks it records."""
RUN_STATUS = {
    "completed": "FINISHED",
    "stopped early": "KILLED",
    "skipped": "KILLED",
    "diverged": "FAILED",
    "failed": "FAILED",
    "unfinished": "RUNNING",
}
"""MLflow run status per trial state (the `projsweep.state` tag says which exactly)."""


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MAX_PARAM_LENGTH]


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as `a.b.c` params; lists and scalars as JSON text."""
    out: dict[str, str] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out |= flatten(value, path + ".")
        else:
            out[path] = _param_value(value)
    return out


# --- the sweep (parent run) ----------------------------------------------------------------------


def spec_hash(spec: SweepSpec) -> str:
    return hashlib.sha256(dump_sweep_spec(spec).encode()).hexdigest()[:16]


def sweep_params(spec: SweepSpec) -> dict[str, str]:
    """The search space (one param per dimension) and the settings; the base is in `spec.yaml`."""
    data = spec.model_dump(mode="json")
    data.pop("base")
    search = data["search"]
    space, when = search.pop("space"), search.pop("when")
    params = flatten(data)
    params |= {f"search.space.{path}": _param_value(dist) for path, dist in space.items()}
    for ptype, fields in when.items():
        params |= {f"search.when.{ptype}.{path}": _param_value(d) for path, d in fields.items()}
    return params


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def projsweep_version() -> str:
    try:
        return metadata.version("projsweep")
    except metadata.PackageNotFoundError:
        return "unknown"


def sweep_tags(spec: SweepSpec, experiment_dir: Path, ray_address: str) -> dict[str, str]:
    tags = {
        "projsweep.spec_hash": spec_hash(spec),
        "projsweep.version": projsweep_version(),
        "projsweep.ray_address": ray_address,
        "projsweep.experiment_dir": str(experiment_dir),
        "projsweep.metrics": ",".join(spec.search.metrics),
    }
    commit = _git("rev-parse", "HEAD")
    if commit:  # the working directory's commit (a Ray job's copy has no .git: no tag)
        tags["mlflow.source.git.commit"] = commit.strip()
        tags["projsweep.git_dirty"] = str(bool(_git("status", "--porcelain", "-uno")))
    return tags


def sweep_start(spec: SweepSpec, experiment_dir: Path, ray_address: str) -> dict[str, Any]:
    return {
        "name": spec.name,
        "params": sweep_params(spec),
        "tags": sweep_tags(spec, experiment_dir, ray_address),
        "texts": {"spec.yaml": dump_sweep_spec(spec)},
    }


# --- trials (nested runs) -----------------------------------------------------------------------


def resolved_or_error(base: TrialConfig, sampled: Mapping[str, Any]) -> TrialConfig | str:
    try:
        return resolve_trial_config(base, sampled)
    except ConfigError as err:
        return str(err)


def trial_start(spec: SweepSpec, trial_id: str, sampled: Mapping[str, Any]) -> dict[str, Any]:
    """Params: the flattened resolved config (a skipped trial: what was sampled)."""
    cfg = resolved_or_error(spec.base, sampled)
    tags = {
        "projsweep.trial_id": trial_id,
        "projsweep.state": "running",
        "projsweep.sampled": _param_value(display_params(sampled)),
    }
    if isinstance(cfg, str):
        params = {key.partition("@")[0]: _param_value(v) for key, v in sampled.items()}
        return {"name": trial_dirname_for(trial_id), "params": params, "tags": tags}
    header = f"# projsweep sweep `{spec.name}`, trial {trial_id}\n"
    return {
        "name": trial_dirname_for(trial_id),
        "params": flatten(cfg.model_dump(mode="json")),
        "tags": tags,
        "texts": {"config.yaml": header + dump_trial_config(cfg)},
    }


def trial_max_steps(spec: SweepSpec, sampled: Mapping[str, Any]) -> int:
    cfg = resolved_or_error(spec.base, sampled)
    return spec.max_steps if isinstance(cfg, str) else cfg.train.max_steps


def curve_points(result: Mapping[str, Any], after_step: int, timestamp_ms: int) -> list[list[Any]]:
    """`[key, value, timestamp, step]` for every metric of every log point past `after_step`."""
    rows: list[list[Any]] = []
    for point in result.get(LOG_POINTS) or []:
        step = int(point[STEP])
        if step <= after_step:
            continue
        for key, value in point.items():
            if key != STEP and isinstance(value, int | float) and not isinstance(value, bool):
                rows.append([key, float(value), timestamp_ms, step])
    return rows


def latest_checkpoint(experiment_dir: Path, trial_id: str) -> Path | None:
    """The trial's last Tune checkpoint (`checkpoint_<n>`, zero-padded so names sort)."""
    found = sorted((experiment_dir / trial_dirname_for(trial_id)).glob("checkpoint_*"))
    return found[-1] if found else None


def transcripts_worst_first(path: Path) -> str:
    """The transcripts table sorted by WER, worst first (ties keep the trainer's order)."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))

    def wer(row: dict[str, str]) -> float:
        try:
            value = float(row.get("wer") or "nan")
        except ValueError:
            return -math.inf
        return value if math.isfinite(value) else -math.inf

    rows.sort(key=wer, reverse=True)
    out = io.StringIO()
    columns = list(rows[0]) if rows else ["reference", "hypothesis", "wer"]
    writer = csv.DictWriter(out, columns, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def trial_end(
    experiment_dir: Path, trial_id: str, state: str, note: str = "", error: str | None = None
) -> dict[str, Any]:
    """Final state, the last eval's transcripts, a completed trial's projector weights, and a
    failed trial's `error.txt` (Tune's record of each failure, with its traceback)."""
    end: dict[str, Any] = {"state": state, "status": RUN_STATUS[state], "texts": {}, "files": []}
    if note:
        end["tags"] = {"projsweep.note": note[:5000]}
    if error:  # journaled as text: the file may be gone (Ray's session dir) when it is sent
        end["texts"][ERROR_FILE] = ANSI_COLOUR.sub("", error)
    checkpoint = latest_checkpoint(experiment_dir, trial_id)
    if checkpoint is None:
        return end
    if (checkpoint / TRANSCRIPTS_FILE).is_file():
        end["texts"][TRANSCRIPTS_FILE] = transcripts_worst_first(checkpoint / TRANSCRIPTS_FILE)
    if state == "completed" and (checkpoint / PROJECTOR_FILE).is_file():
        end["files"].append([str(checkpoint / PROJECTOR_FILE), None])
    return end


def ending_note(results: list[Mapping[str, Any]]) -> str:
    """Why a trial was skipped or diverged (its last result says)."""
    return str(results[-1].get(SKIP_REASON, "")) if results else ""
