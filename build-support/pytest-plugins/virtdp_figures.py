"""pytest plugin: the suite's closing figures (scenarios passed, faults survived, bad inputs
tried, NICs lost, leases leaked, pod sandboxes run through containerd's CRI, containers of the
shipped image run there).

Loaded for every test file (`-p virtdp_figures`: pants.toml [pytest] args, build-support/devtest).
A test that counts something asks for the session fixture `figures`; a session that used it
ends with one line, `virtdp e2e: ...`, and its figures go into the JUnit report as
`virtdp_<figure>` properties, which `virtdp_summary` (run by build-support/check-all) adds up
over the files Pants ran one by one. NICs lost and leases leaked are counted from what the
checks observed, never assumed, and must end at zero.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Any, Iterator

import pytest
from virtdp_summary import FIELDS, line


@dataclass
class Figures:
    scenarios_passed: int = 0
    faults_survived: int = 0
    bad_inputs_tried: int = 0
    nics_lost: int = 0
    leases_leaked: int = 0
    cri_sandboxes: int = 0
    image_containers: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                if name not in FIELDS:
                    raise AttributeError(f"no figure {name!r}")
                setattr(self, name, getattr(self, name) + n)

    def line(self) -> str:
        return line(**{name: getattr(self, name) for name in FIELDS})


assert FIELDS == tuple(f.name for f in fields(Figures) if f.name != "lock")


_FIGURES = pytest.StashKey[Figures]()


@pytest.fixture(scope="session")
def figures(request: pytest.FixtureRequest, record_testsuite_property: Any) -> Iterator[Figures]:
    """The session's figures; at the end they go into the JUnit report and the zeros are
    asserted."""
    found = request.config.stash.setdefault(_FIGURES, Figures())
    yield found
    for name in FIELDS:
        record_testsuite_property(f"virtdp_{name}", getattr(found, name))
    assert found.nics_lost == 0, f"NICs lost: {found.line()}"
    assert found.leases_leaked == 0, f"IPAM leases leaked: {found.line()}"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    found = config.stash.get(_FIGURES, None)
    if found is None:
        return
    bad = found.nics_lost or found.leases_leaked
    terminalreporter.write_sep("=", "virtdp figures")
    terminalreporter.write_line(found.line(), red=bool(bad), green=not bad)
