"""The suite's closing figures: scenarios passed, faults survived, bad inputs tried, NICs lost,
leases leaked, pod sandboxes run through containerd's CRI, containers of the shipped image run
there (tests/runtime/test_image.py).

One `Figures` per pytest session (kept in the config stash), shared by tests/e2e, tests/corpus
and tests/runtime: each folder's conftest hands its session fixture and its terminal-summary hook to
the functions here, so a run of both folders prints one line, and a run of one file (as Pants
runs them) prints that file's line. NICs lost and leases leaked are counted from what the
checks observed, never assumed, and must end at zero.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest


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
                if not hasattr(self, name) or name == "lock":
                    raise AttributeError(f"no figure {name!r}")
                setattr(self, name, getattr(self, name) + n)

    def line(self) -> str:
        return (
            f"virtdp e2e: scenarios passed {self.scenarios_passed}, "
            f"faults survived {self.faults_survived}, "
            f"bad inputs tried {self.bad_inputs_tried}, "
            f"NICs lost {self.nics_lost}, leases leaked {self.leases_leaked}, "
            f"CRI sandboxes {self.cri_sandboxes}, image containers {self.image_containers}"
        )


_FIGURES = pytest.StashKey[Figures]()
_PRINTED = pytest.StashKey[bool]()


def of(config: pytest.Config) -> Figures:
    return config.stash.setdefault(_FIGURES, Figures())


FIELDS = (
    "scenarios_passed",
    "faults_survived",
    "bad_inputs_tried",
    "nics_lost",
    "leases_leaked",
    "cri_sandboxes",
    "image_containers",
)


def session_fixture(config: pytest.Config, record=None):  # type: ignore[no-untyped-def]
    """Body of the folders' session fixture: yields the figures, then asserts the zeros.

    `record` is pytest's `record_testsuite_property`: the figures also go into the JUnit report
    as `virtdp_<figure>` properties, so `.ci/run` can add up the files Pants ran one by one.
    """
    figures = of(config)
    yield figures
    if record is not None:
        for name in FIELDS:
            record(f"virtdp_{name}", getattr(figures, name))
    assert figures.nics_lost == 0, f"NICs lost: {figures.line()}"
    assert figures.leases_leaked == 0, f"IPAM leases leaked: {figures.line()}"


def terminal_summary(terminalreporter, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    """Print the line once per session, whichever folder's hook runs first."""
    if _FIGURES not in config.stash or config.stash.get(_PRINTED, False):
        return
    config.stash[_PRINTED] = True
    figures = config.stash[_FIGURES]
    bad = figures.nics_lost or figures.leases_leaked
    terminalreporter.write_sep("=", "virtdp figures")
    terminalreporter.write_line(figures.line(), red=bool(bad), green=not bad)
