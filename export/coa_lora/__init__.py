"""CoA-LoRA: one shared LoRA pair per matrix plus θ, which maps a matrix's quantization option
to an r x r adjustment U, so that ΔW = s·B(I+U)A fits every configuration.

- ``config``  ``CoALoRAConfig``
- ``theta``   θ (``ConfigTheta``) and its input vocabulary (``ThetaVocab``)
- ``layer``   ``QuantLoRALinear``: a quantized frozen linear with the shared LoRA branch
- ``model``   ``CoALoRAModel``: swaps the layers into a Hugging Face model, owns θ
- ``train``   the training loop, evaluation, checkpoints
"""

from coalora.export.coa_lora.config import CoALoRAConfig
from coalora.export.coa_lora.layer import QuantLoRALinear
from coalora.export.coa_lora.model import CoALoRAModel
from coalora.export.coa_lora.theta import ConfigTheta, ThetaVocab
from coalora.export.coa_lora.train import (
    TrainResult,
    evaluate,
    evaluate_configs,
    load_checkpoint,
    sample_configs,
    save_checkpoint,
    train,
    train_step,
)

__all__ = [
    "CoALoRAConfig",
    "CoALoRAModel",
    "ConfigTheta",
    "QuantLoRALinear",
    "ThetaVocab",
    "TrainResult",
    "evaluate",
    "evaluate_configs",
    "load_checkpoint",
    "sample_configs",
    "save_checkpoint",
    "train",
    "train_step",
]
