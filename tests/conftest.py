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
