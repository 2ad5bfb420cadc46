"""pytest plugin that Pants loads for every test file (pants.toml [pytest] args).

Pants runs each test file as its own pytest process, and Pants 2.17 reports pytest's exit 5 ("no
tests collected") as a failure. A file that collects nothing is reported loudly here instead and
passes; build-support/check-all (virtdp_summary) counts the tests that ran over the whole suite and
fails if that is zero.
"""

from __future__ import annotations

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"virtdp: no tests collected in {', '.join(map(str, session.config.args))}",
                yellow=True,
            )
        session.exitstatus = pytest.ExitCode.OK
