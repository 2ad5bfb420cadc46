"""Fixtures for the deployment checks: where the repository's deployments/ and docs/ are."""

from __future__ import annotations

from pathlib import Path

import pytest


def _find_root() -> Path:
    # A dev checkout: tests/deploy/ sits two levels below the root. Under Pants the test runs in
    # a sandbox (cwd) holding the deployments/ and docs/ files it depends on.
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for candidate in (start, *start.parents):
            if (candidate / "deployments" / "install-cni.sh").is_file():
                return candidate
    raise RuntimeError(
        "deployments/install-cni.sh not found above the working directory or this test: "
        "expected the repository's deployments/ folder (under Pants: a files() dependency)"
    )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return _find_root()


@pytest.fixture(scope="session")
def deployments(repo_root: Path) -> Path:
    return repo_root / "deployments"
