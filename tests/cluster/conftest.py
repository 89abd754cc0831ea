"""The cluster tests start real Ray heads, nodes, jobs and MLflow servers (no mocks).

`tests/orchestration/mlflow_helpers.py` (a real `mlflow server` on 127.0.0.1) is shared with them;
this makes it importable when `tests/cluster` runs alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

ORCHESTRATION_TESTS = str(Path(__file__).resolve().parents[1] / "orchestration")
if ORCHESTRATION_TESTS not in sys.path:
    sys.path.append(ORCHESTRATION_TESTS)
