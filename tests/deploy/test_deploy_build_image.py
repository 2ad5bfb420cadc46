"""deployments/build-image: its help names every option the docs use, and it refuses to start,
saying what is missing, without PEX files or without buildah (the build itself:
tests/runtime/test_image.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

PEX_FILES = ("virtdp-serve", "virtdp-inspect", "virtdp-discover", "ehost-device")


def run(script: Path, args: List[str], env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/bin/bash", str(script), *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_help_lists_every_option_the_docs_use(deployments: Path, repo_root: Path) -> None:
    done = run(deployments / "build-image", ["--help"], dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: deployments/build-image")
    documented = set()
    # The operator guide is where the script is documented (the README shows only -t).
    for doc in ("docs/operator-guide.md",):
        text = (repo_root / doc).read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if "deployments/build-image" in line:
                documented |= set(re.findall(r"(?<![\w-])(--?[a-z][-a-z]*)", line))
    assert {"--offline-base", "--base-cache", "--oci-archive", "-t"} <= documented
    for option in documented:
        assert re.search(rf"(^|[ ,]){option}\b", done.stdout, re.M), f"--help lacks {option}"


def test_missing_pex_files_are_named(deployments: Path, tmp_path: Path) -> None:
    (tmp_path / "virtdp-serve.pex").write_bytes(b"PK")
    done = run(deployments / "build-image", ["--dist", str(tmp_path)], dict(os.environ))
    assert done.returncode == 2, done.stderr
    for tool in PEX_FILES[1:]:
        assert f"{tmp_path}/{tool}.pex" in done.stderr
    assert f"{tmp_path}/virtdp-serve.pex" not in done.stderr
    assert "./pants package tools/::" in done.stderr
    assert done.stdout == ""


def test_missing_buildah_is_named(deployments: Path, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    dist.mkdir()
    for tool in PEX_FILES:
        (dist / f"{tool}.pex").write_bytes(b"PK")
    # A PATH with what the script needs before it looks for buildah, and no buildah.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname",):
        found = shutil.which(tool)
        assert found
        (bin_dir / tool).symlink_to(found)
    done = run(
        deployments / "build-image", ["--dist", str(dist)], {"PATH": str(bin_dir), "HOME": "/"}
    )
    assert done.returncode == 2, done.stderr
    assert "buildah not found on PATH" in done.stderr and "apt-get install buildah" in done.stderr


def test_bad_usage_is_refused(deployments: Path) -> None:
    for args, says in (
        (["--bogus"], "unknown argument '--bogus'"),
        (["--tag"], "--tag needs a value"),
        (["--base", "x", "--offline-base"], "exclude each other"),
        (["--mirror", "http://m/"], "only apply with --offline-base"),
    ):
        done = run(deployments / "build-image", args, dict(os.environ))
        assert done.returncode == 2 and says in done.stderr, (args, done.stderr)
