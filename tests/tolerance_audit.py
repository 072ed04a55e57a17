"""``pytest --tolerance-audit N``: how the tolerances of these tests are chosen.

Runs every selected test N times (fresh seeds each time: see the ``seed`` fixture) and records
every value that ``rel_err`` returns, by the test-file line that called it. The summary prints,
per line, the number of values, their median, 99th percentile and maximum, the threshold written
on that line (when it is a literal ``rel_err(...) < X``) and max / threshold. A tolerance should
sit well above the worst value seen over many seeds (rounding has long tails: one seed in a
few thousand can give several times the 99th percentile) and far below what a wrong result gives.

    python -m pytest -q --tolerance-audit 50 tests/test_step.py
"""

from __future__ import annotations

import linecache
import re
import sys
from collections import defaultdict
from pathlib import Path

THRESHOLD = re.compile(r"rel_err\(.*\)\s*<=?\s*([0-9.]+(?:e-?[0-9]+)?)")


class ToleranceAudit:
    def __init__(self, repeats: int):
        self.repeats = repeats
        self.values: dict[tuple[str, int], list[float]] = defaultdict(list)

    def _logged(self, rel_err):
        def logged(out, ref):
            value = rel_err(out, ref)
            caller = sys._getframe(1)
            self.values[(caller.f_code.co_filename, caller.f_lineno)].append(value)
            return value

        logged.audited = True
        return logged

    def pytest_generate_tests(self, metafunc):
        metafunc.fixturenames.append("tolerance_audit_run")
        metafunc.parametrize("tolerance_audit_run", range(self.repeats))

    def pytest_collection_modifyitems(self, items):
        for item in items:
            module = getattr(item, "module", None)
            fn = getattr(module, "rel_err", None)
            if fn is not None and not getattr(fn, "audited", False):
                module.rel_err = self._logged(fn)

    def pytest_terminal_summary(self, terminalreporter):
        write = terminalreporter.write_line
        write(f"tolerance audit ({self.repeats} runs of each test): line, values, median, p99, max, threshold, max/threshold")
        for (path, line), values in sorted(self.values.items()):
            values = sorted(values)
            n = len(values)
            text = linecache.getline(path, line)
            match = THRESHOLD.search(text)
            limit = float(match.group(1)) if match else None
            ratio = f"{values[-1] / limit:.2f}" if limit else "-"
            write(f"{Path(path).name}:{line}  {n:6d}  {values[n // 2]:.2e}  {values[min(n - 1, int(0.99 * n))]:.2e}"
                  f"  {values[-1]:.2e}  {limit if limit else '-'}  {ratio}")
