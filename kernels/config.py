"""The configuration space: which option every quantized matrix gets, and what that costs.

A *configuration* maps each quantized matrix (by name) to one ``QuantOption``. Its cost is
counted exactly as the device holds it (see ``options``): ``bits()`` is the average
bits-per-weight over the quantized matrices, ``nbytes()`` their total bytes.

A decoder's tied embedding / LM head may be a matrix of the configuration too, with options
of its own (``ConfigSpace.head_options``): ``Configuration.head``. It is counted in
``nbytes()`` and not in ``bits()``, so that ``--budget 3.5bits`` means the same body on every
model family (Gemma 3's head is 63% of its parameters, and a 2-bit head breaks generation:
benchmarks/results/head_bits.md); memory budgets and the memory plan count it. A
configuration that names no head serves the bundle's default one.

JSON form (what bundles, CLIs and the Pareto set store)::

    {"options": {"model.layers.0.self_attn.q_proj": "4b32", ...}, "lm_head": "4b64"}

(``lm_head`` only where the configuration names the head's option.)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from coalora.kernels.options import DEFAULT_OPTIONS, QuantOption

HEAD_KEY = "lm_head"  # the head's option in a configuration's JSON


class ConfigError(ValueError):
    """A configuration that does not fit its space; the message names what is wrong."""


@dataclass(frozen=True)
class MatrixSpec:
    """A quantized weight matrix: ``out_features x in_features`` as in ``nn.Linear.weight``."""

    name: str
    out_features: int
    in_features: int

    @property
    def n_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


class Configuration(Mapping[str, QuantOption]):
    """An immutable mapping matrix name -> option, hashable so it can key caches and sets.

    ``head``: the option of the tied embedding / LM head where the configuration names one
    (None: the bundle's default head). It is not one of the mapping's items, so code that
    walks the adapted matrices never meets it."""

    __slots__ = ("_items", "_lookup", "head")

    def __init__(self, options: Mapping[str, QuantOption], head: QuantOption | None = None):
        self._items: tuple[tuple[str, QuantOption], ...] = tuple(sorted(options.items()))
        self._lookup: dict[str, QuantOption] = dict(self._items)
        self.head: QuantOption | None = head

    def with_head(self, head: QuantOption | None) -> Configuration:
        return Configuration(self._lookup, head)

    def __getitem__(self, name: str) -> QuantOption:
        return self._lookup[name]

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash((self._items, self.head))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Configuration):
            return self._items == other._items and self.head == other.head
        return NotImplemented

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for _, opt in self._items:
            counts[opt.name] = counts.get(opt.name, 0) + 1
        summary = ", ".join(f"{k}x{v}" for k, v in sorted(counts.items()))
        head = f", head {self.head}" if self.head is not None else ""
        return f"Configuration({summary}{head})"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"options": {k: v.name for k, v in self._items}}
        if self.head is not None:
            out[HEAD_KEY] = self.head.name
        return out


class ConfigSpace:
    """The matrices a model quantizes and the options each may take; ``head`` (the tied
    embedding / LM head, ``vocab x hidden``) with ``head_options`` where a configuration may
    choose the head's option too."""

    def __init__(
        self,
        matrices: Iterable[MatrixSpec],
        options: Iterable[QuantOption] = DEFAULT_OPTIONS,
        head: MatrixSpec | None = None,
        head_options: Iterable[QuantOption] = (),
    ):
        self.matrices: tuple[MatrixSpec, ...] = tuple(matrices)
        self.options: tuple[QuantOption, ...] = tuple(sorted(set(options)))
        self.head = head
        self.head_options: tuple[QuantOption, ...] = tuple(sorted(set(head_options)))
        if (head is None) != (not self.head_options):
            raise ConfigError("a configured head needs both its shape and its options")
        if not self.matrices:
            raise ConfigError("a configuration space needs at least one matrix")
        if not self.options:
            raise ConfigError("a configuration space needs at least one option")
        names = [m.name for m in self.matrices]
        if head is not None:
            names.append(head.name)
        if len(set(names)) != len(names):
            raise ConfigError("matrix names in a configuration space must be unique")
        self._by_name = {m.name: m for m in self.matrices}
        self.total_params = sum(m.n_params for m in self.matrices)

    def __len__(self) -> int:
        return len(self.matrices)

    def matrix(self, name: str) -> MatrixSpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigError(f"unknown matrix {name!r}") from None

    # -- accounting ---------------------------------------------------------------------------
    def body_nbytes(self, config: Mapping[str, QuantOption]) -> int:
        """Bytes of the quantized matrices other than the head, as the device holds them."""
        return sum(config[m.name].nbytes(m.out_features, m.in_features) for m in self.matrices)

    def head_nbytes(self, config: Mapping[str, QuantOption]) -> int:
        """Bytes of the head at the option ``config`` names for it (0 where it names none)."""
        head = getattr(config, "head", None)
        if head is None or self.head is None:
            return 0
        return head.nbytes(self.head.out_features, self.head.in_features)

    def nbytes(self, config: Mapping[str, QuantOption]) -> int:
        """Bytes of the quantized matrices as the device holds them (the head's where the
        configuration names its option)."""
        return self.body_nbytes(config) + self.head_nbytes(config)

    def bits(self, config: Mapping[str, QuantOption]) -> float:
        """Average bits per weight over the quantized matrices other than the head (what
        ``--budget 3.5bits`` means)."""
        return 8.0 * self.body_nbytes(config) / self.total_params

    def option_bits(self, matrix: MatrixSpec, option: QuantOption) -> int:
        """Bits this matrix costs with this option (an integer: the allocator's weights)."""
        return 8 * option.nbytes(matrix.out_features, matrix.in_features)

    def uniform(self, option: QuantOption) -> Configuration:
        if option not in self.options:
            raise ConfigError(f"option {option} is not in this space's options")
        return Configuration({m.name: option for m in self.matrices})

    def min_bits(self) -> float:
        return self.bits(self.cheapest())

    def max_bits(self) -> float:
        return self.bits(
            Configuration(
                {
                    m.name: max(self.options, key=lambda o: self.option_bits(m, o))
                    for m in self.matrices
                }
            )
        )

    def cheapest(self) -> Configuration:
        return Configuration(
            {m.name: min(self.options, key=lambda o: self.option_bits(m, o)) for m in self.matrices}
        )

    # -- validation and JSON ------------------------------------------------------------------
    def validate(
        self, config: Mapping[str, QuantOption | str], head: QuantOption | str | None = None
    ) -> Configuration:
        """Check names and options (and the head's option: ``head``, else a
        ``Configuration``'s own); returns a ``Configuration``. Raises ``ConfigError``."""
        if head is None:
            head = getattr(config, "head", None)
        given = set(config)
        expected = set(self._by_name)
        missing = sorted(expected - given)
        extra = sorted(given - expected)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConfigError(f"configuration is missing matrix {missing[0]!r}{more}")
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise ConfigError(f"configuration names unknown matrix {extra[0]!r}{more}")
        out: dict[str, QuantOption] = {}
        for name, value in config.items():
            if isinstance(value, str):
                try:
                    value = QuantOption.parse(value)
                except ValueError as exc:
                    raise ConfigError(f"matrix {name!r}: {exc}") from None
            if not isinstance(value, QuantOption):
                raise ConfigError(f"matrix {name!r}: option must be like '4b32', got {value!r}")
            if value not in self.options:
                allowed = ", ".join(o.name for o in self.options)
                raise ConfigError(f"matrix {name!r}: option {value} is not offered ({allowed})")
            out[name] = value
        return Configuration(out, self._head_option(head))

    def _head_option(self, value: QuantOption | str | None) -> QuantOption | None:
        if value is None:
            return None
        if not self.head_options:
            raise ConfigError("this space has no configured head: leave out its option")
        if isinstance(value, str):
            try:
                value = QuantOption.parse(value)
            except ValueError as exc:
                raise ConfigError(f"{HEAD_KEY}: {exc}") from None
        if not isinstance(value, QuantOption) or value not in self.head_options:
            allowed = ", ".join(o.name for o in self.head_options)
            raise ConfigError(f"{HEAD_KEY}: option {value} is not offered ({allowed})")
        return value

    def config_from_dict(self, data: Any) -> Configuration:
        if not isinstance(data, dict) or not isinstance(data.get("options"), dict):
            raise ConfigError("configuration JSON must be an object with an 'options' object")
        head = data.get(HEAD_KEY)
        if head is not None and not isinstance(head, str):
            raise ConfigError(f"{HEAD_KEY} must be an option like '4b64', got {head!r}")
        return self.validate(data["options"], head)

    def config_from_json(self, text: str) -> Configuration:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"configuration is not valid JSON: {exc}") from None
        return self.config_from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "matrices": [
                {"name": m.name, "shape": [m.out_features, m.in_features]} for m in self.matrices
            ],
            "options": [o.name for o in self.options],
        }
        if self.head is not None:
            out["head"] = {"name": self.head.name, "shape": list(self.head.shape)}
            out["head_options"] = [o.name for o in self.head_options]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> ConfigSpace:
        try:
            matrices = [
                MatrixSpec(str(m["name"]), int(m["shape"][0]), int(m["shape"][1]))
                for m in data["matrices"]
            ]
            options = [QuantOption.parse(o) for o in data["options"]]
            head = None
            if data.get("head") is not None:
                h = data["head"]
                head = MatrixSpec(str(h["name"]), int(h["shape"][0]), int(h["shape"][1]))
            head_options = [QuantOption.parse(o) for o in data.get("head_options") or ()]
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ConfigError(f"malformed configuration space: {exc}") from None
        for m in [*matrices, *([head] if head else [])]:
            if m.out_features <= 0 or m.in_features <= 0:
                raise ConfigError(f"matrix {m.name!r} has an invalid shape {list(m.shape)}")
        return cls(matrices, options, head, head_options)

    def check_shapes(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Raise if a model's actual weight shapes differ from this space's."""
        for m in self.matrices:
            got = shapes.get(m.name)
            if got is None:
                raise ConfigError(f"model has no matrix {m.name!r}")
            if tuple(got) != m.shape:
                raise ConfigError(
                    f"matrix {m.name!r}: shape {list(got)} does not match {list(m.shape)}"
                )
