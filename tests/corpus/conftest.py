"""The corpus runners' session figures: the same closing line as tests/e2e (bad inputs tried,
NICs lost, leases leaked), printed once however the two folders are run."""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

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
