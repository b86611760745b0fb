"""CoA-LoRA: one shared LoRA pair per matrix plus θ, which maps a matrix's quantization option
to an r x r adjustment U, so that ΔW = s·B(I+U)A fits every configuration.

- ``config``  ``CoALoRAConfig``
- ``theta``   θ (``ConfigTheta``) and its input vocabulary (``ThetaVocab``)
- ``layer``   ``QuantLoRALinear``: a quantized frozen linear with the shared LoRA branch
- ``model``   ``CoALoRAModel``: swaps the layers into a Hugging Face model, owns θ
- ``train``   the training loop, evaluation, checkpoints
"""

from coalora.export.coalora.config import CoALoRAConfig
from coalora.export.coalora.layer import QuantLoRALinear
from coalora.export.coalora.model import CoALoRAModel
from coalora.export.coalora.theta import ConfigTheta, ThetaVocab
from coalora.export.coalora.train import (
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
