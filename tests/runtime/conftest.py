"""Fixtures of the containerd suite: a node whose pods containerd's CRI makes (crilab.CriLab), one
per test, adding to the session's figures (the `virtdp_figures` plugin: sandboxes run, NICs
lost, leases leaked). A machine without containerd skips the suite with the reason; CI installs
it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import containerd
import pytest
from crilab import MODES, CriLab
from virtdp_figures import Figures


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_PASSED] = report.passed


_PASSED = pytest.StashKey[bool]()


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """How containerd's CNI calls reach ehost-device (crilab.MODES)."""
    return str(request.param)


@pytest.fixture
def lab(
    request: pytest.FixtureRequest, tmp_path: Path, figures: Figures, mode: str
) -> Iterator[CriLab]:
    why = containerd.missing()
    if why:
        pytest.skip(f"containerd suite: {why}")
    node = CriLab(tmp_path, mode=mode)
    try:
        node.start()
        yield node
        lost, leaked = node.account()
        figures.add(nics_lost=lost, leases_leaked=leaked)
    finally:
        figures.add(cri_sandboxes=node.sandboxes_run)
        assert node.ctd is not None
        # Shown by pytest only when the test failed.
        print("--- containerd log (tail) ---\n" + node.ctd.log_tail())
        forced = node.close()
    if request.node.stash.get(_PASSED, False):
        # After a passing test, containerd's own Stop/Remove must have left nothing to force.
        assert forced == [], f"left behind by containerd, removed by force: {forced}"
