"""Workstation side of coalora: model loading, calibration, bit allocation, CoA-LoRA training,
Pareto configuration search, baselines, the bundle writer, and the ``coalora`` CLI."""
