"""Command line: parse argv, load the config, run the server or check it; exit codes only, no policy.

Two forms share one loader, so a check says exactly what a start would:

* ``swapper --config FILE [--listen ...]`` serves (llama-swap's plain form);
* ``swapper check --config FILE``, or ``swapper -t --config FILE`` (``nginx -t``), validates the
  config without binding a port or starting a child, prints what a start would run, and exits 0,
  or 2 with the same message a start gives.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from swapper import __version__, check
from swapper.config import Config, ConfigError, load_config
from swapper.lifecycle import ListenError, serve
from swapper.logs import LogHub, setup_logging

EXIT_CONFIG = 2
CHECK = "check"  # the subcommand; any other first argument is the plain server form
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
    p = argparse.ArgumentParser(
        prog="swapper",
        description="One URL in front of many local models.",
        epilog="`swapper check --config FILE` (or -t) validates a config without serving it.",
    )
    p.add_argument("--config", "-c", required=True, help="path to models.yaml")
    p.add_argument(
        "-t",
        "--test-config",
        action="store_true",
        help="check the config and exit (the same as `swapper check`): 0 when valid, 2 when not",
    )
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


def build_check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swapper check",
        description="Load and validate a config as a start would, without binding a port or starting "
        "a child; print each model's command, port, aliases and placement, and every warning. "
        "Exit 0 when the config is valid, 2 when it is not.",
    )
    p.add_argument("--config", "-c", required=True, help="path to models.yaml")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHECK]:
        return check_config(build_check_parser().parse_args(argv[1:]).config)
    args = build_parser().parse_args(argv)
    if args.test_config:
        return check_config(args.config)
    config = load(args.config)
    if config is None:
        return EXIT_CONFIG
    hub = LogHub(echo_upstream=config.log_to_stdout in ("upstream", "both"))
    console = config.log_to_stdout in ("proxy", "both")
    setup_logging(args.log_level or config.log_level, config.log_format, hub, console=console)
    for warning in check.warnings(config):
        print(f"swapper: warning: {warning}", file=sys.stderr)
    host, port = args.listen
    path = Path(args.config).absolute()  # the start-up line names the file, wherever we started
    try:
        run(serve(config, host, port, logs=hub, config_path=path, watch_config=args.watch_config))
    except ListenError as exc:
        print(f"swapper: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def load(path: str) -> Config | None:
    """The config at ``path``, or None once the reason is printed: the one loader of both forms."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"swapper: config error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"swapper: cannot read config: {exc}", file=sys.stderr)
    return None


def check_config(path: str) -> int:
    """``swapper check``: the report on stdout; an invalid config exits 2 as a start would."""
    config = load(path)
    if config is None:
        return EXIT_CONFIG
    # Only errors: the memory planner's device line is a start's news, not a check's.
    setup_logging("error", "console", None)
    try:
        text = check.report(config, path)
    except ConfigError as exc:  # a planner that refuses the config, as the run loop would
        print(f"swapper: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write(text)
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
