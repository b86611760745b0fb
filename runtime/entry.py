"""Console entry points, kept free of imports: a Ctrl-C that lands while the command is still
loading its modules (onnxruntime and onnx take a while on a small board) ends with one
``error: interrupted`` line, not a traceback."""

from __future__ import annotations

import sys


def coalora_run() -> None:
    """``coalora-run``: see ``coalora.runtime.cli``."""
    try:
        from coalora.runtime.cli import main

        main()
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
