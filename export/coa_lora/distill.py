"""Distillation from the teacher: the model as loaded, before our quantization ("the shipped
weights"; SmolLM2's package is Q4_1), run with no adapter.

Per batch the teacher runs once and only its top-k log-probabilities per position are kept;
every configuration of the step is scored against that cache:

    KL(p_teacher,topk || p_student) = sum_{i in topk} p_i (log p_i - log q_i)

with p renormalised over the top k (q is the student's full softmax, so the sum is >= 0), over
the positions the cross-entropy counts (labels != -100, shifted). The step's loss is
(1 - w) * cross-entropy + w * KL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from coalora.export.coa_lora.model import CoALoRAModel


@dataclass
class TeacherCache:
    logp: torch.Tensor  # [B, T-1, k] renormalised teacher log-probabilities of its top k
    index: torch.Tensor  # [B, T-1, k] their token ids
    mask: torch.Tensor  # [B, T-1] positions that predict a real next token


@torch.no_grad()
def teacher_topk(model: CoALoRAModel, batch: dict[str, torch.Tensor], k: int) -> TeacherCache:
    """The shipped weights' top-k next-token distribution on ``batch`` (no adapter, eval)."""
    if model.kind != "causal-lm":
        raise ValueError("distillation needs a causal LM's next-token logits")
    mode, training = model.mode, model.training
    model.set_mode("fp-no-lora")
    model.eval()
    try:
        inputs = {key: v for key, v in batch.items() if key != "labels"}
        logits = model(**inputs).logits[..., :-1, :].float()
    finally:
        model.set_mode(mode)
        model.train(training)
    top, index = logits.log_softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
    logp = top - top.logsumexp(-1, keepdim=True)
    return TeacherCache(logp, index, batch["labels"][..., 1:] != -100)


def kl_to_teacher(student_logits: torch.Tensor, cache: TeacherCache) -> torch.Tensor:
    """Mean over counted positions of KL(teacher top-k || student)."""
    logq = F.log_softmax(student_logits[..., :-1, :].float(), dim=-1).gather(-1, cache.index)
    kl = (cache.logp.exp() * (cache.logp - logq)).sum(-1)
    mask = cache.mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1.0)
