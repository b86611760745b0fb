"""Console entry points, kept free of imports: a Ctrl-C that lands while the command is still
loading its modules (onnxruntime and onnx take a while on a small board) ends with one
``error: interrupted`` line, not a traceback."""

from __future__ import annotations

import sys


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a Ctrl-C, or was caused by one: a KeyboardInterrupt that lands inside
    an extension module's initialisation (onnxruntime's) comes back as an ``ImportError`` whose
    cause is the interrupt."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, KeyboardInterrupt):
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return False


def coalora_run() -> None:
    """``coalora-run``: see ``coalora.runtime.cli``."""
    try:
        from coalora.runtime.cli import main

        main()
    except BaseException as exc:
        if isinstance(exc, SystemExit) or not interrupted(exc):
            raise
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
