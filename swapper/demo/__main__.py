"""``python -m swapper.demo``: set up real upstreams for the default config, demos and CI.

Owns: the ``.demo/`` directory in the current working directory (or ``--dir``), which holds only
symlinks into the cache:

    .demo/bin/llama-server       .demo/models/chat-a.gguf   .demo/models/whisper-tiny.bin
    .demo/bin/whisper-server     .demo/models/chat-b.gguf   .demo/models/test.wav
                                 .demo/models/embed.gguf

Commands:

``setup [--no-whisper]``
    generate the tiny models (:mod:`swapper.demo.tinymodels`), find or build the servers
    (:mod:`swapper.demo.servers`), (re)create the symlinks and print timings. Idempotent; about a
    second when everything is cached. Exit 1 with the reason (and the build log's path) on
    failure.
``paths [--no-whisper] [--check]``
    print, as JSON, the ``.demo`` paths, what they point to and whether they are ready; builds and
    generates nothing. ``--check`` exits 1 unless everything is ready.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from swapper.demo import cache_root, servers, tinymodels

BIN_NAMES = ("llama-server", "whisper-server")


def demo_links(demo_dir: Path, *, whisper: bool = True) -> dict[str, Path]:
    """Link name (``llama-server``, ``chat-a`` ...) -> its path under ``demo_dir``."""
    links: dict[str, Path] = {"llama-server": demo_dir / "bin" / "llama-server"}
    if whisper:
        links["whisper-server"] = demo_dir / "bin" / "whisper-server"
    for name, art in tinymodels.ARTIFACTS.items():
        if whisper or name not in tinymodels.WHISPER_ARTIFACTS:
            links[name] = demo_dir / "models" / art.filename
    return links


def symlink(link: Path, target: Path) -> bool:
    """Point ``link`` at ``target`` (absolute), replacing what is there; False if already so."""
    target = target.absolute()
    try:
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return False
    except OSError:
        pass
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)
    return True


def _say(msg: str) -> None:
    print(msg, flush=True)


def cmd_setup(demo_dir: Path, *, whisper: bool) -> int:
    t_all = time.perf_counter()
    _say(f"cache: {cache_root()}")
    targets: dict[str, Path] = {}

    t0 = time.perf_counter()
    names = [n for n in tinymodels.ARTIFACTS if whisper or n not in tinymodels.WHISPER_ARTIFACTS]
    models = tinymodels.ensure_models(names)
    made = [m.artifact.filename for m in models.values() if m.generated]
    state = f"generated {', '.join(made)}" if made else "all cached"
    _say(f"models: {time.perf_counter() - t0:.2f} s ({state})")
    targets.update({name: m.path for name, m in models.items()})

    def progress(msg: str) -> None:
        _say(f"  ... {msg}")

    t0 = time.perf_counter()
    llama = servers.obtain_llama_server(progress=progress)
    extra = f"; {llama.detail}" if llama.detail else ""
    _say(f"llama-server: {time.perf_counter() - t0:.2f} s, {llama.source}: {llama.path}{extra}")
    targets["llama-server"] = llama.path

    if whisper:
        t0 = time.perf_counter()
        ws = servers.obtain_whisper_server(progress=progress)
        extra = f"; {ws.detail}" if ws.detail else ""
        _say(f"whisper-server: {time.perf_counter() - t0:.2f} s, {ws.source}: {ws.path}{extra}")
        targets["whisper-server"] = ws.path

    changed = 0
    for name, link in demo_links(demo_dir, whisper=whisper).items():
        changed += symlink(link, targets[name])
    _say(f"links: {demo_dir} ({changed} updated)")
    _say(f"setup done in {time.perf_counter() - t_all:.2f} s")
    return 0


def resolve_paths(demo_dir: Path, *, whisper: bool) -> dict[str, Any]:
    """The JSON ``paths`` prints; never builds or generates."""
    entries: dict[str, Any] = {}
    ready = True
    for name, link in demo_links(demo_dir, whisper=whisper).items():
        target = link.resolve() if link.is_symlink() else None
        ok = target is not None and target.is_file()
        if name in BIN_NAMES:
            ok = ok and os.access(link, os.X_OK)
        ready = ready and ok
        entries[name] = {"path": str(link), "target": str(target) if target else None, "ready": ok}
    return {
        "ready": ready,
        "cache": str(cache_root()),
        "demo_dir": str(demo_dir),
        "llama_server": entries["llama-server"]["path"],
        "whisper_server": entries["whisper-server"]["path"] if whisper else None,
        "models": {k: v["path"] for k, v in entries.items() if k not in BIN_NAMES},
        "entries": entries,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m swapper.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path(".demo"), help="the demo directory (default: ./.demo)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_setup = sub.add_parser("setup", help="generate models, find or build servers, create .demo links")
    p_setup.add_argument("--no-whisper", action="store_true", help="skip whisper-server and its model/WAV")
    p_paths = sub.add_parser("paths", help="print the resolved paths as JSON")
    p_paths.add_argument("--no-whisper", action="store_true", help="leave whisper out")
    p_paths.add_argument("--check", action="store_true", help="exit 1 unless every path is ready")
    args = ap.parse_args(argv)
    demo_dir: Path = args.dir.absolute()

    if args.cmd == "setup":
        try:
            return cmd_setup(demo_dir, whisper=not args.no_whisper)
        except (servers.SetupError, OSError) as e:
            print(f"setup failed: {e}", file=sys.stderr)
            return 1
        except ImportError as e:
            print(f"setup failed: {e}; install the demo extra: pip install -e '.[demo]'", file=sys.stderr)
            return 1
    info = resolve_paths(demo_dir, whisper=not args.no_whisper)
    print(json.dumps(info, indent=2))
    return 0 if info["ready"] or not args.check else 1


if __name__ == "__main__":
    raise SystemExit(main())
