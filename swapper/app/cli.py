"""Command line: parse argv, load the config, run the server or check it; exit codes only, no policy.

Two forms share one loader, so a check says exactly what a start would:

* ``swapper --config FILE [--listen ...]`` serves (llama-swap's plain form; its one-dash flags,
  ``-config FILE -listen :8080``, work as written: ``:8080`` is every interface, as in Go);
* ``swapper check --config FILE``, or ``swapper -t --config FILE`` (``nginx -t``), validates the
  config without binding a port or starting a child, prints what a start would run, and exits 0,
  or 2 with the same message a start gives.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from swapper import __version__
from swapper.app import check
from swapper.app.lifecycle import ListenError, serve
from swapper.config import listen
from swapper.config.schema import Config, ConfigError
from swapper.config.sources import ConfigSources
from swapper.observe.logs import LogHub, setup_logging

EXIT_CONFIG = 2
CHECK = "check"  # the subcommand; any other first argument is the plain server form
LOOP_ENV = "SWAPPER_LOOP"  # "asyncio" runs on asyncio's own loop even when uvloop is installed


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port``; ``:port`` is every interface (Go's reading), a bare ``port`` is loopback."""
    try:
        return listen.parse_address(value)
    except listen.AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_sources(p: argparse.ArgumentParser) -> None:
    # llama-swap's Go flags take one dash; both spellings work, so its unit files run unchanged.
    p.add_argument("--config", "-config", "-c", default=None, help="path to models.yaml")
    p.add_argument(
        "--config-dir",
        "-config-dir",
        default=None,
        help="a folder of *.yml/*.yaml files merged (by name, after --config) with llama-swap's rules",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swapper",
        description="One URL in front of many local models. llama-swap's one-dash flags "
        "(-config, -listen, -watch-config, -config-dir, -tls-cert-file, -tls-key-file, -version) work too.",
        epilog="`swapper check --config FILE` (or -t) validates a config without serving it.",
    )
    _add_sources(p)
    p.add_argument(
        "-t",
        "--test-config",
        action="store_true",
        help="check the config and exit (the same as `swapper check`): 0 when valid, 2 when not",
    )
    p.add_argument(
        "--listen",
        "-listen",
        "-l",
        type=parse_listen,
        default=None,
        help="host:port to listen on; ':8080' is every interface, as in Go (default 127.0.0.1:8080, "
        "127.0.0.1:8443 with TLS: loopback unless you say otherwise)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warn", "error"], default=None)
    p.add_argument(
        "--watch-config",
        "-watch-config",
        action="store_true",
        help="reload the config when the file changes (SIGHUP always reloads); only models whose "
        "settings changed are restarted",
    )
    p.add_argument(
        "--tls-cert-file", "-tls-cert-file", default=None, help="serve HTTPS with this certificate"
    )
    p.add_argument("--tls-key-file", "-tls-key-file", default=None, help="the certificate's private key")
    p.add_argument("--version", "-version", action="version", version=f"swapper {__version__}")
    return p


def build_check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swapper check",
        description="Load and validate a config as a start would, without binding a port or starting "
        "a child; print each model's command, port, aliases and placement, and every warning. "
        "Exit 0 when the config is valid, 2 when it is not.",
    )
    _add_sources(p)
    return p


def sources_of(args: argparse.Namespace) -> ConfigSources | None:
    if args.config is None and args.config_dir is None:
        print("swapper: error: at least one of --config or --config-dir is required", file=sys.stderr)
        return None
    return ConfigSources(
        Path(args.config).absolute() if args.config else None,
        Path(args.config_dir).absolute() if args.config_dir else None,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHECK]:
        sources = sources_of(build_check_parser().parse_args(argv[1:]))
        return EXIT_CONFIG if sources is None else check_config(sources)
    args = build_parser().parse_args(argv)
    sources = sources_of(args)
    if sources is None:
        return EXIT_CONFIG
    if args.test_config:
        return check_config(sources)
    if (args.tls_cert_file is None) != (args.tls_key_file is None):
        print("swapper: error: --tls-cert-file and --tls-key-file go together", file=sys.stderr)
        return EXIT_CONFIG
    config = load(sources)
    if config is None:
        return EXIT_CONFIG
    tls = None
    if args.tls_cert_file is not None:
        try:
            tls = listen.tls_context(args.tls_cert_file, args.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            print(f"swapper: cannot load the TLS certificate or key: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    hub = LogHub(echo_upstream=config.log_to_stdout in ("upstream", "both"))
    console = config.log_to_stdout in ("proxy", "both")
    setup_logging(args.log_level or config.log_level, config.log_format, hub, console=console)
    for warning in check.warnings(config):
        print(f"swapper: warning: {warning}", file=sys.stderr)
    host, port = args.listen or ("127.0.0.1", 8443 if tls else 8080)
    try:
        run(serve(config, host, port, logs=hub, sources=sources, watch_config=args.watch_config, tls=tls))
    except ListenError as exc:
        print(f"swapper: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def load(sources: ConfigSources) -> Config | None:
    """The config, or None once the reason is printed: the one loader of both forms."""
    try:
        return sources.load()
    except ConfigError as exc:
        print(f"swapper: config error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"swapper: cannot read config: {exc}", file=sys.stderr)
    return None


def check_config(sources: ConfigSources) -> int:
    """``swapper check``: the report on stdout; an invalid config exits 2 as a start would."""
    config = load(sources)
    if config is None:
        return EXIT_CONFIG
    # Only errors: the memory planner's device line is a start's news, not a check's.
    setup_logging("error", "console", None)
    try:
        text = check.report(config, sources.describe())
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
