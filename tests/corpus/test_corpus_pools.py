"""Malformed pool configs (tests/corpus/pools/*.yaml, one case per file) against virtdp-serve and
virtdp-discover as shipped: both refuse each with exit 2 and one error naming the file, the key
path and what was wrong, and virtdp-serve creates no socket before refusing.

A case file holds `description`, `config` (the file's text, exactly) or `config_base64` (its
bytes, for what is not UTF-8), and `expect`: `exit`, `key_path` (where the error points) and a
`fragment` of the problem.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
import yaml
from fakesysfs import FakeSysfs
from toolrun import tool_command

CASES = sorted((Path(__file__).parent / "pools").glob("*.yaml"))


def test_corpus_is_big_enough():
    assert len(CASES) >= 20, f"only {len(CASES)} pool cases in tests/corpus/pools"


@pytest.mark.parametrize("case_file", CASES, ids=[p.stem for p in CASES])
def test_bad_pool_config(case_file: Path, tmp_path: Path, figures):
    case = yaml.safe_load(case_file.read_text())
    assert set(case) <= {"description", "config", "config_base64", "expect"}, case_file.name
    config = tmp_path / "pools.yaml"
    if "config_base64" in case:
        config.write_bytes(base64.b64decode(case["config_base64"]))
    else:
        config.write_text(case["config"])
    sysfs = FakeSysfs(tmp_path / "sys")
    plugin_dir = tmp_path / "dp"
    expect = case["expect"]
    wanted = f"config error: {config}: {expect['key_path']}"

    figures.add(bad_inputs_tried=1)  # one input, given to both tools
    runs = {
        "virtdp-serve": tool_command("virtdp-serve")
        + ["--config", str(config), "--device-plugin-dir", str(plugin_dir)]
        + ["--devinfo-dir", str(tmp_path / "devinfo"), "--sysfs-root", str(sysfs)],
        "virtdp-discover": tool_command("virtdp-discover")
        + ["--config", str(config), "--sysfs-root", str(sysfs)],
    }
    for tool, argv in runs.items():
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert proc.returncode == expect["exit"], f"{tool}: {case['description']}: {proc}"
        assert proc.stdout == "", f"{tool} printed data for a refused config: {proc.stdout!r}"
        assert "Traceback" not in proc.stderr, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if "config error:" in line]
        assert len(lines) == 1, f"{tool}: {proc.stderr}"
        assert wanted in lines[0], f"{tool}: {wanted!r} not in {lines[0]!r}"
        assert expect["fragment"] in lines[0], f"{tool}: {expect['fragment']!r} not in {lines[0]!r}"
        assert "expected" in lines[0], lines[0]
    assert not plugin_dir.exists() or not any(plugin_dir.iterdir())
