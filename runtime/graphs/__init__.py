"""ONNX graph builders for the device: a LLaMA-family decoder with KV cache and a BERT
classifier, both with MatMulNBits linears and swappable LoRA initializers (onnx + numpy only).
"""

from coalora.runtime.graphs.bert import BertArch, BertWeights, build_bert_classifier
from coalora.runtime.graphs.llama import LlamaArch, build_llama_decoder
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
    "LlamaArch",
    "LoraSlot",
    "build_bert_classifier",
    "build_llama_decoder",
    "decoder_weights_from_arrays",
    "lora_initializers",
    "lora_slots",
    "random_lora",
]
