"""A stand-in for ``systemctl start/stop``: runs the fake server as a service swapper did not spawn.

``python service_ctl.py start --pid-file F --port P [fake flags...]`` starts
``fake_server.py --port P ...`` detached (its own session, output discarded), writes its pid to F
and exits 0 at once, as ``systemctl start`` does for a simple unit: the service comes up after.
``python service_ctl.py stop --pid-file F`` SIGTERMs that pid and exits 0 (the service may take a
moment to go down, as a real one does). ``--fail`` makes either command exit 3, doing nothing.

Stdlib only (run with ``-S``), so a start costs no more than the fake's own.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

FAKE = Path(__file__).with_name("fake_server.py")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--pid-file", required=True)
    parser.add_argument("--fail", action="store_true")
    args, fake_flags = parser.parse_known_args()
    if args.fail:
        print(f"{args.action}: failing on purpose")
        return 3
    if args.action == "start":
        proc = subprocess.Popen(
            [sys.executable, "-S", str(FAKE), *fake_flags],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        Path(args.pid_file).write_text(f"{proc.pid}\n")
        print(f"started pid {proc.pid}")
        return 0
    try:
        pid = int(Path(args.pid_file).read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, IndexError) as exc:
        print(f"stop: nothing to stop ({exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
