"""Temporary directories that name their owner, so the next start can sweep what a killed
process left behind.

A directory made by ``owned_tempdir(prefix)`` is called ``<prefix><pid>-<random>``. A process
killed by SIGKILL (or the OOM killer) cannot remove its own, so every new one first removes
those whose owning process no longer exists. SIGTERM is turned into a normal exit by
``exit_on_sigterm`` so the owner's own cleanup runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep_stale(directory: str | Path, prefix: str) -> list[Path]:
    """Remove ``<prefix><pid>-*`` entries of ``directory`` whose process is gone."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)-")
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def make_owned_dir(prefix: str, directory: str | Path | None = None) -> Path:
    """``mkdtemp`` named after this process, after sweeping dead owners' leftovers."""
    where = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    sweep_stale(where, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=where))


@contextlib.contextmanager
def owned_tempdir(prefix: str, directory: str | Path | None = None) -> Iterator[Path]:
    path = make_owned_dir(prefix, directory)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def exit_on_sigterm(code: int = 143) -> None:
    """SIGTERM raises ``SystemExit`` in the main thread, so ``finally`` blocks and context
    managers clean up as on any other exit. For command-line entry points, not libraries."""

    def handler(signum: int, frame: object) -> None:
        sys.stderr.write("error: terminated\n")
        raise SystemExit(code)

    with contextlib.suppress(ValueError):  # not the main thread: leave the default
        signal.signal(signal.SIGTERM, handler)
