"""Command line: parse argv, load the config, run the server; exit codes only, no policy."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from swapper import __version__
from swapper.config import ConfigError, load_config
from swapper.lifecycle import serve
from swapper.logs import LogHub, setup_logging

EXIT_CONFIG = 2
LOOP_ENV = "SWAPPER_LOOP"  # "asyncio" runs on asyncio's own loop even when uvloop is installed


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    try:
        return host, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid listen address {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swapper", description="One URL in front of many local models.")
    p.add_argument("--config", "-c", required=True, help="path to models.yaml")
    p.add_argument(
        "--listen",
        "-l",
        type=parse_listen,
        default=("127.0.0.1", 8080),
        help="host:port to listen on (default 127.0.0.1:8080; loopback unless you say otherwise)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warn", "error"], default=None)
    p.add_argument(
        "--watch-config",
        action="store_true",
        help="reload the config when the file changes (SIGHUP always reloads); only models whose "
        "settings changed are restarted",
    )
    p.add_argument("--version", action="version", version=f"swapper {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"swapper: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"swapper: cannot read config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    hub = LogHub(echo_upstream=config.log_to_stdout in ("upstream", "both"))
    console = config.log_to_stdout in ("proxy", "both")
    setup_logging(args.log_level or config.log_level, config.log_format, hub, console=console)
    for warning in config.warnings:
        print(f"swapper: warning: {warning}", file=sys.stderr)
    host, port = args.listen
    path = Path(args.config)
    run(serve(config, host, port, logs=hub, config_path=path, watch_config=args.watch_config))
    return 0


def run(main: Coroutine[Any, Any, None]) -> None:
    """Runs ``main`` on uvloop when it is installed, else on asyncio's own loop.

    uvloop's C transports cut swapper's CPU per proxied request by about a fifth at 32
    concurrent requests (scripts/bench_proxy.py); nothing in swapper depends on which loop runs.
    """
    if os.environ.get(LOOP_ENV, "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main)
            return
    asyncio.run(main)


if __name__ == "__main__":
    sys.exit(main())
