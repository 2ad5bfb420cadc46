"""Fixtures of the end-to-end suite: the session's figures (printed at the end, zeros asserted)
and a started node (tests/e2e/nodelab.py) per test."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import e2e_figures
import pytest
from nodelab import Node


@pytest.fixture(scope="session")
def figures(
    request: pytest.FixtureRequest, record_testsuite_property
) -> Iterator[e2e_figures.Figures]:
    yield from e2e_figures.session_fixture(request.config, record_testsuite_property)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    e2e_figures.terminal_summary(terminalreporter, config)


@pytest.fixture
def node(tmp_path: Path, figures: e2e_figures.Figures) -> Iterator[Node]:
    """A node with 8 NICs, the test kubelet and virtdp-serve running, all 8 advertised Healthy."""
    lab = Node(tmp_path, figures)
    try:
        lab.start()
        lab.account()
        yield lab
    finally:
        # Shown by pytest only when the test failed.
        print("--- virtdp-serve log (tail) ---\n" + lab.serve_log_text()[-6000:])
        lab.close()
