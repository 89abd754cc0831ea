"""Build-once cache entries: a file lock per entry, a temp directory, an atomic rename.

A cache entry is a directory that appears complete or not at all: it is built in a hidden temp
directory beside its final path and renamed into place (`os.replace`, atomic on one filesystem).
Readers look only at final paths, so a build killed halfway leaves a temp directory nobody reads;
the next builder of that entry removes it under the lock.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def is_complete(final: Path, marker: str) -> bool:
    return (final / marker).is_file()


def build_once(final: Path, build: Callable[[Path], None], *, marker: str) -> bool:
    """Make sure `final` exists; `build(tmp_dir)` fills it when missing. True if this call built it.

    Two processes asking for the same entry at once build it once: the second waits on the lock
    and then finds the entry complete. `marker` is a file every complete entry contains.
    """
    if is_complete(final, marker):
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(final.parent / f"{final.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process to build {final}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        if is_complete(final, marker):
            return False
        _remove_leftovers(final)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
        try:
            build(tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return True
    finally:
        lock.release()


def _remove_leftovers(final: Path) -> None:
    """Temp directories of interrupted builds, and a final path without its marker (hand-made)."""
    for stale in final.parent.glob(_tmp_prefix(final) + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        shutil.rmtree(final)
