"""A short soak: ``scripts/soak.py`` with ~200 requests (swaps, streams, cancels, one crash, one
hung child, and a stderr nobody reads).

The script runs swapper as a real process in front of three fake upstreams and audits the run
itself (see its docstring); this test only runs it bounded and checks its verdict, so the full
soak (``.venv/bin/python scripts/soak.py``, ~2,000 requests) and CI check the same things.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"


def test_short_soak_loses_and_leaks_nothing() -> None:
    argv = [
        sys.executable,
        str(SOAK),
        "--requests",
        "200",
        "--concurrency",
        "16",
        "--json",
        "--deadline",
        "60",
    ]
    done = subprocess.run(argv, capture_output=True, timeout=90, check=False)
    assert done.stdout, done.stderr.decode(errors="replace")[-4000:]
    report = json.loads(done.stdout)
    print(json.dumps(report, indent=1))  # the figures, for -s
    assert report["requests"] == 200
    assert report["lost"] == 0, report["lost_detail"]
    assert report["leaked_slots"] == []
    assert report["children_when_idle"] <= 1
    assert report["processes_left_after_shutdown"] == []
    assert report["swapper_exit_code"] == 0
    assert report["crash"]["tries"], "the crash never happened"
    assert report["hang"]["noticed"], report["hang"]  # the SIGSTOPped child was found hung, killed
    assert report["replayed"] == []  # no request reached two children
    assert report["log_lines_dropped"] > 0  # the stalled stderr cost lines, not requests
    assert not report["fd_leak"], report["open_fds"]
    # Every request is accounted for: answered, refused explicitly, cut after the crash, or
    # abandoned by its own client.
    accounted = (
        report["ok"]
        + report["cancelled_by_client"]
        + sum(report["errors_by_kind"].values())
        + report["truncated_streams_after_crash"]
    )
    assert accounted == report["requests"]
    assert report["ok"] > 100  # the run did real work
    assert report["child_starts"] is None or report["child_starts"] >= 3  # it swapped
    assert report["passed"] is True
    assert done.returncode == 0
