"""Shared pytest fixtures: the fake sysfs builder and real network namespaces."""

from __future__ import annotations

from typing import Iterator

import pytest
from fakesysfs import fake_sysfs  # noqa: F401  (fixture)
from netlab import Netns


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A fresh network namespace, removed after the test."""
    ns = Netns("vt")
    try:
        yield ns
    finally:
        ns.close()


def tool_command(name: str) -> list:
    """argv that runs one of the four tools the way it ships.

    Under Pants the test depends on the tool's pex_binary, which lands in the sandbox as
    `<name>.pex`: the test then drives the real PEX. `VIRTDP_PEX_DIR` points at a folder of
    built PEX files (e.g. dist/). Otherwise (plain pytest in a dev checkout) the tool's module
    runs from source with the current interpreter.
    """
    import os
    import sys

    candidates = [os.path.join(os.getcwd(), f"{name}.pex")]
    if os.environ.get("VIRTDP_PEX_DIR"):
        candidates.insert(0, os.path.join(os.environ["VIRTDP_PEX_DIR"], f"{name}.pex"))
    for path in candidates:
        if os.path.exists(path):
            return [path]
    return [sys.executable, "-m", name.replace("-", "_")]
