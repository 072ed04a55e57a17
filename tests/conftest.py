import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/official_files.py and friends


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the whole tensor, computed in float64."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def pytest_addoption(parser):
    parser.addoption("--tolerance-audit", type=int, default=0, metavar="N",
                     help="run each test N times and print the distribution of every rel_err line (tests/tolerance_audit.py)")


def pytest_configure(config):
    if config.getoption("--tolerance-audit"):
        from tolerance_audit import ToleranceAudit

        config.pluginmanager.register(ToleranceAudit(config.getoption("--tolerance-audit")), "tolerance_audit")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per test: the tests' models are tiny, and on a busy 2-core machine
    the threads' barriers make small ops (sorts, draws over 65536 tokens) many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test (or RWKVKIT_TEST_SEED), printed when the test fails."""
    value = int(os.environ.get("RWKVKIT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"reproduce with RWKVKIT_TEST_SEED={seeds[0]}"))
