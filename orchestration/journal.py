"""The MLflow journal: every write meant for MLflow, on disk first, marked sent once accepted.

`<experiment>/mlflow-journal.jsonl` holds JSON lines of two kinds: entries `{"id": n, "op": …}`
and acknowledgements `{"ack": n}`. An entry without an acknowledgement has not reached MLflow yet:
it is retried on later callbacks, at the end of `run`, and by `resume`. Replaying an entry twice is
harmless: runs are found again by id or tag, params and tags are rewritten with the same values,
and a metric point keeps the timestamp it was journaled with, so MLflow's SQL store recognises the
second copy of (key, value, timestamp, step) and drops it.

Only the sweep's driver writes it (one Tune callback), so there is no locking. A line cut short by
a killed driver is ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

JOURNAL_FILE = "mlflow-journal.jsonl"


class Journal:
    """Append-only ops for MLflow, with the ids MLflow has accepted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[int, dict[str, Any]] = {}
        self._acked: set[int] = set()
        self._last_step: dict[str, int] = {}
        self._ended: dict[str, str] = {}
        self._started: set[str] = set()
        self._next = 0
        if path.is_file():
            self._load()

    def _load(self) -> None:
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # cut short by a killed driver: its op was never acknowledged either
            if "ack" in record:
                self._acked.add(int(record["ack"]))
            elif "id" in record:
                self._remember(int(record["id"]), record)
        for entry_id in self._acked:
            self._entries.pop(entry_id, None)

    def _remember(self, entry_id: int, entry: dict[str, Any]) -> None:
        self._next = max(self._next, entry_id + 1)
        run = entry.get("run")
        if entry["op"] == "metrics" and entry["metrics"]:
            top = max(int(m[3]) for m in entry["metrics"])
            self._last_step[run] = max(self._last_step.get(run, -1), top)
        elif entry["op"] == "start":
            self._started.add(run)
        elif entry["op"] == "end":
            self._ended[run] = entry["state"]
        self._entries[entry_id] = entry

    def _write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")

    def append(self, op: str, run: str, **fields: Any) -> int:
        """Journal one op for `run` (`sweep` or a trial id); returns its id."""
        entry = {"id": self._next, "op": op, "run": run, **fields}
        self._write(entry)
        self._remember(self._next, entry)
        return entry["id"]

    def ack(self, entry_id: int) -> None:
        self._write({"ack": entry_id})
        self._acked.add(entry_id)
        self._entries.pop(entry_id, None)  # sent entries need not stay in memory

    def pending(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """Unsent entries in the order they were journaled."""
        for entry_id in sorted(self._entries):
            if entry_id not in self._acked:
                yield entry_id, self._entries[entry_id]

    def unsent(self) -> int:
        return sum(1 for i in self._entries if i not in self._acked)

    def last_step(self, run: str) -> int:
        """The highest step journaled for `run` (-1 if none): a restarted trial repeats the steps
        after its last checkpoint, and MLflow must see each step once."""
        return self._last_step.get(run, -1)

    def started(self, run: str) -> bool:
        return run in self._started

    def ended(self, run: str) -> str | None:
        """The final state journaled for `run`, if any."""
        return self._ended.get(run)
