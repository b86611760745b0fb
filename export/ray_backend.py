"""The export on a Ray cluster (``--ray ADDRESS``, the optional ``ray`` extra).

Ray Train's ``TorchTrainer`` starts ``--ray-workers`` workers and joins them in one
torch.distributed process group (gloo on CPUs, nccl on GPUs); each worker runs the same job
as a torchrun rank (``run_export``), so training, the Pareto search's evaluations and the
sweep's scoring are shared out over the workers exactly as under torchrun, and worker 0
writes the work directory and the bundle. ``--out`` and ``--work-dir`` must therefore be on
a file system every worker sees (one machine, or a shared mount).

Ray is imported here only: the default install and path never load it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from coalora.export.options import ExportError, ExportOptions

RAY_EXTRA = "pip install 'coalora[ray]' (ray[train]==2.60.0)"


@dataclass
class RayExportResult:
    """What the driver gets back: worker 0's summary lines (``ExportResult.summary``)."""

    lines: list[str]

    def summary(self) -> list[str]:
        return list(self.lines)


def _import_ray() -> Any:
    try:
        import ray
        from ray.train import ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError:
        raise ExportError(f"--ray needs Ray Train, which is not installed: {RAY_EXTRA}") from None
    return ray, ScalingConfig, TorchTrainer


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the process group is Ray's, the job the same as torchrun's."""
    import ray.train

    from coalora.export import distributed
    from coalora.export.pipeline import run_export

    opts: ExportOptions = config["options"]
    res = run_export(opts)
    if distributed.is_main():  # beside --out, which every worker must see anyway
        Path(config["summary"]).write_text("\n".join(res.summary()), encoding="utf-8")
    ray.train.report({"step": opts.steps})


def _absolute(name_or_path: str) -> str:
    """A path that exists here, made absolute; a name (``smollm2``, ``bbc``) as it is."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def run_on_ray(opts: ExportOptions) -> RayExportResult:
    """Run the export on the Ray cluster at ``opts.ray`` ('local' starts one here)."""
    ray, ScalingConfig, TorchTrainer = _import_ray()
    use_gpu = opts.device == "cuda"
    address = None if opts.ray == "local" else opts.ray
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=opts.progress)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ExportError(f"--ray {opts.ray}: cannot reach the cluster ({exc})") from None
    # The workers run the plain job: no second hop to Ray, one torch thread each unless set,
    # and absolute paths (a worker starts in a directory of Ray's).
    worker_opts = replace(
        opts,
        ray=None,
        threads=opts.threads or 1,
        model=_absolute(opts.model),
        data=_absolute(opts.data),
        out=Path(opts.out).expanduser().resolve(),
        work_dir=None if opts.work_dir is None else Path(opts.work_dir).expanduser().resolve(),
    )
    out = Path(worker_opts.out)
    summary = out.with_name(f".{out.name}.ray-summary")
    trainer = TorchTrainer(
        _worker,
        # sent in memory (cloudpickle), never saved
        train_loop_config={"options": worker_opts, "summary": str(summary)},
        scaling_config=ScalingConfig(num_workers=opts.ray_workers, use_gpu=use_gpu),
    )
    try:
        trainer.fit()
        lines = summary.read_text(encoding="utf-8").splitlines()
    except Exception as exc:  # a worker's failure arrives wrapped; its message is the news
        raise ExportError(f"the Ray job failed: {str(exc).strip().splitlines()[-1]}") from None
    finally:
        summary.unlink(missing_ok=True)
    return RayExportResult(lines)
