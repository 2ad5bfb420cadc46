"""Fixtures of the end-to-end suite: a started node (tests/e2e/nodelab.py) per test. The
session's figures come from the `virtdp_figures` pytest plugin (build-support/pytest-plugins)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from nodelab import Node
from virtdp_figures import Figures


@pytest.fixture
def node(tmp_path: Path, figures: Figures) -> Iterator[Node]:
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
