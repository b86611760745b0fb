"""The bundle format's names: files, version, every manifest key, the model families.

One module both sides import (the writer on the workstation, the reader on the device), in
the spirit of gguf-py's ``constants.py``: a key is spelled once, here, and everything else
refers to the constant. The prose spec is docs/bundle-format.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from coalora.kernels.options import QuantOption

FORMAT = "coalora-bundle"
FORMAT_VERSION = 1
# A bundle with a low-bit LoRA pair (``Lora.LOW_RANK``) is written as version 2, so a reader
# that would drop the pair refuses it instead; version 1 bundles are written as before.
LOW_PAIR_FORMAT_VERSION = 2
READABLE_VERSIONS = (FORMAT_VERSION, LOW_PAIR_FORMAT_VERSION)
PARETO_FORMAT_VERSION = 1


# -- files ----------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
BASE_FILE = "base.safetensors"
LORA_FILE = "lora.safetensors"
THETA_FILE = "theta.onnx"
PARETO_FILE = "pareto.json"
TOKENIZER_FILE = "tokenizer.json"
QUANT_DIR = "quant"
REQUIRED_FILES = (BASE_FILE, LORA_FILE, THETA_FILE, PARETO_FILE)
# The OpenSSF model-signing signature over every other file (``format/signing.py``); optional,
# and not listed in the manifest (it signs the manifest). The name is model-signing's default.
SIGNATURE_FILE = "model.sig"


HEADS_DIR = "heads"


def quant_file(option: QuantOption) -> str:
    """The file holding every matrix shipped at ``option``: ``quant/4b32.safetensors``."""
    return f"{QUANT_DIR}/{option.name}.safetensors"


def head_file(option: QuantOption) -> str:
    """The file holding the LM head at an option of a configured head other than the
    bundle's default one (which stays in ``base.safetensors``): ``heads/4b64.safetensors``,
    tensors named as in the base file (``LM_HEAD``)."""
    return f"{HEADS_DIR}/{option.name}.safetensors"


# -- tensor names ---------------------------------------------------------------------------------
QWEIGHT, SCALES, QZEROS = "qweight", "scales", "qzeros"  # <matrix>.<part> in quant files
QUANT_PARTS = (QWEIGHT, SCALES, QZEROS)
LORA_A, LORA_B = "A", "B"  # <matrix>.A / <matrix>.B in lora.safetensors
LORA_A_LOW, LORA_B_LOW = "A_low", "B_low"  # the low-bit pair (``LoraRanks``), same file
LM_HEAD = "lm_head"  # lm_head.qweight / .scales / .qzeros in base.safetensors when quantized
# A decoder's fp32 token table in base.safetensors. A tied decoder with a quantized head ships
# none: its rows are the head's codes (the fast graph gathers them, the exact one dequantizes
# them), so the table is held once: a quarter of the fp32 bytes at 8 bits (Gemma 3 270M's
# fp32 table alone would be 671 MB).
EMBED_TOKENS = "model.embed_tokens.weight"


def tensor_name(matrix: str, part: str) -> str:
    return f"{matrix}.{part}"


# -- manifest.json --------------------------------------------------------------------------------
class Key:
    """Top-level sections of manifest.json."""

    FORMAT = "format"
    FORMAT_VERSION = "format_version"
    PRODUCER = "producer"
    ARCHITECTURE = "architecture"
    SPACE = "space"
    SHIPPED = "shipped"
    LORA = "lora"
    THETA = "theta"
    FILES = "files"
    # optional: how the bundle was made, and what slimming kept; readers ignore them
    TRAINING = "training"
    SLIMMED = "slimmed"


REQUIRED_SECTIONS = (Key.ARCHITECTURE, Key.SPACE, Key.SHIPPED, Key.LORA, Key.THETA, Key.FILES)
# Sections the writer itself produces; anything else is carried over as it is.
WRITER_SECTIONS = frozenset({Key.FORMAT, Key.FORMAT_VERSION, Key.PRODUCER, *REQUIRED_SECTIONS})


class Arch:
    """Keys of ``architecture``."""

    FAMILY = "family"
    TASK = "task"
    CONFIG = "config"  # the Hugging Face config fields the graph builders read
    LABELS = "labels"
    CHAT_FORMAT = "chat_format"
    EOS_TOKEN_IDS = "eos_token_ids"
    BOS_TOKEN_ID = "bos_token_id"
    LM_HEAD = "lm_head"  # the option of a quantized LM head, or null


class Space:
    """Keys of ``space`` (as ``kernels.ConfigSpace.to_dict`` writes them)."""

    MATRICES = "matrices"
    OPTIONS = "options"  # the options shipped, in the manifest


class Lora:
    """Keys of ``lora``."""

    RANK = "rank"
    ALPHA = "alpha"
    LOW_RANK = "low_rank"  # optional: the low-bit pair's rank (absent: none)
    LOW_BITS = "low_bits"  # the bit-width whose matrices run it


@dataclass(frozen=True)
class LoraRanks:
    """The rank of a matrix's adapter under an option: the shared pair's ``rank``, plus
    ``low_rank`` where the option is at ``low_bits`` (the space's lowest bit-width), whose
    matrices stack the low-bit pair under the shared one. The scale stays alpha / rank."""

    rank: int
    low_rank: int = 0
    low_bits: int | None = None

    def runs_low(self, option: QuantOption) -> bool:
        return self.low_rank > 0 and option.bits == self.low_bits

    def of(self, options: Iterable[QuantOption]) -> int:
        """The rank of one LoRA slot whose matrices run ``options`` (a fused slot's members
        share one option)."""
        return self.rank + (self.low_rank if any(self.runs_low(o) for o in options) else 0)


class Theta:
    """Keys of ``theta``."""

    INPUTS = "inputs"
    OUTPUT = "output"
    VOCAB = "vocab"


# θ's ONNX signature: four index arrays over the matrices and one global feature, out U.
THETA_INPUTS = ("bits", "block", "layer", "module", "global")
THETA_OUTPUT = "U"


class FileEntry:
    """Keys of each ``files`` entry."""

    SHA256 = "sha256"
    BYTES = "bytes"


class Training:
    """Keys of the optional ``training`` record (written by the export job)."""

    MODEL = "model"
    MODEL_SOURCE = "model_source"
    TASK = "task"
    DATA = "data"
    SPLIT = "split"
    STEPS = "steps"
    OPTIONS = "options"
    COALORA = "coalora"
    INITIAL_SET = "initial_set"
    SEARCH_EPOCHS = "search_epochs"
    CONFIGURATIONS_TRAINED = "configurations_trained"
    SWEEP = "sweep"
    FINAL_LOSS = "final_loss"
    THREADS = "threads"
    SECONDS = "seconds"
    # inside DATA
    DATA_SHA256 = "sha256"
    # inside SWEEP
    SWEEP_HELD_OUT_BATCHES = "held_out_batches"


class Slimmed:
    """Keys of the optional ``slimmed`` record."""

    FROM_OPTIONS = "from_options"
    MAX_BITS = "max_bits"


# Values of ``architecture.task``.
TASK_CAUSAL_LM = "causal-lm"
TASK_CLASSIFY = "classify"


# -- pareto.json ----------------------------------------------------------------------------------
class Pareto:
    """Keys of pareto.json and of each of its entries (besides the entry's ``options``)."""

    FORMAT_VERSION = "format_version"
    METRIC_NAME = "metric_name"
    HIGHER_IS_BETTER = "higher_is_better"
    ENTRIES = "entries"
    BITS = "bits"
    NBYTES = "nbytes"
    METRIC = "metric"
    SEEN_IN_TRAINING = "seen_in_training"


# -- model families -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A model family the device has a graph for, and how its matrices are named."""

    name: str  # architecture.family
    task: str  # what the device graph does with it
    kind: str  # the exporter's model kind: "causal-lm" (decoder) or "encoder"
    model_types: frozenset[str]  # Hugging Face ``model_type`` values of the family
    # matrix-name suffix -> θ module type; order matters where one suffix ends another
    modules: tuple[tuple[str, str], ...]
    # projections of one block that read the same input and share one fused MatMul (and one
    # LoRA slot) when their options match: names relative to the block's prefix
    fused: tuple[tuple[str, ...], ...] = ()


LLAMA = Family(
    name="llama",
    task=TASK_CAUSAL_LM,
    kind="causal-lm",
    model_types=frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3"}),
    modules=(
        ("self_attn.q_proj", "q"),
        ("self_attn.k_proj", "k"),
        ("self_attn.v_proj", "v"),
        ("self_attn.o_proj", "o"),
        ("mlp.gate_proj", "gate"),
        ("mlp.up_proj", "up"),
        ("mlp.down_proj", "down"),
    ),
    fused=(("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
)
# Gemma 3's matrices have LLaMA's names; its blocks differ (runtime/graphs/gemma3.py).
GEMMA3 = Family(
    name="gemma3",
    task=TASK_CAUSAL_LM,
    kind="causal-lm",
    model_types=frozenset({"gemma3_text"}),
    modules=LLAMA.modules,
    fused=LLAMA.fused,
)
BERT = Family(
    name="bert",
    task=TASK_CLASSIFY,
    kind="encoder",
    model_types=frozenset({"bert", "roberta", "xlm-roberta"}),
    # BERT's "attention.output.dense" must win over the block output's "output.dense".
    modules=(
        ("attention.self.query", "q"),
        ("attention.self.key", "k"),
        ("attention.self.value", "v"),
        ("attention.output.dense", "o"),
        ("intermediate.dense", "up"),
        ("output.dense", "down"),
    ),
)
FAMILIES: tuple[Family, ...] = (LLAMA, GEMMA3, BERT)

# Encoders the exporter loads and trains but has no device graph for.
OTHER_ENCODER_TYPES = frozenset({"distilbert", "electra", "deberta", "deberta-v2", "mpnet"})
ENCODER_TYPES = frozenset().union(
    *(f.model_types for f in FAMILIES if f.kind == "encoder"), OTHER_ENCODER_TYPES
)
# θ's module types in their canonical order.
MODULE_TYPES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


def family_named(name: str | None) -> Family | None:
    return next((f for f in FAMILIES if f.name == name), None)


def family_of_model_type(model_type: str) -> Family:
    """The family of a Hugging Face ``model_type``; raises ``ValueError`` for one without a
    device graph."""
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    names = " or ".join(f.name for f in FAMILIES)
    raise ValueError(f"no device graph for model type {model_type!r} ({names} families)")
