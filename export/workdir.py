"""The export job's work directory: where slow results are cached between runs, and its log.

The directory (default ``.cache/coalora/<model>-<hash>`` in the project) is keyed by a hash of
the options that shape the result and of the data itself, so a second run with the same
options reuses what the first one computed; ``fresh`` clears it first. Cache files are
written atomically: a crash never leaves a truncated one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from coalora.export.options import ExportError, ExportOptions

log = logging.getLogger("coalora.export.pipeline")

LOG_FILE = "export.log"
OPTIONS_FILE = "options.json"
SPLIT_FILE = "split.json"
CALIBRATION_FILE = "calibration.safetensors"
GRADIENTS_FILE = "output_gradients.safetensors"
SELF_CHAT_FILE = "self_chat.json"
COSTS_FILE = "costs.json"
TRAINING_SETS_FILE = "training_sets.json"
SEARCH_LOG_FILE = "search_log.jsonl"
SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.txt"
TRAIN_DIR = "train"

# What the job writes in its work directory; --fresh removes these and nothing else (the
# directory may be one the user named).
_WORK_FILES = (
    OPTIONS_FILE,
    SPLIT_FILE,
    CALIBRATION_FILE,
    GRADIENTS_FILE,
    SELF_CHAT_FILE,
    COSTS_FILE,
    TRAINING_SETS_FILE,
    SEARCH_LOG_FILE,
    SWEEP_FILE,
    SUMMARY_FILE,
    LOG_FILE,
)
_WORK_DIRS = (TRAIN_DIR,)


def clear_work(work: Path) -> None:
    for name in _WORK_FILES:
        (work / name).unlink(missing_ok=True)
    for name in _WORK_DIRS:
        shutil.rmtree(work / name, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(path)  # a crash never leaves a truncated cache file


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def project_cache_root() -> Path:
    """``<project>/.cache/coalora`` for a source checkout (git-ignored), else under the cwd."""
    import coalora

    root = Path(coalora.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        root = Path.cwd()
    return root / ".cache" / "coalora"


def slug(model: str) -> str:
    name = Path(model).name if ("/" in model or "\\" in model) else model
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name).stem or name).strip("-").lower() or "model"


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def work_key(opts: ExportOptions, inp: Any) -> dict[str, Any]:
    """What the work directory is keyed by: the training options and the data (``Inputs``)."""
    return {**opts.training_key(), **inp.key}


def work_dir_for(opts: ExportOptions, inp: Any) -> Path:
    """``opts.work_dir``, else ``.cache/coalora/<model>-<hash of the training options + data>``."""
    if opts.work_dir is not None:
        return Path(opts.work_dir).expanduser()
    return project_cache_root() / f"{slug(opts.model)}-{digest(work_key(opts, inp))[:12]}"


def open_work_dir(opts: ExportOptions, inp: Any) -> Path:
    """The run's work directory, cleared when ``fresh``; refused when it holds a run with other
    options. Records the options and the split."""
    work = work_dir_for(opts, inp)
    key = work_key(opts, inp)
    if opts.fresh:
        clear_work(work)
    previous = read_json(work / OPTIONS_FILE)
    if previous is not None and previous != key:
        changed = sorted(k for k in key.keys() | previous.keys() if key.get(k) != previous.get(k))
        raise ExportError(
            f"work dir {work} holds a run with other options ({', '.join(changed)}): "
            "pass --fresh to start over there, or another --work-dir"
        )
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / OPTIONS_FILE, key)
    split = {"source": inp.dataset.source, "n_total": inp.n_total, **inp.split.to_dict()}
    write_json(work / SPLIT_FILE, split)
    return work


def checkpoint_step(train_dir: Path) -> int:
    """The step of the training checkpoint in ``train_dir`` (0: none)."""
    from coalora.export.coa_lora.train import CHECKPOINT_DIR

    state = read_json(train_dir / CHECKPOINT_DIR / "trainer.json")
    return int(state["step"]) if state else 0


@contextlib.contextmanager
def log_to(path: Path) -> Iterator[None]:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    level = log.level
    # The work dir's log gets INFO even when the caller configured no logging (the root's
    # last-resort handler still shows warnings only).
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


class Phases:
    """Wall time per named phase, logged as each ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        log.info("[%s] ...", name)
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            log.info("[%s] %.1f s", name, self.seconds[name])
