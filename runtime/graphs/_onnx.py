"""A small ONNX graph-building helper shared by the decoder and encoder builders (onnx only).

Large initializers need not live in the ModelProto. With ``external`` (a dict the builder
fills), every initializer of ``MIN_EXTERNAL_BYTES`` or more is written as a reference to
external data in ``PLACEHOLDER``, a file nobody writes, and the array itself (a view of the
caller's array, e.g. of a memory-mapped bundle file: no copy) goes into ``external`` under
the initializer's name. ``runtime.session.create_session`` hands those arrays to onnxruntime
with ``SessionOptions.add_initializer``, so the weights exist once, where they already were,
instead of once more in the proto, once in its serialized bytes and once in onnxruntime.
Without ``external`` the proto is self-contained, as before.

``scratch`` (an object with ``copy(array) -> array``, e.g. ``runtime.mapped.Scratch``) takes
the weights the build computes (fused q/k/v and gate/up, packed LoRA) when only a
MatMulNBits node with accuracy_level 4 reads them: onnxruntime prepacks such weights into
buffers of its own and never reads the originals again (tests/test_graphs.py checks it), so
the caller can give their pages back right after the session is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from coalora.kernels import matmulnbits as mnb
from coalora.kernels.matmulnbits import MatMulNBitsWeights
from coalora.runtime.graphs.weights import Adapter, LoraSlot

MS = "com.microsoft"
OPSET = 21
# ir_version 10 is what onnx 1.23 writes for opset 21 and what onnxruntime 1.32 reads.
IR_VERSION = 10
# Below this an initializer stays inside the proto (constants, norms of tiny models).
MIN_EXTERNAL_BYTES = 1024
# The external-data location of initializers held outside the proto; never read.
PLACEHOLDER = "coalora.placeholder.bin"
# The MatMulNBits accuracy level whose CPU kernels prepack B, scales and zero points all.
PREPACKED_LEVEL = 4


def external_tensor(name: str, array: np.ndarray, location: str = PLACEHOLDER) -> TensorProto:
    """A TensorProto with ``array``'s name, dtype and shape whose data lies "in" ``location``."""
    t = TensorProto()
    t.name = name
    t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    t.dims.extend(array.shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(array.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


class GraphBuilder:
    """Collects nodes, initializers and value infos; names stay readable in profiles."""

    def __init__(
        self, name: str, *, external: dict[str, np.ndarray] | None = None, scratch: Any = None
    ) -> None:
        self.name = name
        self.external = external
        self.scratch = scratch if external is not None else None
        self.nodes: list[Any] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self._init_names: set[str] = set()
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    def input(self, name: str, elem_type: int, shape: Sequence[int | str | None] | None) -> str:
        """``shape`` None: rank and dims unstated (shape inference then leaves them alone)."""
        dims = None if shape is None else list(shape)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, dims))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence[int | str | None]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def initializer(self, name: str, array: np.ndarray) -> str:
        if name in self._init_names:
            raise ValueError(f"duplicate initializer {name!r}")
        self._init_names.add(name)
        # asarray, not ascontiguousarray: the latter turns a scalar into shape [1]. A
        # contiguous array (a mapped view) is not copied.
        arr = np.asarray(array, order="C")
        if self.external is not None and arr.nbytes >= MIN_EXTERNAL_BYTES:
            self.initializers.append(external_tensor(name, arr))
            self.external[name] = arr
        else:
            self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def const(self, value: Any, dtype: type | np.dtype = np.int64) -> str:
        """A small constant initializer, deduplicated by value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.tobytes(), arr.shape)
        if key not in self._consts:
            self._consts[key] = self.initializer(f"const.{len(self._consts)}", arr)
        return self._consts[key]

    def node(
        self,
        op: str,
        inputs: Sequence[str],
        name: str,
        *,
        outputs: int | Sequence[str] = 1,
        domain: str = "",
        **attrs: Any,
    ) -> list[str]:
        """Add a node; its outputs are named ``{name}/output_{i}`` unless given."""
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(
            helper.make_node(
                op, list(inputs), list(outputs), name=name, domain=domain or None, **attrs
            )
        )
        return list(outputs)

    def op(self, op: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        """A single-output node."""
        return self.node(op, inputs, name, **attrs)[0]

    def matmulnbits(
        self,
        x: str,
        w: MatMulNBitsWeights,
        prefix: str,
        *,
        accuracy_level: int,
        bias: np.ndarray | None = None,
        computed: bool = False,
    ) -> str:
        """A MatMulNBits node; ``computed``: ``w``'s arrays were made by the build (not views
        of the bundle), so they may live in ``scratch``.

        At accuracy_level 0, a width onnxruntime has no fp32 kernel for
        (``mnb.exact_as_fp32``) becomes an fp32 MatMul of the weight dequantized here: the
        same products in fp32, at fp32's speed instead of a ~100x slower path."""
        if mnb.exact_as_fp32(w.bits, accuracy_level):
            wt = np.ascontiguousarray(mnb.dequantize(w).T)
            y = self.op(
                "MatMul", [x, self.initializer(f"{prefix}.dequantized", wt)], f"{prefix}/MatMul"
            )
            if bias is not None:
                b = self.initializer(f"{prefix}.bias", bias.astype(np.float32))
                y = self.op("Add", [y, b], f"{prefix}/Add_bias")
            return y
        # The initializers go through ``initializer`` (so they can stay outside the proto);
        # names and attributes are ``kernels.matmulnbits.make_node``'s.
        arrays = [w.b, w.scales, w.zero_points]
        if computed and self.scratch is not None and accuracy_level == PREPACKED_LEVEL:
            arrays = [self.scratch.copy(a) if a.nbytes >= MIN_EXTERNAL_BYTES else a for a in arrays]
        inputs = [
            x,
            self.initializer(f"{prefix}.qweight", arrays[0]),
            self.initializer(f"{prefix}.scales", arrays[1]),
            self.initializer(f"{prefix}.qzeros", arrays[2]),
        ]
        if bias is not None:
            inputs += ["", self.initializer(f"{prefix}.bias", bias.astype(np.float32))]
        node = helper.make_node(
            "MatMulNBits",
            inputs,
            [f"{prefix}/MatMulNBits/output_0"],
            name=f"{prefix}/MatMulNBits",
            domain=mnb.DOMAIN,
            **w.attributes(accuracy_level),
        )
        self.nodes.append(node)
        return node.output[0]

    def model(self, metadata: dict[str, str] | None = None) -> ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, self.initializers
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
            producer_name="coalora",
        )
        model.ir_version = IR_VERSION
        for key, value in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        return model


def concat_matmulnbits(parts: Sequence[MatMulNBitsWeights]) -> MatMulNBitsWeights:
    """Stack matrices with the same K and option along N: one kernel call instead of several.

    The layout is row-major over N for codes, scales and packed zero points, so stacking rows
    is a plain concatenation.
    """
    first = parts[0]
    for p in parts[1:]:
        if (p.K, p.bits, p.block_size) != (first.K, first.bits, first.block_size):
            raise ValueError("only matrices with the same K, bits and block size can be fused")
    return MatMulNBitsWeights(
        b=np.concatenate([p.b for p in parts], axis=0),
        scales=np.concatenate([p.scales for p in parts]),
        zero_points=np.concatenate([p.zero_points for p in parts]),
        K=first.K,
        N=sum(p.N for p in parts),
        bits=first.bits,
        block_size=first.block_size,
    )


def lora_branch(
    g: GraphBuilder,
    x: str,
    y: str,
    slot: LoraSlot,
    adapters: Mapping[str, Adapter],
    *,
    accuracy_level: int,
) -> str:
    """``y + (x @ A) @ B`` with the slot's initializers (zeros for absent adapters)."""
    key = slot.key
    if slot.bits == 32:
        packed = slot.pack(adapters)
        a = g.initializer(slot.a_name, packed[slot.a_name])
        b = g.initializer(slot.b_name, packed[slot.b_name])
        t = g.op("MatMul", [x, a], f"{key}/lora/MatMul_A")
        u = g.op("MatMul", [t, b], f"{key}/lora/MatMul_B")
    else:
        wa, wb = slot.quantized(adapters)
        t = g.matmulnbits(x, wa, slot.a_name, accuracy_level=accuracy_level, computed=True)
        u = g.matmulnbits(t, wb, slot.b_name, accuracy_level=accuracy_level, computed=True)
    return g.op("Add", [y, u], f"{key}/lora/Add")
