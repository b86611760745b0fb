"""ONNX graph builders for the device: a LLaMA-family or Gemma 3 decoder with KV cache and a BERT
classifier, both with MatMulNBits linears and swappable LoRA initializers (onnx + numpy only).
"""

from coalora.runtime.graphs.bert import BertArch, BertWeights, build_bert_classifier
from coalora.runtime.graphs.gemma3 import Gemma3Arch
from coalora.runtime.graphs.llama import LlamaArch, build_decoder
from coalora.runtime.graphs.weights import (
    DecoderWeights,
    LoraSlot,
    decoder_weights_from_arrays,
    lora_initializers,
    lora_slots,
    random_lora,
)

__all__ = [
    "BertArch",
    "BertWeights",
    "DecoderWeights",
    "Gemma3Arch",
    "LlamaArch",
    "LoraSlot",
    "build_bert_classifier",
    "build_decoder",
    "decoder_weights_from_arrays",
    "lora_initializers",
    "lora_slots",
    "random_lora",
]
