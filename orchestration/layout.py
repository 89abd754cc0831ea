"""Names shared by the writers (trial function, runner) and the reader (`status`, `export`).

Kept apart so that reading an experiment directory never imports Ray.
"""

from __future__ import annotations

# Files in the experiment directory `<storage>/<sweep name>/`, beside Tune's own.
SPEC_FILE = "spec.yaml"
"""The resolved spec (base inlined): what `resume`, `status` and `export` read."""
RUN_FILE = "run.json"
"""How the sweep was started (Ray address, MLflow URI, start time)."""
BEST_FILE = "best.yaml"
"""The best trial's config, exported when a sweep ends."""
PROJECTOR_FILE = "projector.safetensors"
"""The projector weights in a trial's checkpoint (`trial_<id>/checkpoint_*/`); the latest
checkpoint of a completed trial holds its final weights."""

# Keys of the results a trial reports to Tune.
STEP = "step"
"""The optimiser step (ASHA's time attribute)."""
TRIAL_STATUS = "trial_status"
"""On a trial's last result: `completed`, `diverged` or `skipped` (stopped trials have none)."""
SKIP_REASON = "skip_reason"
"""Why a trial was skipped or diverged."""
LOG_POINTS = "log_points"
"""Every log point since the previous result, `[{"step": n, metric: value, …}, …]`."""
NODE_ID = "node_id"
"""The Ray node the trial reported from (a trial restarted after a lost node may move)."""
ERROR_FILE = "error.txt"
"""Tune's record of a trial's failures, with the remote tracebacks (`trial_<id>/error.txt`)."""


def trial_dirname_for(trial_id: str) -> str:
    return f"trial_{trial_id}"
