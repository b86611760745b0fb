"""``coalora serve BUNDLE``: the bundle behind an OpenAI-compatible HTTP API.

Imports nothing heavy at module level (typer only), so ``coalora --help`` stays fast and a
device install without the ``serve`` extra still answers ``--help``.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Annotated

import typer

EXIT_BAD_INPUT = 2
LOOPBACK = ("127.0.0.1", "::1", "localhost")

SERVE_EXAMPLES = """
Examples:

  coalora serve bundle/ --budget 4.5bits --port 8080

  coalora serve bundle/ --adapt --api-key "$KEY"          # follow the device's free memory

  curl -s localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "bundle", "messages": [{"role": "user", "content": "Hi"}]}'
"""


def bad_input(message: str) -> typer.Exit:
    """Print ``error: message`` on one line of stderr; raise the returned Exit(2)."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a taken port is one clear error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise bad_input(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise bad_input(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    return sock


def serve_command(
    bundle: Annotated[str, typer.Argument(help="bundle directory", show_default=False)],
    budget: Annotated[
        str, typer.Option(help="3.5bits (bits per weight), 600MB / 2GiB (whole process), or auto")
    ] = "auto",
    profile: Annotated[str | None, typer.Option(help="plan for a device profile")] = None,
    host: Annotated[str, typer.Option(help="address to listen on (loopback by default)")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port", min=0, max=65535)] = 8080,
    context: Annotated[int, typer.Option(help="context length in tokens", min=2)] = 512,
    threads: Annotated[
        int | None, typer.Option(help="intra-op threads (default: physical cores)", min=1)
    ] = None,
    max_tokens: Annotated[
        int, typer.Option(help="tokens generated when a request gives no max_tokens", min=1)
    ] = 256,
    max_queue: Annotated[
        int, typer.Option(help="requests waiting behind the running one; more get 503", min=0)
    ] = 16,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="COALORA_API_KEY",
            help="require 'Authorization: Bearer KEY' (checked in constant time)",
        ),
    ] = None,
    adapt: Annotated[
        bool, typer.Option("--adapt", help="switch configuration as free memory changes")
    ] = False,
    adapt_margin: Annotated[
        float,
        typer.Option(
            help="--adapt: switch down when less than this share of the plan is free; switch "
            "up when a better configuration fits with 0.15 more"
        ),
    ] = 0.10,
    adapt_hold: Annotated[
        float, typer.Option(help="--adapt: seconds memory must stay free to switch up")
    ] = 10.0,
    model_name: Annotated[
        str | None, typer.Option(help="model id in /v1/models (default: the bundle's folder)")
    ] = None,
    trusted_key: Annotated[
        str | None,
        typer.Option(
            help="public key (PEM): refuse the bundle unless this key's pair signed it "
            "(needs the sign extra)"
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="log warnings only")] = False,
) -> None:
    """Serve BUNDLE over an OpenAI-compatible HTTP API: /v1/chat/completions,
    /v1/completions (stream: true for server-sent events), /v1/models, /health,
    /v1/coalora/budget and, for classifier bundles, /v1/classify.

    One request runs at a time; up to --max-queue wait in order, and more are answered 503
    with Retry-After.
    """
    from coalora.runtime.adapt import AdaptPolicy
    from coalora.runtime.budget import BudgetError
    from coalora.runtime.engine import Runtime, RuntimeInputError
    from coalora.runtime.format.reader import BundleError
    from coalora.runtime.profiles import ProfileError
    from coalora.runtime.selection import SelectionError

    try:
        import uvicorn

        from coalora.runtime.serve.app import Server, create_app
    except ImportError as exc:
        raise bad_input(
            f"coalora serve needs the serve extra ({exc.name} is missing): "
            "pip install 'coalora[runtime,serve]'"
        ) from None

    policy = None
    if adapt:
        try:
            # Up needs 15 points more room than down: the hysteresis.
            policy = AdaptPolicy(
                margin_down=adapt_margin, margin_up=adapt_margin + 0.15, hold_s=adapt_hold
            )
        except ValueError as exc:
            raise bad_input(str(exc)) from None
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sock = _bind(host, port)
    try:
        rt = Runtime.open(
            bundle,
            budget=budget,
            profile=profile,
            context_length=context,
            threads=threads,
            adapt=policy or False,
            trusted_key=trusted_key,
        )
    except (BudgetError, BundleError, SelectionError, ProfileError, RuntimeInputError) as exc:
        sock.close()
        raise bad_input(str(exc)) from None
    name = model_name or Path(bundle).resolve().name
    server = Server(
        rt, model_id=name, max_waiting=max_queue, api_key=api_key, default_max_tokens=max_tokens
    )
    log = logging.getLogger("coalora.runtime.serve")
    bound = sock.getsockname()
    log.info("%s: %s", name, rt.selection.reason)
    # Always printed, --quiet or not: scripts read the port from it (--port 0 picks one).
    typer.echo(f"listening on http://{host}:{bound[1]} (OpenAI-compatible, /v1)", err=True)
    if host not in LOOPBACK and not api_key:
        log.warning("listening beyond loopback without --api-key: anyone who reaches it may use it")
    config = uvicorn.Config(
        create_app(server),
        log_level="warning" if quiet else "info",
        access_log=not quiet,
        timeout_graceful_shutdown=5,
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        rt.close()
        sock.close()
