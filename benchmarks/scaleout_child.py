"""One measurement of ``benchmarks.scaleout``: CoA-LoRA training steps on SmolLM2, in one
process or as one rank of a torchrun job (then the global batch is shared by the ranks).

    python -m benchmarks.scaleout_child --out FILE [--threads 2]
    python -m torch.distributed.run --nproc-per-node 2 -m benchmarks.scaleout_child --out FILE

The steps are the export's (``export.coa_lora.train``, the export's data and batches for
SmolLM2 at the global batch and length below); the quantizer is round-to-nearest, which the
time of a step does not depend on. Rank 0 writes the seconds of every step to FILE.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# the global batch every run shares out (4 rows: 2 per rank at 2 processes)
SHAPE = dict(batch_size=4, seq_len=64, configs_per_step=2, options=("2b64", "4b64", "8b64"))
WARMUP = 1  # steps left out of the figure (first-touch allocations)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from coalora.export import distributed
    from coalora.export.coa_lora import CoALoRAModel, train
    from coalora.export.coa_lora.train import random_configurations
    from coalora.export.inputs import load_data, load_for_training
    from coalora.export.options import ExportOptions

    t0 = time.perf_counter()
    with distributed.process_group(torch.device("cpu")):
        opts = ExportOptions.for_model("smollm2", "-", fast=True, quantizer="rtn", **SHAPE)
        inp = load_for_training(opts, load_data(opts))
        model = CoALoRAModel(
            inp.loaded.model, inp.space, opts.adapter_config(), kind="causal-lm", method="rtn"
        )
        model.quantize_layers(progress=False)
        configs = random_configurations(inp.space, 8, seed=0)
        ready = time.perf_counter() - t0
        res = train(model, inp.train_batches, configs, steps=args.steps, progress=False)
        seconds = [r["seconds"] for r in res.history]
        if distributed.is_main():
            out = {
                "world_size": distributed.world_size(),
                "threads_per_process": torch.get_num_threads(),
                "setup_s": round(ready, 2),
                "step_seconds": seconds,
                "timed_step_seconds": seconds[WARMUP:],
                "losses": [r["loss"] for r in res.history],
            }
            Path(args.out).write_text(json.dumps(out), encoding="utf-8")


if __name__ == "__main__":
    main()
