"""deployments/install-cni.sh: atomic install of the CNI plugin while the old one runs.

The plugin under test is a pair of shell scripts (or two real ELF binaries) that identify their
version at the start and at the end of a large file: an exec of a half-written or spliced file
prints nothing or two different versions. Another process execs the plugin path in a loop while
installers keep replacing it; every exec must see one complete version, never ETXTBSY.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest

PAD_LINES = 6000  # ~400 KiB: a copy takes long enough to be caught mid-write if done in place

RUNNER = r"""
import json, os, subprocess, sys
target, stop = sys.argv[1], sys.argv[2]
while not os.path.exists(stop):
    try:
        p = subprocess.run([target], capture_output=True, text=True)
        rec = {"rc": p.returncode, "out": p.stdout, "err": p.stderr}
    except OSError as e:
        rec = {"errno": e.errno, "err": str(e)}
    print(json.dumps(rec), flush=True)
"""


def plugin_text(version: str) -> str:
    pad = "".join(f"# {version} padding line {i:05d} {'x' * 48}\n" for i in range(PAD_LINES))
    return f"#!/bin/sh\nbegin={version}\n: <<'PAD'\n{pad}PAD\necho \"$begin {version}\"\n"


def verdict(rec: Dict[str, object], versions: List[str]) -> str:
    """The version a run saw when it saw one complete file, else a description of what broke."""
    if "errno" in rec:
        return f"exec failed: {rec['err']}"
    for v in versions:
        if rec["rc"] == 0 and rec["out"] == f"{v} {v}\n" and rec["err"] == "":
            return v
    return f"mixed or partial file: rc={rec['rc']} out={rec['out']!r} err={str(rec['err'])[:200]!r}"


def run_installer(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(script), *args], capture_output=True, text=True, timeout=60)


def run_once(target: Path) -> Dict[str, object]:
    try:
        p = subprocess.run([str(target)], capture_output=True, text=True, timeout=30)
    except OSError as e:
        return {"errno": e.errno, "err": str(e)}
    return {"rc": p.returncode, "out": p.stdout, "err": p.stderr}


@pytest.fixture
def installer(deployments: Path) -> Path:
    return deployments / "install-cni.sh"


@pytest.fixture
def sources(tmp_path: Path) -> Dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    out = {}
    for v in ("v1", "v2"):
        (src / v).mkdir()
        path = src / v / "plugin"
        path.write_text(plugin_text(v))
        path.chmod(0o755)
        out[v] = path
    return out


def test_detector_catches_partial_and_spliced_files(tmp_path: Path) -> None:
    # The check below must be able to fail: a half-written or spliced plugin is caught.
    old, new = plugin_text("v1"), plugin_text("v2")
    target = tmp_path / "plugin"
    for broken in (new[: len(new) // 2], old[: len(old) // 2] + new[len(new) // 2 :]):
        target.write_text(broken)
        target.chmod(0o755)
        assert not verdict(run_once(target), ["v1", "v2"]).startswith("v")
    target.write_text(new)
    assert verdict(run_once(target), ["v1", "v2"]) == "v2"


def test_writing_in_place_would_hit_etxtbsy(tmp_path: Path) -> None:
    # Why the installer renames: an exec of a file open for writing fails, on this kernel too.
    target = tmp_path / "plugin"
    target.write_text(plugin_text("v1"))
    target.chmod(0o755)
    with open(target, "r+b"):
        rec = run_once(target)
    assert rec.get("errno") == errno.ETXTBSY, rec


# What the loop must have seen while the installers ran: enough execs, enough installs of each
# version, and the plugin change under it. The test runs until it has, however slow the machine
# (a count, not a clock), and fails only on a broken exec or on HANG_GUARD seconds of no progress.
MIN_EXECS = 50
MIN_INSTALLS = 5
HANG_GUARD = 300.0


def test_install_while_plugin_runs_in_a_loop(
    installer: Path, sources: Dict[str, Path], tmp_path: Path
) -> None:
    bindir = tmp_path / "opt-cni-bin"
    bindir.mkdir()
    target = bindir / "ehost-device"
    first = run_installer(installer, str(sources["v1"]), str(bindir), "ehost-device")
    assert first.returncode == 0, first.stderr
    assert verdict(run_once(target), ["v1", "v2"]) == "v1"

    stop = tmp_path / "stop"
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(target), str(stop)], stdout=subprocess.PIPE, text=True
    )
    failures: List[str] = []
    installs = {"v1": 0, "v2": 0}
    seen: List[str] = []
    done = threading.Event()

    def read_execs() -> None:
        assert runner.stdout is not None
        for line in runner.stdout:
            seen.append(verdict(json.loads(line), ["v1", "v2"]))
            if enough():
                done.set()
        done.set()  # the runner ended

    def enough() -> bool:
        return (
            len(seen) >= MIN_EXECS
            and min(installs.values()) >= MIN_INSTALLS
            and {"v1", "v2"} <= set(seen)
        )

    def install_loop(version: str) -> None:
        while not done.is_set():
            p = run_installer(installer, str(sources[version]), str(bindir), "ehost-device")
            if p.returncode != 0:
                failures.append(f"{version}: rc={p.returncode} {p.stderr.strip()}")
                done.set()
                return
            installs[version] += 1

    reader = threading.Thread(target=read_execs)
    # Two installers race each other (a rolling update overlapping an old pod) and the exec
    # loop: the file keeps flipping between versions while it runs.
    threads = [threading.Thread(target=install_loop, args=(v,)) for v in ("v2", "v1")]
    try:
        reader.start()
        for t in threads:
            t.start()
        progress = (-1, -1)
        while not done.wait(timeout=HANG_GUARD):
            now = (len(seen), sum(installs.values()))
            assert now != progress, f"no progress in {HANG_GUARD}s: {now} execs, installs"
            progress = now
    finally:
        done.set()
        for t in threads:
            t.join()
        stop.touch()
        runner.wait(timeout=60)
        reader.join(timeout=60)

    assert failures == []
    bad = [s for s in seen if s not in ("v1", "v2")]
    assert bad == [], f"{len(bad)} of {len(seen)} execs saw no complete plugin: {bad[:5]}"
    assert enough(), f"runner ended early: {len(seen)} execs, {installs}"

    final = target.read_text()
    assert final in (plugin_text("v1"), plugin_text("v2"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert sorted(p.name for p in bindir.iterdir()) == ["ehost-device"], "temporary files left"


def test_running_binary_is_replaced_without_etxtbsy(installer: Path, tmp_path: Path) -> None:
    # A real ELF executable stays mapped while it runs: writing it in place fails (ETXTBSY);
    # the installer must still replace it, and the running process must finish unharmed.
    sleep, true = shutil.which("sleep"), shutil.which("true")
    assert sleep and true
    bindir = tmp_path / "bin"
    bindir.mkdir()
    target = bindir / "plugin"
    assert run_installer(installer, sleep, str(bindir), "plugin").returncode == 0
    running = subprocess.Popen([str(target), "2"])
    try:
        time.sleep(0.3)
        with pytest.raises(OSError) as naive:
            open(target, "r+b")
        assert naive.value.errno == errno.ETXTBSY
        p = run_installer(installer, true, str(bindir), "plugin")
        assert p.returncode == 0, p.stderr
        assert running.poll() is None, "the running plugin was disturbed"
        assert Path(true).read_bytes() == target.read_bytes()
        assert subprocess.run([str(target), "--version"], capture_output=True, text=True).stdout
    finally:
        assert running.wait(timeout=30) == 0


def test_same_content_is_left_alone(installer: Path, sources: Dict[str, Path], tmp_path: Path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    assert run_installer(installer, str(sources["v1"]), str(bindir)).returncode == 0
    inode = (bindir / "plugin").stat().st_ino
    again = run_installer(installer, str(sources["v1"]), str(bindir))
    assert again.returncode == 0 and "already current" in again.stderr
    assert (bindir / "plugin").stat().st_ino == inode
    assert run_installer(installer, str(sources["v2"]), str(bindir)).returncode == 0
    assert (bindir / "plugin").stat().st_ino != inode
    assert verdict(run_once(bindir / "plugin"), ["v1", "v2"]) == "v2"


def test_stale_temporary_files_are_removed(
    installer: Path, sources: Dict[str, Path], tmp_path: Path
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stale, fresh = bindir / ".plugin.install.AAAAAA", bindir / ".plugin.install.BBBBBB"
    stale.write_text("half")
    fresh.write_text("in progress")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert run_installer(installer, str(sources["v1"]), str(bindir)).returncode == 0
    assert not stale.exists()
    assert fresh.exists(), "a recent temporary file may belong to a running installer"


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no-args", "expected 2 or 3 arguments"),
        ("missing-source", "expected a readable regular file"),
        ("empty-source", "expected the plugin executable"),
        ("missing-dir", "expected the host's CNI bin directory"),
        ("bad-name", "expected a plain file name"),
        ("dest-is-dir", "expected a plugin file (or nothing)"),
    ],
)
def test_bad_input_is_named(
    installer: Path, sources: Dict[str, Path], tmp_path: Path, case: str, expected: str
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    empty = tmp_path / "empty"
    empty.write_text("")
    (bindir / "taken").mkdir()
    src = str(sources["v1"])
    args = {
        "no-args": [src],
        "missing-source": [str(tmp_path / "nope"), str(bindir)],
        "empty-source": [str(empty), str(bindir)],
        "missing-dir": [src, str(tmp_path / "no-such-dir")],
        "bad-name": [src, str(bindir), "../escape"],
        "dest-is-dir": [src, str(bindir), "taken"],
    }[case]
    p = run_installer(installer, *args)
    assert p.returncode == 2
    assert expected in p.stderr
    assert p.stdout == ""
    assert sorted(x.name for x in bindir.iterdir()) == ["taken"]
