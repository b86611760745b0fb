"""Workstation side of coalora: model loading, calibration, bit allocation, CoA-LoRA training,
Pareto configuration search, baselines, what goes into a bundle (``exporter``; the format
itself is ``coalora.runtime.format``), and the ``coalora`` CLI."""
