"""A one-line progress counter on stderr (a tty gets it redrawn in place, a log a few lines)."""

from __future__ import annotations

import sys
import time


class Progress:
    """`label: done/total (rate/s)`, redrawn in place on a terminal; on a pipe every ~25 %."""

    def __init__(self, label: str, total: int, unit: str = "items") -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self._start = time.perf_counter()
        self._tty = sys.stderr.isatty()
        self._next_log = total / 4

    def update(self, n: int) -> None:
        self.done += n
        if self._tty:
            print(f"\r{self._line()}", end="", file=sys.stderr, flush=True)
        elif self.done >= self._next_log and self.done < self.total:
            print(self._line(), file=sys.stderr, flush=True)
            self._next_log += self.total / 4

    def close(self) -> float:
        """Print the final line; return the elapsed seconds."""
        elapsed = time.perf_counter() - self._start
        end = "\r" if self._tty else ""
        print(f"{end}{self._line()} in {elapsed:.1f}s", file=sys.stderr, flush=True)
        return elapsed

    def _line(self) -> str:
        rate = self.done / max(time.perf_counter() - self._start, 1e-9)
        return f"{self.label}: {self.done}/{self.total} {self.unit} ({rate:.0f}/s)"
