"""Tiny trained models exported as bundles, for tests of the exporter and the runtime."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from coalora.export.coa_lora import CoALoRAConfig, CoALoRAModel, evaluate_configs, train
from coalora.export.data import TextDataset, classification_batches, lm_batches
from coalora.export.exporter import export_bundle
from coalora.export.models import LoadedModel, config_space, tiny_bert, tiny_llama, tiny_tokenizer
from coalora.kernels import Configuration, QuantOption
from coalora.runtime.format.pareto import ParetoEntry, ParetoSet
from coalora.runtime.format.theta import matrix_role

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
OPTIONS = (QuantOption(2, 64), QuantOption(4, 32), QuantOption(8, 32))
WORDS = "the a news market team film goal vote bank music game win rise fall new old".split()  # noqa: SIM905


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) for _ in range(n)]


def _configs(space) -> list[Configuration]:
    """Uniform configurations plus a mixed one: about 2.9 to 9.2 bits."""
    configs = [space.uniform(o) for o in OPTIONS]
    mixed = {}
    for m in space.matrices:
        layer, module = matrix_role(m.name)
        mixed[m.name] = OPTIONS[0] if module in ("q", "k", "up") else OPTIONS[1 + layer % 2]
    configs.append(Configuration(mixed))
    return configs


def _pareto(model: CoALoRAModel, configs, batches, metric: str, higher: bool) -> ParetoSet:
    values = evaluate_configs(model, configs, batches, metric)
    entries = [
        ParetoEntry(c, model.space.bits(c), model.space.nbytes(c), float(v), i < 3)
        for i, (c, v) in enumerate(zip(configs, values, strict=True))
    ]
    return ParetoSet(entries, metric, higher)


def build_llama_bundle(out: Path, steps: int = 6) -> Path:
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    tok.chat_template = CHATML
    base = tiny_llama()
    loaded = LoadedModel(model=base, tokenizer=tok, kind="causal-lm", source="tiny-llama")
    space = config_space(base, OPTIONS)
    model = CoALoRAModel(base, space, CoALoRAConfig(rank=4, alpha=8, lr=3e-3, configs_per_step=2))
    batches = lm_batches(TextDataset(_texts(32, 0)), tok, block_size=32, batch_size=4)
    configs = _configs(space)
    train(model, batches, configs, steps=steps, progress=False)
    eval_batches = [batches(0)]
    pareto = _pareto(model, configs, eval_batches, "perplexity", higher=False)
    return export_bundle(model, loaded, pareto, out)


def build_bert_bundle(out: Path, steps: int = 6) -> Path:
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    base = tiny_bert(num_labels=3)
    base.config.id2label = {0: "sport", 1: "business", 2: "tech"}
    base.config.label2id = {v: k for k, v in base.config.id2label.items()}
    loaded = LoadedModel(
        model=base, tokenizer=tok, kind="encoder", source="tiny-bert", task="classify"
    )
    space = config_space(base, OPTIONS)
    model = CoALoRAModel(
        base, space, CoALoRAConfig(rank=4, alpha=8, lr=3e-3, configs_per_step=2), kind="encoder"
    )
    texts = _texts(30, 1)
    ds = TextDataset(texts, [i % 3 for i in range(30)], ["sport", "business", "tech"])
    batches = classification_batches(ds, tok, max_length=32, batch_size=6)
    configs = _configs(space)
    train(model, batches, configs, steps=steps, progress=False)
    pareto = _pareto(model, configs, [batches(0)], "accuracy", higher=True)
    return export_bundle(model, loaded, pareto, out)
