"""tests/tolerance_audit.py: ``pytest --tolerance-audit N`` repeats each test N times and
prints, per rel_err line, the values' distribution against the line's threshold."""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import test_ops

TESTS = Path(__file__).parent


def test_audit_repeats_and_reports_each_line():
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tolerance-audit", "3",
           f"{TESTS / 'test_ops.py'}::test_chunked_zero_initial_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=TESTS.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout
    assert "tolerance audit (3 runs of each test)" in proc.stdout
    lines, first = inspect.getsourcelines(test_ops.test_chunked_zero_initial_state)
    line = first + next(i for i, text in enumerate(lines) if "rel_err(y, y_ref) < 1e-5" in text)
    # both calls on that line, three runs: six values, threshold 1e-5, each far below it
    row = re.search(rf"test_ops\.py:{line}\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", proc.stdout)
    assert row, proc.stdout
    n, median, p99, worst, limit, ratio = row.groups()
    assert int(n) == 6 and float(limit) == 1e-5
    assert 0 < float(median) <= float(p99) <= float(worst) < 1e-6 and float(ratio) < 0.1
