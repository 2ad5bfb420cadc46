"""Fixtures of the containerd suite: a node whose pods containerd's CRI makes (crilab.CriLab), one
per test, and the session's figures (shared with tests/e2e: sandboxes run, NICs lost, leases
leaked). A machine without containerd skips the suite with the reason; CI installs it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import containerd
import pytest
from crilab import MODES, CriLab

# Under Pants tests/e2e is a source root of its own; in the dev loop it is not on the path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))

import e2e_figures  # noqa: E402


@pytest.fixture(scope="session")
def figures(
    request: pytest.FixtureRequest, record_testsuite_property
) -> Iterator[e2e_figures.Figures]:
    yield from e2e_figures.session_fixture(request.config, record_testsuite_property)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    e2e_figures.terminal_summary(terminalreporter, config)


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
    request: pytest.FixtureRequest, tmp_path: Path, figures: e2e_figures.Figures, mode: str
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
