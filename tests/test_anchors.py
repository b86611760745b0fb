"""The speed benchmarks' llama.cpp LoRA anchor: a LoRA GGUF shaped from the base GGUF, in the
layout llama.cpp's adapter loader checks (lora_a: (in, r), lora_b: (r, out) in GGUF order)."""

from __future__ import annotations

import gguf
import numpy as np

from benchmarks.anchors import LORA_TENSORS, lora_gguf


def _base(path, hidden: int = 8, ffn: int = 12) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    shapes = {"attn_q": (hidden, hidden), "attn_k": (4, hidden), "ffn_down": (hidden, ffn)}
    for name, (n_out, n_in) in shapes.items():  # numpy (out, in): GGUF ne (in, out)
        w.add_tensor(f"blk.0.{name}.weight", np.zeros((n_out, n_in), np.float32))
    w.add_tensor("token_embd.weight", np.zeros((16, hidden), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_lora_gguf_is_an_adapter_shaped_like_its_base(tmp_path):
    base, out = tmp_path / "base.gguf", tmp_path / "lora.gguf"
    _base(base)
    assert lora_gguf(base, out, rank=4, alpha=8.0) == out
    r = gguf.GGUFReader(str(out))
    text = {
        k: str(bytes(f.parts[-1]), "utf-8")
        for k, f in r.fields.items()
        if f.types == [gguf.GGUFValueType.STRING]
    }
    assert text["general.type"] == "adapter" and text["adapter.type"] == "lora"
    assert float(r.fields["adapter.lora.alpha"].parts[-1][0]) == 8.0
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}
    assert set(shapes) == {
        f"blk.0.{n}.weight.lora_{p}" for n in ("attn_q", "attn_k", "ffn_down") for p in "ab"
    }
    assert all(n.split(".")[2] in LORA_TENSORS for n in shapes)
    assert shapes["blk.0.attn_k.weight.lora_a"] == (8, 4)  # (in, r)
    assert shapes["blk.0.attn_k.weight.lora_b"] == (4, 4)  # (r, out)
    assert shapes["blk.0.ffn_down.weight.lora_a"] == (12, 4)
    assert shapes["blk.0.ffn_down.weight.lora_b"] == (4, 8)
    assert not list(tmp_path.glob("*.part"))
