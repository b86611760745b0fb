"""The manifest's schema: every field the device reads, with its type, range and the rules
that tie fields together, checked once before anything reads the manifest.

The manifest is the one file no hash covers, so it is validated whole (pydantic) instead of
field by field where it is used: a reader that got past ``validate_manifest`` can index it
without checking types again. Sections the device does not read (``training``, ``slimmed``,
unknown ones from newer writers) are kept as they are. Keys come from ``spec``.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coalora.runtime.format.spec import (
    FAMILIES,
    FORMAT,
    READABLE_VERSIONS,
    TASK_CAUSAL_LM,
    TASK_CLASSIFY,
    THETA_OUTPUT,
)

# Bounds that no real model reaches; past them a field is damage, not a model.
MAX_DIM = 1 << 20  # widths, vocabularies, positions
MAX_LAYERS = 4096
MAX_RANK = 4096
MAX_FILES = 100_000
MAX_FILE_BYTES = 1 << 44  # 16 TiB

PositiveDim = Annotated[int, Field(strict=True, ge=1, le=MAX_DIM)]
TokenId = Annotated[int, Field(strict=True, ge=0, le=MAX_DIM * 16)]


class _Open(BaseModel):
    """A section that may hold fields the device does not read."""

    model_config = ConfigDict(extra="allow")


class ModelConfig(_Open):
    """The Hugging Face config fields the graph builders read. Each is checked where present;
    which ones a family needs is the graph builder's to say (``assemble.arch_of``)."""

    model_type: str | None = None
    vocab_size: PositiveDim | None = None
    hidden_size: PositiveDim | None = None
    intermediate_size: PositiveDim | None = None
    num_hidden_layers: Annotated[int, Field(strict=True, ge=1, le=MAX_LAYERS)] | None = None
    num_attention_heads: PositiveDim | None = None
    num_key_value_heads: PositiveDim | None = None
    head_dim: PositiveDim | None = None
    max_position_embeddings: PositiveDim | None = None
    rms_norm_eps: Annotated[float, Field(gt=0, lt=1)] | None = None
    layer_norm_eps: Annotated[float, Field(gt=0, lt=1)] | None = None
    rope_theta: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _heads_fit(self) -> ModelConfig:
        heads = self.num_attention_heads
        if heads is None:
            return self
        kv = self.num_key_value_heads or heads
        if kv > heads or heads % kv:
            raise ValueError(f"num_key_value_heads {kv} must divide num_attention_heads {heads}")
        if self.head_dim is None and self.hidden_size is not None and self.hidden_size % heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of {heads} attention heads"
            )
        return self


class ChatFormatEntry(_Open):
    prompt: str
    with_system: str | None = None


class Architecture(_Open):
    family: str
    task: str = TASK_CAUSAL_LM
    config: ModelConfig
    labels: list[str] | None = None
    chat_format: ChatFormatEntry | None = None
    eos_token_ids: list[TokenId] = []
    bos_token_id: TokenId | None = None
    lm_head: str | None = None

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        names = [f.name for f in FAMILIES]
        if value not in names:
            raise ValueError(f"unknown model family {value!r} (this reader knows {names})")
        return value

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in (TASK_CAUSAL_LM, TASK_CLASSIFY):
            raise ValueError(f"unknown task {value!r}")
        return value

    @model_validator(mode="after")
    def _fits(self) -> Architecture:
        vocab = self.config.vocab_size or MAX_DIM * 16
        for token in [*self.eos_token_ids, *([self.bos_token_id] if self.bos_token_id else [])]:
            if token >= vocab:
                raise ValueError(f"token id {token} is outside the vocabulary of {vocab}")
        if self.task == TASK_CLASSIFY and self.labels is not None and len(self.labels) < 2:
            raise ValueError("a classifier needs at least two labels")
        return self


class Lora(_Open):
    rank: Annotated[int, Field(strict=True, ge=1, le=MAX_RANK)]
    alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    low_rank: Annotated[int, Field(strict=True, ge=0, le=MAX_RANK)] = 0
    low_bits: Annotated[int, Field(strict=True, ge=1, le=8)] | None = None

    @model_validator(mode="after")
    def _low_pair(self) -> Lora:
        if self.low_rank and self.low_bits is None:
            raise ValueError("a low-bit pair (low_rank) needs low_bits")
        return self


class Theta(_Open):
    inputs: Annotated[list[str], Field(min_length=1, max_length=64)]
    output: str = THETA_OUTPUT
    vocab: dict[str, Any]

    @field_validator("inputs")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("θ's input names repeat")
        return value


class FileEntry(_Open):
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    bytes: Annotated[int, Field(strict=True, ge=0, le=MAX_FILE_BYTES)]


class Space(_Open):
    matrices: list[dict[str, Any]]
    options: list[str]


class Manifest(_Open):
    format: str
    format_version: int
    producer: str | None = None
    architecture: Architecture
    space: Space
    shipped: dict[str, list[str]]
    lora: Lora
    theta: Theta
    files: Annotated[dict[str, FileEntry], Field(max_length=MAX_FILES)]

    @model_validator(mode="before")
    @classmethod
    def _paths_inside(cls, data: Any) -> Any:
        """Where a file lives is checked before what the manifest says of it."""
        files = data.get("files") if isinstance(data, dict) else None
        for rel in files if isinstance(files, dict) else ():
            parts = PurePosixPath(rel).parts
            if not rel or rel.startswith("/") or ".." in parts or "\\" in rel:
                raise ValueError(f"manifest lists a path outside the bundle: {rel}")
        return data


def _where(error: dict[str, Any]) -> str:
    return ".".join(str(p) for p in error.get("loc", ())) or "manifest"


def validate_manifest(data: Any) -> str | None:
    """``None`` when ``data`` is a well-formed manifest, else one line saying what is wrong
    (the first problem found, with where it is)."""
    if not isinstance(data, dict):
        return "the manifest is not a JSON object"
    if data.get("format") == FORMAT and data.get("format_version") not in READABLE_VERSIONS:
        return None  # the version check says it better
    try:
        Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        value = first.get("input")
        shown = "" if isinstance(value, (dict, list)) else f" (got {value!r:.60})"
        return f"{_where(first)}: {message}{shown}"
    return None


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, counted without recursion, stopping past ``limit``."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, (dict, list)):
            depth = max(depth, d)
            if depth > limit:
                return depth
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return depth
