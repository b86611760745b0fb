"""Device side of coalora: bundle reader, budget probe, configuration selection, adapter
generation and folding, onnxruntime sessions, and the ``coalora-run`` CLI.

Imports numpy, onnxruntime, psutil, typer, tokenizers and safetensors only: never torch.
"""
